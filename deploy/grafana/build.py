"""Shoal's Grafana dashboards as code: the overview, the data path per node and dataset, and the control plane.

Built with ``grafana-foundation-sdk`` and written as JSON to ``deploy/grafana/dashboards/`` (committed, so Grafana's
file provisioning and a manual import need no Python). Regenerate with ``make dashboards`` (``python -m
deploy.grafana.build``); ``--check`` only says whether the committed files are current, and the unit tests
(``tests/unit/test_dashboards.py``) fail when they are not.

Every query names its metrics through ``libs.metrics``: the helpers below turn an instrument into the series name
Prometheus scrapes (prometheus-client adds ``_total`` to counters and ``_bucket``/``_count``/``_sum`` to
histograms), so a renamed metric changes the dashboards with it. Label values that code and dashboards share
(hit sources, outcomes) come from there too. Every panel and query uses the provisioned datasource, whose uid is
pinned (``DATASOURCE_UID``, the same as in ``provisioning/datasources/prometheus.yaml``).

Layout: each row holds panels whose widths add up to the 24 columns of Grafana's grid; ids are assigned in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from prometheus_client import Counter, Gauge, Histogram

from libs import metrics

HERE = Path(__file__).resolve().parent
DASHBOARDS_DIR = HERE / "dashboards"
# Pinned so the dashboards' JSON can name it: Grafana would otherwise make up a uid per installation.
DATASOURCE_UID = "shoal-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
# Grafana's grid is 24 columns wide.
GRID_COLUMNS = 24
# The window of every rate(): Grafana's own, at least four scrape intervals of the datasource.
RATE = "$__rate_interval"
TAGS = ["shoal"]
# What a variable at "All" matches: every value, also ones that appear after the dashboard loaded.
ALL = ".*"
# Fresh enough for caches that fill over minutes, light on Prometheus; Grafana's users can pick less.
REFRESH = "30s"

# --- metric names as Prometheus scrapes them ---------------------------------------------------------------------


def _name(instrument: Counter | Gauge | Histogram, kind: str) -> str:
    """The instrument's base name; a counter where a histogram is meant would make a query that matches nothing."""
    if instrument._type != kind:
        raise TypeError(f"{instrument._name} is a {instrument._type}, not a {kind}")
    return str(instrument._name)


def total(counter: Counter) -> str:
    """A counter's series: prometheus-client exposes ``<name>_total``."""
    return f"{_name(counter, 'counter')}_total"


def gauge(instrument: Gauge) -> str:
    return _name(instrument, "gauge")


def buckets(histogram: Histogram) -> str:
    return f"{_name(histogram, 'histogram')}_bucket"


def count(histogram: Histogram) -> str:
    return f"{_name(histogram, 'histogram')}_count"


def one_of(values: Sequence[str]) -> str:
    """A regex matcher's value for exactly these label values."""
    return "|".join(values)


def select(series: str, selector: str = "") -> str:
    return f"{series}{{{selector}}}" if selector else series


def rate(series: str, selector: str = "") -> str:
    return f"rate({select(series, selector)}[{RATE}])"


def quantile(q: float, histogram: Histogram, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(buckets(histogram), selector)}))"


