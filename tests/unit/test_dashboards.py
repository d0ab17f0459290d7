"""The Grafana dashboards (``deploy/grafana``) without Grafana: the committed JSON is what the builder makes, its
structure is sound (unique panel ids, the 24-column grid, every target with a refId and an expression on the
provisioned datasource), every metric it names is one of ``libs.metrics`` as Prometheus scrapes it, every label it
names is one its metrics have, and every expression parses (``promtool check rules``, each written as a recording
rule). That the queries return data from the running services is ``tests/integration/test_dashboards_live.py``'s
part.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from deploy.grafana import build
from libs import metrics
from libs.cli.stack.prometheus import find_tool

PROVISIONING = build.HERE / "provisioning"


def targets(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query of a dashboard."""
    return [(panel["title"], target) for panel in build.panels(model) for target in panel.get("targets") or []]


def every_expr() -> list[str]:
    return [target["expr"] for model in build.dashboards().values() for _, target in targets(model)]


def exposed_names() -> set[str]:
    """Every series name prometheus-client exposes for the instruments of ``libs.metrics``."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names |= {f"{value._name}_total", f"{value._name}_created"}
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_{suffix}" for suffix in ("bucket", "count", "sum", "created")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def test_the_committed_dashboards_are_what_the_builder_makes() -> None:
    assert build.stale() == [], "run `make dashboards` and commit deploy/grafana/dashboards/"
    committed = sorted(path.name for path in build.DASHBOARDS_DIR.glob("*.json"))
    assert committed == sorted(build.dashboards()), "a dashboard file the builder does not make"


@pytest.mark.parametrize("name", sorted(build.dashboards()))
def test_each_dashboard_is_structurally_sound(name: str) -> None:
    model = json.loads((build.DASHBOARDS_DIR / name).read_text())
    assert model["uid"] and model["title"] and model["panels"]
    every = list(build.panels(model))
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}: {ids}"
    assert all(isinstance(panel_id, int) and panel_id > 0 for panel_id in ids)
    occupied: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= build.GRID_COLUMNS, f"{panel['title']} leaves the 24-column grid: {grid}"
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": build.DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == build.DATASOURCE_UID
    for variable in model.get("templating", {}).get("list", []):
        assert variable["datasource"]["uid"] == build.DATASOURCE_UID
        assert f"${variable['name']}" in json.dumps([t for _, t in targets(model)]), "a variable no query uses"


def test_the_datasource_and_dashboard_provider_are_provisioned() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["uid"] == build.DATASOURCE_UID and source["type"] == "prometheus" and source["url"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "shoal.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_every_query_names_only_metrics_of_libs_metrics_and_every_metric_is_shown() -> None:
    known = exposed_names()
    named = {name for expr in every_expr() for name in re.findall(r"\bshoal_\w+", expr)}
    assert named - known == set(), "a dashboard names a metric that libs.metrics does not expose"
    shown = {name.removesuffix("_total") for name in named} | {re.sub(r"_(bucket|count|sum)$", "", n) for n in named}
    instruments = {value._name for value in vars(metrics).values() if isinstance(value, Counter | Gauge | Histogram)}
    assert instruments - shown == set(), "a metric of libs.metrics is on no dashboard: add a panel in build.py"


def instruments_by_series() -> dict[str, Counter | Gauge | Histogram]:
    """Every series name a query may use → its instrument of ``libs.metrics``."""
    found: dict[str, Counter | Gauge | Histogram] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            found[f"{value._name}_total"] = value
        elif isinstance(value, Histogram):
            found |= {f"{value._name}_{suffix}": value for suffix in ("bucket", "count", "sum")}
        elif isinstance(value, Gauge):
            found[value._name] = value
    return found


def every_query() -> list[str]:
    """Every panel query and every variable's ``label_values(...)`` query."""
    variables = [variable["query"] for model in build.dashboards().values()
                 for variable in model.get("templating", {}).get("list", [])]
    return every_expr() + variables


