"""The agent bench's results: rows, the table with ratios against local disk and the best peer, the issue's
targets with PASS/MISS, py-spy profile summaries, and the JSON results file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.workloads import WORKLOADS, KiB, MiB

if TYPE_CHECKING:
    from tests.bench.agent import Bench


@dataclass
class Row:
    workload: str
    system: str
    state: str  # cold, warm, dropped (warm, page cache dropped), "-" (no cache)
    value: float | None
    unit: str
    note: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


PEERS = ("rclone", "s3fs", "direct GETs")
SYSTEMS = ("local", "direct", "shoal", "rclone", "s3fs")
STATE_SHORT = {"cold": "cold", "warm": "warm", "dropped": "warm, -pagecache", "-": "no cache",
               "epochs": "3 epochs"}
STATE_LABEL = {"cold": "cold", "warm": "warm", "dropped": "warm, page cache dropped", "-": "no cache",
               "epochs": "shuffled epochs"}


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any] | None:
    """Self and inclusive sample shares of the hottest functions in a py-spy raw (collapsed stacks) file."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_FRAMES):
            idle += count  # waiting: epoll of the event loop, a thread-pool worker waiting for work
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return None

    def shares(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(c / total, 3)) for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"file": str(path), "busy_samples": total, "idle_samples": idle, "self": shares(own),
            "inclusive": shares(inclusive)}


IDLE_FRAMES = ("EpollSelector.select (selectors.py", "_worker (thread.py:81)", "Condition.wait (threading.py",
               "select (selectors.py")


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file.py:12)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def short(note: str, limit: int = 90) -> str:
    """A note's first line, cut for the table (the JSON has it whole)."""
    line = note.strip().splitlines()[0] if note.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- reporting -----------------------------------------------------------------------------------------------

_console: Any = None


@contextlib.contextmanager
def timed_phase(phase_times: dict[str, float], phase: str) -> Iterator[None]:
    """Print the phase's name, time it into ``phase_times`` (the report's "Phase times"), and print how long it took."""
    console().print(f"[bold]{phase}[/bold]")
    started = time.perf_counter()
    try:
        yield
    finally:
        phase_times[phase] = time.perf_counter() - started
        console().print(f"  ({phase}: {phase_times[phase]:.0f} s)")


def console() -> Any:
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(width=170)
    return _console


def say(text: str) -> None:
    """A progress line, printed as is (no markup: notes carry errors like "[Errno 5]")."""
    console().print(text, markup=False, highlight=False)


def best_peer(rows: list[Row], workload: str, state: str) -> Row | None:
    candidates = [r for r in rows if r.workload == workload and r.value is not None and r.system in PEERS
                  and (r.state == state or r.state == "-" or state == "-")]
    return max(candidates, key=lambda r: r.value or 0.0, default=None)


def find_row(rows: list[Row], workload: str, system: str, state: str) -> Row | None:
    return next((r for r in rows if r.workload == WORKLOADS[workload].title and r.system == system
                 and r.state == state), None)


@dataclass
class Target:
    text: str
    measured: float | None
    bound: float | None
    detail: str

    @property
    def verdict(self) -> str:
        if self.measured is None or self.bound is None:
            return "n/a"
        return "PASS" if self.measured >= self.bound else "MISS"