# --- panels ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # Stat and bar-gauge panels show the latest value: one instant query instead of a range.
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    kind: str = "timeseries"  # or "stat", "bargauge"
    height: int = 8
    # Percentages (0..1) and ratios get fixed bounds, so an idle panel does not rescale to noise.
    max_value: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A query variable over one label of a metric (multi-valued, with "All" matching everything)."""

    name: str
    label: str
    query: str


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


def _target(query: Query, ref_id: str) -> prom.Dataquery:
    target = prom.Dataquery().expr(query.expr).ref_id(ref_id).datasource(DATASOURCE)
    if query.legend:
        target = target.legend_format(query.legend)
    return target.instant() if query.instant else target.range()


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> Any:
    if panel.kind == "stat":
        built: Any = (stat.Panel().reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
                      .color_mode(common.BigValueColorMode.VALUE).graph_mode(common.BigValueGraphMode.NONE))
    elif panel.kind == "bargauge":
        built = (bargauge.Panel().reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
                 .display_mode(common.BarGaugeDisplayMode.GRADIENT)
                 .orientation(common.VizOrientation.HORIZONTAL).min(0))
    elif panel.kind == "timeseries":
        built = (timeseries.Panel().fill_opacity(10)
                 .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                         .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    built = (built.id(panel_id).title(panel.title).description(panel.description).datasource(DATASOURCE)
             .unit(panel.unit).grid_pos(GridPos(h=panel.height, w=panel.width, x=x, y=y)))
    if panel.max_value is not None:
        built = built.min(0).max(panel.max_value)
    for index, query in enumerate(panel.queries):
        built = built.with_target(_target(query, chr(ord("A") + index)))
    return built


def _variable(variable: Variable) -> builders.QueryVariable:
    return (builders.QueryVariable(variable.name).label(variable.label).datasource(DATASOURCE)
            .query(variable.query).multi(True).include_all(True).all_value(ALL)
            .current(VariableOption(selected=True, text="All", value="$__all"))
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))


def build(board: Board) -> dict[str, Any]:
    """The dashboard's JSON model as plain data (what Grafana imports)."""
    dashboard = (builders.Dashboard(board.title).uid(board.uid).description(board.description).tags(TAGS)
                 .refresh(REFRESH).time("now-1h", "now").timezone("browser").editable()
                 .tooltip(DashboardCursorSync.CROSSHAIR))
    for variable in board.variables:
        dashboard = dashboard.with_variable(_variable(variable))
    next_id, y = 1, 0
    for row in board.rows:
        widths = [panel.width for panel in row.panels]
        if sum(widths) != GRID_COLUMNS:
            raise ValueError(f"{board.uid}: row {row.title!r} is {sum(widths)} columns wide, not {GRID_COLUMNS}")
        dashboard = dashboard.with_row(builders.Row(row.title).id(next_id)
                                       .grid_pos(GridPos(h=1, w=GRID_COLUMNS, x=0, y=y)))
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row.panels:
            dashboard = dashboard.with_panel(_panel(panel, next_id, x, y))
            next_id, x = next_id + 1, x + panel.width
        y += max(panel.height for panel in row.panels)
    model: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return model