def label_problems(expr: str) -> list[str]:
    """What in ``expr`` names a label its metrics do not have: in a selector, a ``by``/``on`` clause or a
    ``label_values`` variable (``le`` is every histogram bucket's)."""
    known = instruments_by_series()
    used = {name: known[name] for name in re.findall(r"\bshoal_\w+", expr) if name in known}
    labels = {label for instrument in used.values() for label in instrument._labelnames}
    if any(name.endswith("_bucket") for name in used):
        labels.add("le")
    problems = []
    for name, selector in re.findall(r"\b(shoal_\w+)\{([^}]*)\}", expr):
        keys = {match.group(1) for match in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", selector)}
        problems += [f"{expr}: {name} has no label {key}" for key in sorted(keys - set(used[name]._labelnames))]
    for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        keys = {key.strip() for key in clause.split(",") if key.strip()}
        problems += [f"{expr}: none of its metrics has label {key}" for key in sorted(keys - labels)]
    problems += [f"{expr}: none of its metrics has label {label}"
                 for label in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr) if label not in labels]
    return problems


def test_every_query_uses_only_labels_its_metrics_have() -> None:
    """Statically, what the live test finds as an empty panel: a label the code never sets."""
    assert [problem for expr in every_query() for problem in label_problems(expr)] == []


def test_a_label_the_metric_does_not_have_is_caught() -> None:
    assert label_problems('sum by (node) (rate(shoal_block_reads_total{source="disk"}[1m]))') == []
    assert label_problems('sum by (le, way) (rate(shoal_scheduler_decision_duration_seconds_bucket[1m]))') == []
    assert len(label_problems('sum by (tier) (rate(shoal_block_reads_total{sources="disk"}[1m]))')) == 2
    assert label_problems("label_values(shoal_readahead_bytes, dataset)") != []


def test_variables_and_the_rate_interval_are_all_substituted() -> None:
    for expr in every_expr():
        assert "$" not in build.concrete(expr), expr


@pytest.mark.needs("prometheus")
def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = find_tool("promtool")
    assert promtool is not None
    rules = [{"record": f"shoal:dashboard_query_{index}", "expr": build.concrete(expr)}
             for index, expr in enumerate(every_expr())]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.needs("prometheus")
def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail: a query with a typo does not pass it."""
    promtool = find_tool("promtool")
    assert promtool is not None
    path = tmp_path / "rules.yaml"
    broken = build.concrete(every_expr()[0]).replace(")", "", 1)
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r:x", "expr": broken}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_a_row_wider_than_the_grid_is_refused() -> None:
    wide = build.Board("x", "X", "", (build.Row("r", (build.Panel("p", "", (build.Query("up"),), width=16),
                                                      build.Panel("q", "", (build.Query("up"),), width=16))),))
    with pytest.raises(ValueError, match="32 columns wide"):
        build.build(wide)


def test_series_names_follow_prometheus_client_and_a_wrong_kind_is_refused() -> None:
    assert build.total(metrics.BLOCK_READS) == "shoal_block_reads_total"
    assert build.buckets(metrics.FUSE_SECONDS) == "shoal_fuse_request_duration_seconds_bucket"
    assert build.gauge(metrics.CACHE_BYTES) == "shoal_cache_bytes"
    with pytest.raises(TypeError, match="is a counter, not a histogram"):
        build.count(metrics.BLOCK_READS)  # type: ignore[arg-type]


def panel_exprs(board: build.Board, title: str) -> list[str]:
    return [query.expr for row in board.rows for panel in row.panels if panel.title == title
            for query in panel.queries]


@pytest.mark.needs("prometheus")
def test_events_every_scheduler_replica_folds_are_shown_once(tmp_path: Path) -> None:
    """Every scheduler replica folds every inventory event (deploy/ runs two), and the dataset service counts the
    events of another agent process too: the panel shows the events' rate, not that rate once per process. Evaluated
    by Prometheus's own engine (``promtool test rules``) over the series two replicas and a dataset service scrape
    as. Before, the panel summed them: twice the events folded, three times those of another agent."""
    folded, _snapshots, other = panel_exprs(build.CONTROL_PLANE, "Inventory events")
    fold_events, other_instance = build.total(metrics.FOLD_EVENTS), build.total(metrics.INVENTORY_OTHER_INSTANCE)
    series = [*({"series": f'{fold_events}{{outcome="folded", instance="{replica}"}}', "values": "0+600x10"}
                for replica in ("scheduler-0", "scheduler-1")),
              *({"series": f'{other_instance}{{node="node-z", instance="{process}"}}', "values": "0+60x10"}
                for process in ("scheduler-0", "scheduler-1", "dataset-0"))]
    promtool_test(tmp_path, series, [(folded, [{"labels": '{outcome="folded"}', "value": 10}]),
                                     (other, [{"labels": '{node="node-z"}', "value": 1}])])


def promtool_test(tmp_path: Path, series: list[dict[str, str]],
                  expected: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Prometheus's own engine (``promtool test rules``) evaluates each expected query over ``series`` (one sample a
    minute) at 10m, with a 5m rate window."""
    promtool = find_tool("promtool")
    assert promtool is not None
    tests = {"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": build.concrete(expr, "5m"), "eval_time": "10m", "exp_samples": samples}
        for expr, samples in expected]}]}
    path = tmp_path / "panel.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.needs("prometheus")