def targets(rows: list[Row]) -> list[Target]:
    def value(workload: str, system: str, state: str) -> float | None:
        row = find_row(rows, workload, system, state)
        return None if row is None else row.value

    def ratio_target(text: str, ours: tuple[str, str, str], theirs: tuple[str, str, str], factor: float) -> Target:
        a, b = value(*ours), value(*theirs)
        ratio = None if a is None or b is None or b == 0 else a / b
        shown_a = "n/a" if a is None else f"{a:,.0f}"
        shown_b = "n/a" if b is None else f"{b:,.0f}"
        unit = WORKLOADS[ours[0]].unit
        detail = (f"{ours[1]} {STATE_LABEL[ours[2]]} {shown_a} {unit} vs {theirs[1]} {STATE_LABEL[theirs[2]]} "
                  f"{shown_b}: {'n/a' if ratio is None else f'{ratio:.2f}x'}")
        return Target(text, ratio, factor, detail)

    out: list[Target] = []
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers"), ("rand", "fio 4 KiB random")):
        out.append(ratio_target(f"warm reads ≥ 0.8x local disk warm ({label})", (workload, "Shoal", "warm"),
                                (workload, "local disk", "warm"), 0.8))
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers")):
        out.append(ratio_target(f"agent-disk-warm large reads ≥ s3fs warm ({label})",
                                (workload, "Shoal", "dropped"), (workload, "s3fs", "warm"), 1.0))
    for workload, label in (("large1", "1 reader"), ("large8", "8 readers")):
        out.append(ratio_target(f"cold large reads ≥ 0.9x direct parallel GETs ({label})",
                                (workload, "Shoal", "cold"), (workload, "direct GETs", "-"), 0.9))
    out.append(ratio_target("small files warm ≥ 0.8x local warm", ("small", "Shoal", "warm"),
                            ("small", "local disk", "warm"), 0.8))
    out.append(ratio_target("small files cold ≥ direct GETs", ("small", "Shoal", "cold"),
                            ("small", "direct GETs", "-"), 1.0))
    out.append(ratio_target("metadata walk ≥ 0.5x local warm", ("walk", "Shoal", "warm"),
                            ("walk", "local disk", "warm"), 0.5))
    hit = next((r for r in rows if r.workload == WORKLOADS["epoch"].title and r.system == "Shoal (lfu-admission)"),
               None)
    out.append(Target("hit ratio ≥ 0.45 with the half-size cache (default policy, epochs 2-3)",
                      None if hit is None else hit.value, 0.45,
                      "not measured" if hit is None else (hit.note if hit.value is None
                                                          else f"{hit.value:.3f}; {hit.note}")))
    return out


