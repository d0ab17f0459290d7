"""What ``shoal get``, ``shoal describe`` and ``shoal events`` print: kubectl-like tables, JSON/YAML documents,
describe text, JSON lines.

Pure: records in, text out, no NATS, no terminal and no clock (``now`` is a parameter). Decides the columns
(Fluid's ``kubectl get dataset`` and ``kubectl get alluxioruntime`` columns, without AGE: those records carry no
creation time; Fluid's DataLoad columns DATASET, PHASE, AGE, DURATION plus Shoal's PROGRESS for DataLoad and
DataClean); that ``-o yaml`` and ``-o json`` print each record as the Kubernetes object it stands for
(``record_object``: apiVersion, kind, metadata, spec, status; several as a ``kind: List``), which ``shoal apply -f``
takes back as a no-op; and that ``-o record`` prints the records themselves, every field, defaults included.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from libs.crds import operation_duration, shoal_status
from libs.documents import LIST_API_VERSION, LIST_KIND, without_nulls
from libs.events.common import format_bytes
from libs.events.dataset import Condition, DatasetRecord, NodeCache
from libs.events.operation import NodeProgress, OperationRecord, Progress
from libs.events.runtime import CacheWorker, RuntimeRecord, RuntimeStatus
from libs.kube import SHOAL_RESOURCES
from libs.redact import shown_text

# Wide enough that rich never wraps or truncates a cell: scripts read these lines, like kubectl's.
_UNLIMITED_WIDTH = 100_000
# Ready nodes a table or describe names before "and N more" (kubectl names three endpoints): a runtime served by
# thousands of agents made a line of tens of kilobytes. ``-o json``/``-o yaml`` keep the record's full list.
READY_NODES_SHOWN = 3
# After a cached figure that is partial: a node still counts the blocks on its disk after a restart
# (``NodeCache.counting``): on describe's row of that node, and on the dataset's CACHED in ``get``.
COUNTING_MARK = " (counting)"


def full_builtins(value: Any) -> Any:
    """``value`` as JSON-ready builtins with every field, defaults too (``to_builtins`` drops omitted defaults)."""
    if isinstance(value, msgspec.Struct):
        return {field.encode_name: full_builtins(getattr(value, field.name))
                for field in msgspec.structs.fields(value)}
    if isinstance(value, dict):
        return {str(key): full_builtins(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [full_builtins(item) for item in value]
    return msgspec.to_builtins(value)


def spec_builtins(value: Any) -> Any:
    """``value`` as JSON-ready builtins for an object a user edits: a field at its default is shown when it says
    something (``placement: Exclusive``, a tier's watermarks), and left out when it is empty (``path: ''``,
    ``options: {}``, ``readOnly: false``, a null), as Go's ``omitempty`` leaves such fields out of a Kubernetes
    object. Only a field equal to its default is left out, so reading the result back gives ``value`` again; the
    entries of a mapping (options, labels, nodeAffinity) are the user's and all kept."""
    if isinstance(value, msgspec.Struct):
        shown = {}
        for field in msgspec.structs.fields(value):
            item = getattr(value, field.name)
            rendered = spec_builtins(item)
            default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
            if _empty(rendered) and item == default:
                continue
            shown[field.encode_name] = rendered
        return shown
    if isinstance(value, dict):
        return {str(key): spec_builtins(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [spec_builtins(item) for item in value]
    return msgspec.to_builtins(value)


def _empty(value: Any) -> bool:
    """What Go's ``omitempty`` leaves out: null, false, zero, and an empty text, list or mapping."""
    return value is None or value is False or (type(value) in (int, float) and value == 0) or value in ("", [], {})


# --- tables ---


# kubectl's spelling of ESC (cli-runtime's terminal escaper). The tab is kept: it moves the cursor on, nothing more.
_KUBECTL_SPELLINGS = {"\x1b": "^["}
# Where kubectl cuts a table cell: a line break, \v too (a terminal moves down a line for it).
_LINE_BREAK = re.compile(r"[\n\r\f\v]")


def terminal_text(text: str) -> str:
    """``text`` with every character a terminal would act on shown rather than acted on (``libs.redact.shown_text``,
    ESC as kubectl shows it): a status message or an annotation may quote what another system wrote (a store's
    error, an object's key), and an escape sequence in it would reach the terminal (retitle it, clear it), a line
    break split a line a script reads as one, and a bidirectional override show its text in another order."""
    return shown_text(text, keep="\t", spellings=_KUBECTL_SPELLINGS)


def cell_text(text: str) -> str:
    """A table cell on one line, as kubectl prints one: up to its first line break, then "...". A tab is a space
    there: rich, which lays the table out, dropped a cell's text from its first tab on."""
    first, *rest = _LINE_BREAK.split(text, maxsplit=1)
    return terminal_text(first).replace("\t", " ") + ("..." if rest else "")


def table_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A borderless table, three spaces between columns, no trailing spaces (kubectl's layout); one line per row."""
    table = Table(box=None, pad_edge=False, padding=(0, 3, 0, 0), show_edge=False, header_style=None)
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        # Text, not str: a name with brackets must not be read as rich markup.
        table.add_row(*(Text(cell_text(cell)) for cell in row))
    buffer = io.StringIO()
    Console(file=buffer, width=_UNLIMITED_WIDTH, highlight=False, no_color=True, emoji=False,
            force_terminal=False).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def dataset_table(records: Sequence[DatasetRecord], *, wide: bool, show_namespace: bool) -> str:
    headers = ["NAME", "UFS TOTAL SIZE", "CACHED", "CACHE CAPACITY", "CACHED PERCENTAGE", "PHASE"]
    if wide:
        # Reads served by a cache (the node's own or a peer's), by the node's own, by a peer's: Fluid's ratios.
        headers += ["FILE NUM", "CACHE HIT RATIO", "LOCAL HIT RATIO", "REMOTE HIT RATIO", "MESSAGE"]
    rows = []
    for record in records:
        status = record.status
        states = status.cache_states
        # A node still counting its blocks after a restart: the figure grows for seconds, and is no lost cache.
        cached = states.cached + (COUNTING_MARK if any(node.counting for node in status.nodes) else "")
        row = [record.dataset.metadata.name, status.ufs_total, cached, states.cache_capacity,
               states.cached_percentage, status.phase]
        if wide:
            row += [str(status.file_num), states.cache_hit_ratio, states.local_hit_ratio, states.remote_hit_ratio,
                    status.message]
        rows.append(row)
    return _with_namespace(headers, rows, [r.dataset.metadata.namespace for r in records], show_namespace)


def runtime_table(records: Sequence[RuntimeRecord], *, wide: bool, show_namespace: bool) -> str:
    headers = ["NAME", "READY", "CACHE CAPACITY", "BLOCK SIZE", "PHASE"]
    if wide:
        headers += ["NODES", "WORKERS", "MESSAGE"]
    rows = []
    for record in records:
        status = record.status
        row = [record.runtime.metadata.name,
               f"{status.worker_number_ready}/{status.desired_worker_number_scheduled}",
               status.cache_capacity, runtime_block_size(record), status.phase]
        if wide:
            row += [ready_nodes_text(status), workers_text(status.workers), status.message]
        rows.append(row)
    return _with_namespace(headers, rows, [r.runtime.metadata.namespace for r in records], show_namespace)


def ready_nodes_text(status: RuntimeStatus) -> str:
    """The first few ready nodes, then how many more: ``node-a,node-b,node-c and 997 more``."""
    # A record written before readyNodeCount existed has the list alone.
    total = max(status.ready_node_count, len(status.ready_nodes))
    shown = status.ready_nodes[:READY_NODES_SHOWN]
    more = total - len(shown)
    if not shown:
        return f"{more} nodes" if more else ""
    return ",".join(shown) + (f" and {more} more" if more > 0 else "")


def workers_text(workers: Sequence[CacheWorker]) -> str:
    """The cache workers in pick order, a worker that is not ready marked so: ``node-1,node-2(not ready)``."""
    return ",".join(worker.node if worker.ready else f"{worker.node}(not ready)" for worker in workers)


def runtime_block_size(record: RuntimeRecord) -> str:
    """The size the runtime service settled on, else the one asked for in the spec."""
    if record.status.block_size_bytes > 0:
        return format_bytes(record.status.block_size_bytes)
    return str(record.runtime.spec.block_size)


def _with_namespace(headers: list[str], rows: list[list[str]], namespaces: list[str], show: bool) -> str:
    if show:  # first, like kubectl -A, so rows of one namespace read together
        headers = ["NAMESPACE", *headers]
        rows = [[namespace, *row] for namespace, row in zip(namespaces, rows, strict=True)]
    return table_text(headers, rows)


# --- DataLoad and DataClean ---


def operation_table(records: Sequence[OperationRecord], *, now: datetime, wide: bool, show_namespace: bool) -> str:
    """Fluid's DataLoad columns (DATASET, PHASE, AGE, DURATION) plus PROGRESS; wide adds how it runs and why."""
    headers = ["NAME", "DATASET", "PHASE", "AGE", "DURATION", "PROGRESS"]
    if wide:
        headers += ["POLICY", "RUNS", "RATE", "ETA", "MESSAGE"]
    rows = []
    for record in records:
        status = record.status
        row = [record.metadata.name, operation_dataset(record), status.phase, age_text(record.created_at, now),
               operation_duration(status) or "-", progress_text(status.progress, clean=record.clean is not None)]
        if wide:
            policy: str = record.load.policy if record.load is not None else "-"  # a clean runs once
            if record.load is not None and record.load.schedule:
                policy += f" ({record.load.schedule})"
            row += [policy, str(status.runs), rate_text(status.progress.rate_bytes_per_second),
                    eta_text(status.progress.eta_seconds), status.message or status.waiting_for]
        rows.append(row)
    return _with_namespace(headers, rows, [r.metadata.namespace for r in records], show_namespace)


def operation_dataset(record: OperationRecord) -> str:
    """The target dataset's name, with its namespace when that is not the operation's own."""
    spec = record.load or record.clean
    if spec is None:
        return "<none>"
    ref = spec.dataset
    return ref.name if ref.namespace in ("", record.metadata.namespace) else f"{ref.namespace}/{ref.name}"


def progress_text(progress: Progress, *, clean: bool = False) -> str:
    """``812/1000 files, 8.00GiB/10.00GiB`` (bytes alone without a file count); a DataClean's ``2/3 files,
    5.00MiB/8.00MiB freed`` (``5.00MiB freed`` from a loader or agents that gave no totals); ``-`` before the loader
    has planned the run (no totals yet, or for a clean no node's part yet)."""
    if clean:
        # A clean's bytes total is what its nodes found cached to free, known once their parts start (a loader or
        # agent before it said none): the load's rule below showed "-" for such a clean, even one that freed
        # gigabytes. Blocks it named that were not cached are done without freeing anything.
        if not progress.nodes and not progress.bytes_done:
            return "-"
        freed = format_bytes(max(0, progress.bytes_done - progress.bytes_skipped))
        of = f"/{format_bytes(progress.bytes_total)}" if progress.bytes_total else ""
        files = f"{progress.files_done}/{progress.files_total} files, " if progress.files_total else ""
        return f"{files}{freed}{of} freed"
    if progress.files_total == 0 and progress.bytes_total == 0:
        return "-"
    sizes = f"{format_bytes(progress.bytes_done)}/{format_bytes(progress.bytes_total)}"
    return f"{progress.files_done}/{progress.files_total} files, {sizes}" if progress.files_total else sizes


def rate_text(bytes_per_second: float) -> str:
    return f"{format_bytes(int(bytes_per_second))}/s" if bytes_per_second > 0 else "-"


def eta_text(seconds: float | None) -> str:
    return "-" if seconds is None else duration_text(seconds)


def duration_text(seconds: float) -> str:
    """kubectl's short human durations: 45s, 5m30s, 3h20m, 4d5h (the two largest units, the second when it matters)."""
    total = max(0, int(seconds))
    if total < 120:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 10:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 3:
        return f"{hours * 60 + minutes}m"
    if hours < 8:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    if days < 2:
        return f"{days * 24 + hours}h"
    if days < 8:
        return f"{days}d{hours}h" if hours else f"{days}d"
    return f"{days}d"


def age_text(created_at: str, now: datetime) -> str:
    """How long ago an RFC 3339 time was; ``<unknown>`` when the record has none (or an unreadable one),
    ``<invalid>`` when it is in the future."""
    try:
        created = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    if created.tzinfo is None or now.tzinfo is None:
        return "<unknown>"
    seconds = (now - created).total_seconds()
    # In the future: another host's clock is ahead. kubectl's HumanDuration takes a second of it as now and says
    # "<invalid>" beyond, rather than "0s", which would say it was just created whenever it was.
    if int(seconds) < -1:
        return "<invalid>"
    return duration_text(seconds)


def describe_operation(record: OperationRecord) -> str:
    """Spec, status (without what is shown apart), progress per node, then conditions."""
    status = full_builtins(record.status)
    conditions = record.status.conditions
    status.pop("conditions", None)
    status["progress"].pop("nodes", None)  # a table of its own below
    spec = full_builtins(record.load if record.load is not None else record.clean)
    nodes = node_progress_table(record.status.progress.nodes, record.status.phase)
    return _describe(record.kind, record.metadata, record.generation, spec, status, conditions,
                     extra=["Progress by node:", nodes],
                     created=record.created_at or "<unknown>")


# A node whose parts the loader moved to the ring (it left it under the load): not done by it, and not waited for.
MOVED_STATE = "Moved to the ring"


def node_progress_table(nodes: Sequence[NodeProgress], phase: str = "Executing") -> str:
    """Each node's part of the run in ``phase`` (the operation's): a node of a run that ended (Complete, Failed,
    or a Pending one waiting for its next run) is no longer working, whether or not it finished."""
    if not nodes:
        return "  <none>"
    # STATE: a node with nothing to do (a clean's part on a node that holds none of it: total 0) shows no PERCENT;
    # this says whether the run still waits for it.
    rows = [[n.node, format_bytes(n.bytes_done), format_bytes(n.bytes_total), percent_text(n.bytes_done,
                                                                                          n.bytes_total),
             MOVED_STATE if n.moved else "Done" if n.done else "Working" if phase == "Executing" else "Stopped"]
            for n in nodes]
    return _indented(table_text(["NODE", "DONE", "TOTAL", "PERCENT", "STATE"], rows))


def percent_text(done: int, total: int) -> str:
    return f"{100 * done / total:.1f}%" if total > 0 else "-"


# --- machine-readable ---

AnyRecord = DatasetRecord | RuntimeRecord | OperationRecord
_RESOURCES = {resource.kind: resource for resource in SHOAL_RESOURCES}


def record_object(record: AnyRecord) -> dict[str, Any]:
    """The record as the Kubernetes object of Shoal's API group it stands for (``-o yaml``, ``-o json``): what
    ``kubectl get datasets.shoal.io NAME -o yaml`` shows of it under shoal-bridge, and what ``shoal apply -f`` takes
    back unchanged.

    ``metadata``: the user's (name, namespace, labels, annotations) and, as the API server adds them, the record's
    ``generation`` and an operation's ``creationTimestamp`` (a dataset's or runtime's record has none). ``spec``:
    ``spec_builtins``, the defaults that say something spelled out (a reader sees what Shoal does), empty ones left
    out. ``status``: ``libs.crds.shoal_status``, the status the bridge writes to the custom resource.
    The service's bookkeeping (command sequence, incarnation, resync ids, trace context) is no part of the object:
    ``-o record`` prints the record whole.
    """
    spec: Any
    if isinstance(record, DatasetRecord):
        kind, meta, spec, created = "Dataset", record.dataset.metadata, record.dataset.spec, ""
    elif isinstance(record, RuntimeRecord):
        kind, meta, spec, created = "Runtime", record.runtime.metadata, record.runtime.spec, ""
    else:
        kind, meta, created = record.kind, record.metadata, record.created_at
        spec = record.load if record.load is not None else record.clean
    resource = _RESOURCES[kind]
    metadata: dict[str, Any] = {"name": meta.name, "namespace": meta.namespace, "generation": record.generation}
    if created:
        metadata["creationTimestamp"] = created
    if meta.labels:
        metadata["labels"] = dict(meta.labels)
    if meta.annotations:
        metadata["annotations"] = dict(meta.annotations)
    return {
        "apiVersion": resource.api_version,
        "kind": kind,
        "metadata": metadata,
        "spec": spec_builtins(spec) if spec is not None else {},
        "status": without_nulls(shoal_status(resource, record.status)),
    }


def objects_document(records: Sequence[AnyRecord], single: bool) -> dict[str, Any]:
    """One object alone when asked for by name, else a ``kind: List`` of them, as kubectl prints either (and as
    ``shoal apply -f`` reads either back)."""
    if single and len(records) == 1:
        return record_object(records[0])
    return {"apiVersion": LIST_API_VERSION, "kind": LIST_KIND, "items": [record_object(r) for r in records]}


def records_document(records: Sequence[AnyRecord], single: bool) -> Any:
    """``-o record``: the KV records as the services keep them, every field, defaults included; one alone when asked
    for by name, else ``{"items": [...]}``."""
    if single and len(records) == 1:
        return full_builtins(records[0])
    return {"items": [full_builtins(record) for record in records]}


def to_json(document: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(document), indent=2).decode() + "\n"


def to_yaml(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)


class NotJson(ValueError):
    """A message that is no JSON document; its text says why without quoting it (it may hold anything)."""


def json_line(data: bytes) -> str:
    """One message as one line of JSON (``shoal events`` prints JSON lines); ``NotJson`` when it is none.

    Another system may publish on a fact subject: a pretty-printed document is put on one line (its newlines can only
    be whitespace between tokens), and one on a line already is printed as it came.
    """
    if not data.strip():
        raise NotJson("empty")
    try:
        document = msgspec.json.decode(data)
    except UnicodeDecodeError as err:
        raise NotJson(f"not UTF-8 at byte {err.start}") from err
    except msgspec.DecodeError as err:
        raise NotJson(str(err)) from err
    if b"\n" in data or b"\r" in data:
        return msgspec.json.encode(document).decode()
    return data.decode().strip()


# --- describe ---


def describe_dataset(record: DatasetRecord) -> str:
    status = full_builtins(record.status)
    conditions = record.status.conditions
    status.pop("conditions", None)
    status.pop("nodes", None)  # a table of its own below
    return _describe("Dataset", record.dataset.metadata, record.generation, record.dataset.spec, status, conditions,
                     extra=["Cache by node:", node_cache_table(record.status.nodes)])


def node_cache_table(nodes: Sequence[NodeCache]) -> str:
    """Where the dataset's cached bytes are, how each node's reads were served (own cache, peers, store), and what
    DataLoads fetched into it from the store."""
    if not nodes:
        return "  <none>"
    rows = [[n.node, format_bytes(n.cached_bytes) + (COUNTING_MARK if n.counting else ""),
             format_bytes(n.local_read_bytes), format_bytes(n.remote_read_bytes), format_bytes(n.store_read_bytes),
             format_bytes(n.loaded_bytes)]
            for n in nodes]
    text = _indented(table_text(["NODE", "CACHED", "LOCAL READS", "REMOTE READS", "STORE READS", "LOADED"], rows))
    counting = [n.node for n in nodes if n.counting]
    if counting:  # after a crash the count takes seconds: a figure that grows meanwhile is no lost cache
        where = f"node{'s' if len(counting) > 1 else ''} {', '.join(counting)}"
        text += (f"\n  Counting blocks on {where} after a restart: CACHED there, and the dataset's cached and "
                 "cachedPercentage, are partial until the count ends.")
    return text


def describe_runtime(record: RuntimeRecord) -> str:
    """Spec, status, then the cache workers (ready, peer endpoint), the agents not picked with the reason, and the
    workers replaced for staying unhealthy."""
    status = full_builtins(record.status)
    conditions = record.status.conditions
    for shown_apart in ("conditions", "workers", "notPicked", "replaced", "autoscaling"):
        status.pop(shown_apart, None)
    # A few names, not one line per ready node; readyNodeCount is shown beside it.
    status["readyNodes"] = ready_nodes_text(record.status) or "<none>"
    workers = [[worker.node, "True" if worker.ready else "False", worker.peer_url or "<none>"]
               for worker in record.status.workers]
    not_picked = [[agent.node, agent.reason] for agent in record.status.not_picked]
    # The status lists a few of each reason (notPickedCount counts them all).
    more = record.status.not_picked_count - len(not_picked)
    workers_sections = [
        "Workers:",
        _indented(table_text(["NODE", "READY", "PEER"], workers)) if workers else "  <none>",
        "Not picked:",
        _indented(table_text(["NODE", "REASON"], not_picked)) if not_picked else "  <none>",
        *([f"  and {more} more (notPickedCount: {record.status.not_picked_count})"] if more > 0 else []),
        *replaced_section(record),
        *autoscaling_section(record),
    ]
    return _describe("Runtime", record.runtime.metadata, record.generation, record.runtime.spec, status, conditions,
                     extra=workers_sections)


def replaced_section(record: RuntimeRecord) -> list[str]:
    """The workers replaced for staying unhealthy, newest last; nothing when none was."""
    rows = [[r.time, r.node, r.by, r.reason] for r in record.status.replaced]
    return ["Replaced:", _indented(table_text(["TIME", "NODE", "BY", "REASON"], rows))] if rows else []


def autoscaling_section(record: RuntimeRecord) -> list[str]:
    """The elastic cache: what the autoscaler last saw, its latest decision (a hold too: why it does not grow or
    shrink, since when), and its recent changes with their reasons."""
    policy, state = record.runtime.spec.autoscaling, record.status.autoscaling
    if policy is None:
        return []
    lines = ["Autoscaling:"]
    if state is None:
        return [*lines, "  <not evaluated yet>"]
    ratio = "no reads" if state.hit_ratio_percent is None else f"{state.hit_ratio_percent:.1f}%"
    lines.append(f"  cache used {state.cache_used_percent:.1f}%, hit ratio {ratio} "
                 f"(workers {policy.min_replicas}..{policy.max_replicas}, cool-down {policy.cool_down_seconds} s)")
    last = state.last_decision
    if last is not None:
        lines.append(f"  last decision: {last.action} ({last.reason}) since {last.time or '<unknown>'}: {last.message}")
    rows = [[d.time, str(d.from_replicas), str(d.to_replicas), d.reason] for d in state.decisions]
    lines.append(_indented(table_text(["TIME", "FROM", "TO", "REASON"], rows)) if rows else "  <no decisions yet>")
    return lines


def _describe(kind: str, metadata: Any, generation: int, spec: Any, status: dict[str, Any],
              conditions: Sequence[Condition], extra: Sequence[str] = (), created: str | None = None) -> str:
    lines = [
        f"Name:         {metadata.name}",
        f"Namespace:    {metadata.namespace}",
        f"Kind:         {kind} ({kind.lower()}.shoal.io)",
        *_key_values("Labels:       ", metadata.labels),
        *_key_values("Annotations:  ", metadata.annotations),
        f"Generation:   {generation}",
        *([f"Created:      {created}"] if created is not None else []),
        "Spec:",
        _indented(to_yaml(full_builtins(spec))),
        "Status:",
        _indented(to_yaml(status)),
        *extra,
        "Conditions:",
    ]
    if conditions:
        rows = [[c.type, c.status, c.reason, c.message, c.last_transition_time] for c in conditions]
        lines.append(_indented(table_text(["TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION"], rows)))
    else:
        lines.append("  <none>")
    return "\n".join(lines) + "\n"


def _key_values(title: str, values: dict[str, str]) -> list[str]:
    if not values:
        return [f"{title}<none>"]
    pad = " " * len(title)
    return [f"{title if index == 0 else pad}{terminal_text(key)}={terminal_text(value)}"
            for index, (key, value) in enumerate(sorted(values.items()))]


def _indented(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.rstrip("\n").splitlines())