def test_read_bytes_are_shown_as_shares_of_local_cache_peers_and_store(tmp_path: Path) -> None:
    """Fluid's local / remote / UFS read ratios from the agents' bytes by source: memory and disk are the reading
    node's cache, peer its peers', store the object store; per dataset and overall, adding up to 1. Before, the
    Overview showed the bytes' rates only, and where a dataset's reads came from was left to mental arithmetic."""
    read_bytes = build.total(metrics.READ_BYTES)
    per_minute = {  # (node, dataset, source) → bytes a minute
        ("node-a", "ns/one", metrics.MEMORY): 60, ("node-a", "ns/one", metrics.DISK): 60,
        ("node-b", "ns/one", metrics.PEER): 60, ("node-b", "ns/one", metrics.STORE): 60,
        ("node-a", "ns/two", metrics.DISK): 180, ("node-a", "ns/two", metrics.PEER): 0,
        ("node-b", "ns/two", metrics.STORE): 60,
    }
    series = [{"series": f'{read_bytes}{{node="{node}", dataset="{dataset}", source="{source}", instance="{node}"}}',
               "values": f"0+{amount}x10"} for (node, dataset, source), amount in per_minute.items()]
    local, peers, store = panel_exprs(build.OVERVIEW, "Read bytes served from, overall")
    by_dataset = panel_exprs(build.OVERVIEW, "Read bytes served from, per dataset")
    # Overall: 300 of 480 bytes a minute from a local cache, 60 from peers, 120 from the store.
    expected: list[tuple[str, list[dict[str, Any]]]] = [
        (local, [{"labels": "{}", "value": 0.625}]), (peers, [{"labels": "{}", "value": 0.125}]),
        (store, [{"labels": "{}", "value": 0.25}])]
    for expr, one, two in zip(by_dataset, (0.5, 0.25, 0.25), (0.75, 0.0, 0.25), strict=True):
        expected.append((expr, [{"labels": '{dataset="ns/one"}', "value": one},
                                {"labels": '{dataset="ns/two"}', "value": two}]))
    promtool_test(tmp_path, series, expected)


@pytest.mark.needs("prometheus")
def test_a_consumer_stuck_on_one_replica_shows_its_stall(tmp_path: Path) -> None:
    """Two dataset-service replicas share the durable ``dataset-commands``: one is stuck in a handler (two minutes
    since its last fetch, its lag at 0 from that fetch), the other keeps up. The panel shows the stuck one's two
    minutes per durable; the lag panel, by design, cannot."""
    (stall,) = panel_exprs(build.CONTROL_PLANE, "Time since each consumer's last fetch")
    age = build.gauge(metrics.CONSUMER_FETCH_AGE)
    series = [{"series": f'{age}{{consumer="dataset-commands", instance="dataset-0"}}', "values": "0+12x10"},
              {"series": f'{age}{{consumer="dataset-commands", instance="dataset-1"}}', "values": "0.5x10"}]
    promtool_test(tmp_path, series, [(stall, [{"labels": '{consumer="dataset-commands"}', "value": 120}])])