def report(bench: Bench, out_path: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = bench.rows
    sizes = bench.sizes
    order = list(WORKLOADS)
    system_order = ["Shoal", "Shoal (lfu-admission)", "Shoal (lru)", "local disk", "rclone", "s3fs", "direct GETs"]
    state_order = ["cold", "warm", "dropped", "-", "epochs"]
    rows.sort(key=lambda r: (order.index(next(k for k, w in WORKLOADS.items() if w.title == r.workload)),
                             system_order.index(r.system) if r.system in system_order else 99,
                             state_order.index(r.state)))
    table = Table(title=(f"Shoal agent data path vs peers on one SeaweedFS (127.0.0.1), {os.cpu_count()} cores: "
                         f"{sizes.large_files}x{sizes.large_bytes // MiB} MiB, {sizes.small_files}x"
                         f"{sizes.small_bytes // KiB} KiB, {sizes.meta_files:,} files walked, "
                         f"{sizes.epoch_files}x{sizes.epoch_bytes // MiB} MiB epochs"))
    table.add_column("workload", no_wrap=True, min_width=20)
    table.add_column("system", no_wrap=True, min_width=21)
    table.add_column("state", no_wrap=True, min_width=16)
    for column, width in (("value", 16), ("vs local warm", 13), ("vs best peer", 16), ("CPU s d/s/r", 14)):
        table.add_column(column, justify="right", no_wrap=True, min_width=width)
    table.add_column("note", overflow="ellipsis", no_wrap=True)
    json_rows = []
    previous = ""
    for row in rows:
        key = next(k for k, w in WORKLOADS.items() if w.title == row.workload)
        local = find_row(rows, key, "local disk", "warm")
        peer = best_peer(rows, row.workload, row.state)
        vs_local = (row.value / local.value if row.value is not None and local is not None and local.value
                    else None)
        vs_peer = (row.value / peer.value if row.value is not None and peer is not None and peer.value else None)
        if row.value is None:
            shown = "—"
        elif row.unit == "hit ratio":
            shown = f"{row.value:.3f}"
        else:
            shown = f"{row.value:,.0f} {row.unit}"
        cpu = (f"{row.cpu.get('daemon', 0):.1f}/{row.cpu.get('store', 0):.1f}/{row.cpu.get('reader', 0):.1f}"
               if row.cpu else "")
        if previous and previous != row.workload:
            table.add_section()
        previous = row.workload
        peer_text = "" if vs_peer is None or peer is None else f"{vs_peer:.2f}x {peer.system.split()[0]}"
        table.add_row(WORKLOADS[key].label, row.system, STATE_SHORT[row.state], shown,
                      "" if vs_local is None else f"{vs_local:.2f}x", peer_text, cpu, escape(short(row.note)))
        json_rows.append({**asdict(row), "vs_local_warm": vs_local, "vs_best_peer": vs_peer,
                          "best_peer": None if peer is None else peer.system})
    out = console()
    out.print(table)
    drop_methods = ", ".join(sorted(bench.page_cache.methods)) or "not used"
    notes = [
        "States: cold = fresh cache dir and fresh mount (local disk: page cache dropped); warm = read again; "
        "warm, -pagecache = the kernel page cache dropped after the warm run (Shoal: agent disk cache only). Page "
        f"cache dropped with: {drop_methods}. CPU s d/s/r = CPU seconds of the mount daemon(s) (Shoal: agent and "
        "mount processes) / SeaweedFS / reader process during the run (median run for repeated warm runs).",
        "Best peer = the fastest of rclone, s3fs and direct GETs in the same state (direct GETs have no cache and "
        "count in every state). SeaweedFS's own files are read into the page cache before every cold run, so "
        "every system's misses meet the same in-memory object store on 127.0.0.1.",
        "Readers run in a separate worker process (Python threads, 1 MiB reads); the walk is find -printf %s "
        "(one stat per entry); random reads are fio psync, 8 jobs on one large file (cold and -pagecache: the first "
        "reads, an eighth of its pages; warm: time-based). Direct GETs: aiobotocore in one process (large: 8 MiB "
        "ranges, 16 in flight; small: 16 in flight; walk: LIST; random: 4 KiB ranges, 8 in flight).",
        "Epoch hit ratio: hitBytes/(hitBytes+missBytes) per epoch from the mount's inventory counters (a snapshot "
        "asked for after each epoch); the page cache is dropped before each epoch so every read reaches the agent; "
        "4 readers, files in a new shuffled order each epoch. rclone and s3fs have no hit counters (not measured).",
        "A Shoal workload whose runs failed (read errors, or the mount process replaced under it) is run again "
        "from a fresh mount, up to 3 times; its rows then say so.",
        "Phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in bench.phase_times.items())
        + f". Load average (1/5/15 min) at start {bench.load.get('start')}, at end {bench.load.get('end')}: "
        "other processes on this machine share its cores.",
    ]
    for note in notes + bench.notes:
        out.print(f"[dim]• {escape(note)}[/dim]")
    found = targets(rows)
    out.print("\n[bold]Targets (issue 3)[/bold]")
    for target in found:
        style = {"PASS": "green", "MISS": "red"}.get(target.verdict, "yellow")
        out.print(f"  [{style}]{target.verdict:4}[/{style}]  {escape(target.text)}: {escape(target.detail)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "sizes": asdict(sizes), "rows": json_rows, "load_average": bench.load,
        "targets": [{**asdict(t), "verdict": t.verdict} for t in found],
        "notes": notes + bench.notes, "page_cache_drop": sorted(bench.page_cache.methods),
    }, indent=2))
    out.print(f"[dim]results written to {out_path}[/dim]")


def print_targets(out: Any, title: str, lines: Sequence[tuple[str, str, str]]) -> None:
    """The (verdict, target, measured) lines of a bench, PASS in green and MISS in red."""
    from rich.markup import escape

    out.print(f"\n[bold]{escape(title)}[/bold]")
    for verdict, text, measured in lines:
        style = {"PASS": "green", "MISS": "red"}.get(verdict, "yellow")
        out.print(f"  [{style}]{verdict:4}[/{style}]  {escape(text)}: {escape(measured)}")


def targets_table(lines: Sequence[tuple[str, str, str]]) -> list[str]:
    """The (verdict, target, measured) lines of a bench as the Markdown table its docs section ends with."""
    return ["", "| verdict | target | measured |", "|---|---|---|",
            *(f"| {verdict} | {target} | {measured} |" for verdict, target, measured in lines)]


def write_docs_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the generated section of ``path`` between the markers ``begin`` (matched up to its " (") and
    ``end``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(begin.split(" (")[0])
    stop = text.find(end)
    if start >= 0 and stop > start:
        text = text[:start] + section + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)