def render(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


# --- the dashboards ------------------------------------------------------------------------------------------------

HITS = f'source=~"{one_of(metrics.HIT_SOURCES)}"'
FAILED = f'outcome=~"{one_of((metrics.REJECTED, metrics.DEAD_LETTERED))}"'
NOT_OK = f'outcome!="{metrics.OK}"'
# The data-path board's selection (its template variables).
NODE_DATASET = 'node=~"$node", dataset=~"$dataset"'
NODE = 'node=~"$node"'


def _cached_bytes(selector: str = "") -> str:
    # A node's memory tier holds copies of blocks its disk tier may hold too: a node counts its fullest tier.
    return f"sum by (dataset) (max by (node, dataset) ({select(gauge(metrics.CACHE_BYTES), selector)}))"


def _share(counter: Counter, sources: Sequence[str], by: str = "", selector: str = "") -> str:
    """The share of ``counter``'s rate that ``sources`` served, of every source's, per ``by`` (overall without)."""
    series, group = total(counter), f" by ({by})" if by else ""
    part = f'source=~"{one_of(sources)}"'
    part = f"{selector}, {part}" if selector else part
    return f"sum{group} ({rate(series, part)}) / sum{group} ({rate(series, selector)})"


def _hit_ratio(by: str, selector: str = "") -> str:
    return _share(metrics.BLOCK_READS, metrics.HIT_SOURCES, by, selector)


# Where read bytes came from, as Fluid's local / remote / UFS read ratios: this node's cache, peers' caches, the store.
READ_PLACES = (("local cache", metrics.HIT_SOURCES), ("peers", (metrics.PEER,)), ("store", (metrics.STORE,)))


def _read_places(by: str = "") -> tuple[Query, ...]:
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(Query(_share(metrics.READ_BYTES, sources, by), f"{prefix}{place}") for place, sources in READ_PLACES)


OVERVIEW = Board(
    uid="shoal-overview",
    title="Shoal / Overview",
    description="Datasets, how much of them is cached, how often reads hit the cache, and what fails.",
    rows=(
        Row("Datasets", (
            # max, not sum: every dataset-service replica counts the whole bucket.
            Panel("Datasets by phase", "Datasets in each phase (dataset service).",
                  (Query(f"max by (phase) ({gauge(metrics.DATASETS)})", "{{phase}}", instant=True),),
                  kind="stat", width=8),
            Panel("Cached", "Share of each dataset's bytes held in some node's cache (a node counts its fullest "
                  "tier; copies on several nodes can reach 100 % early).",
                  (Query(f"clamp_max({_cached_bytes()} / on (dataset) max by (dataset) "
                         f"({gauge(metrics.DATASET_UFS_BYTES)}), 1)", "{{dataset}}", instant=True),),
                  unit="percentunit", kind="bargauge", width=8, max_value=1),
            # sum is the one process's count: the runtime service runs once (deploy/processes/runtime.yaml: one
            # replica, Recreate; two would give one agent to two Exclusive runtimes), as does the loader.
            Panel("Runtimes by phase and cache workers", "Runtimes in each phase, and the cache workers picked "
                  "for each (runtime service).",
                  (Query(f"sum by (phase) ({gauge(metrics.RUNTIMES)})", "{{phase}}", instant=True),
                   Query(f"sum by (runtime) ({gauge(metrics.RUNTIME_WORKERS)})", "workers of {{runtime}}",
                         instant=True)),
                  kind="stat", width=8),
        )),
        Row("Cache", (
            Panel("Hit ratio", "Block reads served from memory or disk, of all block reads, per dataset.",
                  (Query(_hit_ratio("dataset"), "{{dataset}}"),), unit="percentunit", width=8, max_value=1),
            Panel("Bytes read: cache, peers, store", "Bytes read through the mounts by where they came from.",
                  (Query(f"sum by (source) ({rate(total(metrics.READ_BYTES))})", "{{source}}"),),
                  unit="Bps", width=8),
            Panel("Store vs cache bytes", "Bytes in each dataset's sources against the bytes cached of it.",
                  (Query(f"max by (dataset) ({gauge(metrics.DATASET_UFS_BYTES)})", "{{dataset}} in the store"),
                   Query(_cached_bytes(), "{{dataset}} cached")),
                  unit="bytes", width=8),
        )),
        Row("Where reads are served from", (
            Panel("Read bytes served from, overall", "Share of the bytes read through every mount that came from "
                  "the reading node's cache (memory or disk), from peers' caches, and from the object store "
                  "(Fluid's local, remote and UFS read ratios); the three add up to 1.",
                  _read_places(), unit="percentunit", width=8, max_value=1),
            Panel("Read bytes served from, per dataset", "Per dataset, share of the bytes read through its mounts "
                  "that came from the reading node's cache, from peers' caches, and from the object store.",
                  _read_places("dataset"), unit="percentunit", width=16, max_value=1),
        )),
        Row("Errors", (
            Panel("Failed commands", "Messages rejected (invalid) or dead-lettered (gave up), per consumer.",
                  (Query(f"sum by (consumer, outcome) ({rate(total(metrics.COMMANDS), FAILED)})",
                         "{{consumer}} {{outcome}}"),),
                  unit="ops", width=6),
            Panel("Object store errors", "Failed object store requests by operation and reason.",
                  (Query(f"sum by (operation, reason) ({rate(total(metrics.STORE_ERRORS))})",
                         "{{operation}} {{reason}}"),),
                  unit="ops", width=6),
            Panel("Unhealthy cache directories", "Cache directories not writable or over their quota, per node.",
                  (Query(f"sum by (node) (1 - {gauge(metrics.CACHE_DIR_HEALTHY)})", "{{node}}", instant=True),),
                  kind="stat", width=6),
            # max, not sum: every dataset-service replica reports every dataset.
            Panel("Objects left out", "Objects each dataset's last sync listed but left out of the mounted tree "
                  "(key collisions, names that cannot be files, special files, looping links): the dataset's "
                  "ObjectsSkipped condition says which.",
                  (Query(f"max by (dataset) ({gauge(metrics.DATASET_SKIPPED_OBJECTS)})", "{{dataset}}",
                         instant=True),),
                  kind="stat", width=6),
        )),
    ),
)

DATA_PATH = Board(
    uid="shoal-data-path",
    title="Shoal / Data path",
    description="Reads through the mounts of the chosen nodes and datasets: where bytes come from, how long FUSE "
                "and the object store take, the cache's tiers, peers and warm-up.",
    variables=(
        Variable("node", "Node", f"label_values({gauge(metrics.CACHE_CAPACITY_BYTES)}, node)"),
        Variable("dataset", "Dataset", f"label_values({select(gauge(metrics.CACHE_CAPACITY_BYTES), NODE)}, dataset)"),
    ),
    rows=(
        Row("Reads", (
            Panel("Block reads by source", "Blocks served from memory, disk, a peer or the store.",
                  (Query(f"sum by (source) ({rate(total(metrics.BLOCK_READS), NODE_DATASET)})", "{{source}}"),),
                  unit="ops", width=8),
            Panel("Hit ratio by node", "Block reads served from memory or disk, of all block reads.",
                  (Query(_hit_ratio("node", NODE_DATASET), "{{node}}"),), unit="percentunit", width=8, max_value=1),
            Panel("Bytes read by source", "Bytes read through the mounts by where they came from.",
                  (Query(f"sum by (source) ({rate(total(metrics.READ_BYTES), NODE_DATASET)})", "{{source}}"),),
                  unit="Bps", width=8),
        )),
        Row("FUSE", (
            Panel("FUSE request latency", "99th and 50th percentile of FUSE requests by operation.",
                  (Query(quantile(0.99, metrics.FUSE_SECONDS, "operation", NODE_DATASET), "p99 {{operation}}"),
                   Query(quantile(0.5, metrics.FUSE_SECONDS, "operation", NODE_DATASET), "p50 {{operation}}")),
                  unit="s", width=12),
            Panel("FUSE requests", "FUSE requests per second by operation.",
                  (Query(f"sum by (operation) ({rate(count(metrics.FUSE_SECONDS), NODE_DATASET)})",
                         "{{operation}}"),),
                  unit="reqps", width=12),
        )),
        Row("Object store", (
            Panel("Store request latency", "99th and 50th percentile of object store requests by operation.",
                  (Query(quantile(0.99, metrics.STORE_REQUEST_SECONDS, "operation", NODE_DATASET),
                         "p99 {{operation}}"),
                   Query(quantile(0.5, metrics.STORE_REQUEST_SECONDS, "operation", NODE_DATASET),
                         "p50 {{operation}}")),
                  unit="s", width=6),
            Panel("Store requests", "Object store requests per second by operation.",
                  (Query(f"sum by (operation) ({rate(count(metrics.STORE_REQUEST_SECONDS), NODE_DATASET)})",
                         "{{operation}}"),),
                  unit="reqps", width=6),
            Panel("Store errors", "Failed object store requests by operation and reason.",
                  (Query(f"sum by (operation, reason) ({rate(total(metrics.STORE_ERRORS), NODE_DATASET)})",
                         "{{operation}} {{reason}}"),),
                  unit="ops", width=6),
            Panel("Store bytes by purpose", "Bytes fetched from the object store for this node's readers, for "
                  "other nodes' readers (as their blocks' owner) and for DataLoads.",
                  (Query(f"sum by (purpose) ({rate(total(metrics.STORE_FETCHED_BYTES), NODE_DATASET)})",
                         "{{purpose}}"),),
                  unit="Bps", width=6),
        )),
        Row("Cache", (
            Panel("Cache bytes and capacity", "Bytes held in each tier of each node, and the tier's capacity.",
                  (Query(f"sum by (node, tier) ({select(gauge(metrics.CACHE_BYTES), NODE_DATASET)})",
                         "{{node}} {{tier}}"),
                   Query(f"sum by (node, tier) ({select(gauge(metrics.CACHE_CAPACITY_BYTES), NODE_DATASET)})",
                         "{{node}} {{tier}} capacity")),
                  unit="bytes", width=8),
            Panel("Evictions and writes dropped", "Blocks evicted per second from each tier, and blocks fetched "
                  "but not cached because the cache's writes were behind the disk.",
                  (Query(f"sum by (node, tier) ({rate(total(metrics.EVICTIONS), NODE_DATASET)})",
                         "{{node}} {{tier}}"),
                   Query(f"sum by (node) ({rate(total(metrics.CACHE_WRITES_DROPPED), NODE_DATASET)})",
                         "{{node}} writes dropped")),
                  unit="ops", width=8),
            Panel("Read-ahead memory", "Read-ahead memory held on each node, against its budget.",
                  (Query(f"sum by (node) ({select(gauge(metrics.READAHEAD_BYTES), NODE)})", "{{node}}"),
                   Query(f"sum by (node) ({select(gauge(metrics.READAHEAD_BUDGET_BYTES), NODE)})", "{{node}} budget")),
                  unit="bytes", width=8),
        )),
        Row("Peers, warm-up and health", (
            Panel("Peer requests served", "Block requests this node's peer server answered, by outcome.",
                  (Query(f"sum by (node, outcome) ({rate(total(metrics.PEER_REQUESTS), NODE_DATASET)})",
                         "{{node}} {{outcome}}"),),
                  unit="reqps", width=6),
            Panel("Bytes sent to peers", "Bytes this node's peer server sent.",
                  (Query(f"sum by (node) ({rate(total(metrics.PEER_SERVED_BYTES), NODE_DATASET)})", "{{node}}"),),
                  unit="Bps", width=6),
            Panel("Warm-up throughput", "Bytes fetched into the cache by load tasks.",
                  (Query(f"sum by (node) ({rate(total(metrics.WARMUP_BYTES), NODE_DATASET)})", "{{node}}"),),
                  unit="Bps", width=6),
            Panel("Cache directory health", "1 when a cache directory is writable and within its quota, else 0.",
                  (Query(f"min by (node, dir) ({select(gauge(metrics.CACHE_DIR_HEALTHY), NODE)})",
                         "{{node}} {{dir}}"),),
                  width=6, max_value=1),
        )),
    ),
)

CONTROL_PLANE = Board(
    uid="shoal-control-plane",
    title="Shoal / Control plane",
    description="Commands and events through the bus (rates, outcomes, handler latency, consumer lag, time since "
                "each consumer's last fetch, KV conflicts), dataset syncs, loads and cleans, and the scheduler.",
    rows=(
        Row("Bus", (
            Panel("Messages handled by outcome", "Messages every consumer handled, by outcome.",
                  (Query(f"sum by (outcome) ({rate(total(metrics.COMMANDS))})", "{{outcome}}"),),
                  unit="ops", width=8),
            Panel("Messages not handled at once", "Rejected, retried, dead-lettered and conflicting messages "
                  "per consumer.",
                  (Query(f"sum by (consumer, outcome) ({rate(total(metrics.COMMANDS), NOT_OK)})",
                         "{{consumer}} {{outcome}}"),),
                  unit="ops", width=8),
            Panel("Handler latency", "99th percentile of a handler's time per message, by consumer.",
                  (Query(quantile(0.99, metrics.HANDLER_SECONDS, "consumer"), "{{consumer}}"),),
                  unit="s", width=8),
        )),
        Row("Lag, stalls and conflicts", (
            Panel("Consumer lag", "Messages in the stream not yet delivered to each consumer, as of its last fetch: "
                  "it stands still while a handler is stuck (see the next panel).",
                  (Query(f"max by (consumer) ({gauge(metrics.CONSUMER_LAG)})", "{{consumer}}"),),
                  width=8),
            # max: of a durable's replicas, the one stuck longest.
            Panel("Time since each consumer's last fetch", "Seconds since each consumer last fetched (its slowest "
                  "process): up to a second or so while it keeps up or idles. A line that keeps growing is a "
                  "consumer stuck in a handler, holding what it fetched while commands wait behind it, or one that "
                  "cannot reach its durable.",
                  (Query(f"max by (consumer) ({gauge(metrics.CONSUMER_FETCH_AGE)})", "{{consumer}}"),),
                  unit="s", width=8),
            Panel("KV conflicts", "Compare-and-set writes that lost to another writer, by bucket.",
                  (Query(f"sum by (bucket) ({rate(total(metrics.KV_CONFLICTS))})", "{{bucket}}"),),
                  unit="ops", width=8),
        )),
        Row("Syncs and elastic cache", (
            Panel("Dataset sync time", "95th percentile of a dataset sync (list the sources, save the manifest), "
                  "by outcome.",
                  (Query(quantile(0.95, metrics.DATASET_SYNC_SECONDS, "outcome"), "p95 {{outcome}}"),),
                  unit="s", width=6),
            Panel("Objects per dataset", "Objects in each dataset's manifest at its last sync.",
                  (Query(f"max by (dataset) ({gauge(metrics.DATASET_OBJECTS)})", "{{dataset}}"),),
                  width=6),
            Panel("autoSync listings", "Periodic listings by outcome: changed (a new manifest reached the mounts), "
                  "unchanged (nothing written), failed.",
                  (Query(f"sum by (outcome) ({rate(total(metrics.DATASET_AUTOSYNCS))})", "{{outcome}}"),),
                  unit="ops", width=6),
            Panel("Autoscaler changes", "Cache workers the autoscaler added (up) or removed (down).",
                  (Query(f"sum by (direction) ({rate(total(metrics.RUNTIME_AUTOSCALES))})", "{{direction}}"),),
                  unit="ops", width=6),
        )),
        Row("Loads and cleans", (
            # One loader (deploy/processes/loader.yaml: one replica, Recreate): sum is its count.
            Panel("Operations by phase", "DataLoads and DataCleans by kind and phase.",
                  (Query(f"sum by (kind, phase) ({gauge(metrics.OPERATIONS)})", "{{kind}} {{phase}}",
                         instant=True),),
                  kind="stat", width=6),
            Panel("Progress", "Bytes done of the bytes planned by each operation's current run.",
                  (Query(f"sum by (kind, operation) ({gauge(metrics.OPERATION_BYTES_DONE)}) / sum by (kind, "
                         f"operation) ({gauge(metrics.OPERATION_BYTES_PLANNED)})", "{{kind}} {{operation}}",
                         instant=True),),
                  unit="percentunit", kind="bargauge", width=6, max_value=1),
            Panel("Warm-up throughput", "Bytes load tasks fetch into the caches, per dataset.",
                  (Query(f"sum by (dataset) ({rate(total(metrics.WARMUP_BYTES))})", "{{dataset}}"),),
                  unit="Bps", width=6),
            Panel("Finished runs", "Operation runs finished per second, by kind and phase (Complete, Failed).",
                  (Query(f"sum by (kind, phase) ({rate(total(metrics.OPERATION_RUNS))})", "{{kind}} {{phase}}"),),
                  unit="ops", width=6),
        )),
        Row("Scheduler", (
            Panel("Decisions", "Scheduling questions answered, by way (nats, webhook, filter, prioritize) and "
                  "outcome.",
                  (Query(f"sum by (way, outcome) ({rate(total(metrics.DECISIONS))})", "{{way}} {{outcome}}"),),
                  unit="ops", width=6),
            Panel("Decision latency", "99th percentile of the time to answer a scheduling question, by way.",
                  (Query(quantile(0.99, metrics.DECISION_SECONDS, "way"), "{{way}}"),),
                  unit="s", width=6),
            Panel("Inventory fold lag", "Age of the newest inventory event when the scheduler folded it.",
                  (Query(f"max({gauge(metrics.FOLD_LAG_SECONDS)})", "fold lag"),),
                  unit="s", width=6),
            # max, not sum, of the events: every scheduler replica folds every one (and the dataset service counts
            # another agent's too); the snapshot requests are each replica's own.
            Panel("Inventory events", "Inventory events folded or ignored by reason, snapshot requests sent, and "
                  "events ignored as another agent's of a node name two agents share (scheduler and dataset "
                  "service, by node).",
                  (Query(f"max by (outcome) ({rate(total(metrics.FOLD_EVENTS))})", "{{outcome}}"),
                   Query(f"sum({rate(total(metrics.SNAPSHOT_REQUESTS))})", "snapshot requests"),
                   Query(f"max by (node) ({rate(total(metrics.INVENTORY_OTHER_INSTANCE))})",
                         "another agent as {{node}}")),
                  unit="ops", width=6),
        )),
    ),
)

BOARDS = (OVERVIEW, DATA_PATH, CONTROL_PLANE)


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → JSON model of every dashboard."""
    return {board.filename: build(board) for board in BOARDS}


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """``expr`` as Prometheus itself would get it from Grafana: template variables at "All" (their ``all_value``)
    and ``$__rate_interval`` a fixed window. For checking queries outside Grafana."""
    expr = expr.replace(RATE, rate_interval)
    # Longest first, so a variable whose name starts another's never eats part of it.
    for variable in sorted({v.name for board in BOARDS for v in board.variables}, key=len, reverse=True):
        expr = expr.replace(f"${variable}", ALL)
    return expr


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard model, rows included, also panels nested in collapsed rows."""
    for panel in model.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def stale(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """The dashboard files that are missing or differ from a fresh build."""
    out = []
    for name, model in dashboards().items():
        path = directory / name
        if not path.exists() or path.read_text() != render(model):
            out.append(name)
    return out


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in dashboards().items():
        path = directory / name
        path.write_text(render(model))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.grafana.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the committed JSON is current")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for name in out_of_date:
            print(f"{DASHBOARDS_DIR / name} is not what deploy/grafana/build.py builds; run `make dashboards`",
                  file=sys.stderr)
        return 1 if out_of_date else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
