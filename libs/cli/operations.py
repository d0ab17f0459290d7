"""Following DataLoads and DataCleans until they finish (``--wait``): a KV watch per operation and a live progress bar.

Which I/O it owns: the watch of each operation's key in KV ``shoal_operations`` (the loader writes the record at
most once a second and at every phase change, so a watch sees each phase without polling), and drawing progress
on stderr with rich (a bar per operation on a terminal; one line per phase change elsewhere, e.g. in CI logs).
Stdout gets one result line per operation, for scripts.

A watch is opened *before* the command is published: a small load can finish within the loader's first second,
and a ``ttlSecondsAfterFinished: 0`` operation can be gone right after, so opening it later could miss the end.

Only runs an apply leads to are followed: a Cron DataLoad runs on its schedule, and an OnEvent one that already ran
runs again when a sync changes its dataset, so ``--wait`` says so and returns (``unfollowed``)
rather than report the previous run's end as this apply's, or wait until a firing that may be hours away. A run is
the apply's when it started from the applied generation or a later one (``observedGeneration``): the Failed end of
the previous spec is not the end of the apply that fixed it.

A Pending operation says what it waits for (``waitingFor``: a dataset that does not exist yet keeps a load Pending,
as in Fluid), and ``--wait-timeout`` bounds the wait: an operation not ended by then is said as it stood, and the
command ends without it (the operation goes on).

The connection is watched too (``follow_connected``): nats-py reconnects forever and a KV watch only waits, so a NATS
that went away would otherwise leave ``--wait`` silent for good; a PING kept in flight tells a server that stopped
answering on a connection still open (frozen, cut off by the network).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import click
import msgspec
from nats.js.kv import KeyValue
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from libs import subjects
from libs.bus import Bus, Replay, kv_watch
from libs.cli import render
from libs.events.common import format_bytes
from libs.events.operation import DataCleanApply, DataLoadApply, OperationRecord

TERMINAL_PHASES = ("Complete", "Failed")
# How often the connection is looked at while following: a loss is noticed this long after it (plus the patience).
CONNECTION_CHECK_SECONDS = 0.25

_RECORD_DECODER = msgspec.json.Decoder(OperationRecord)


@dataclass(frozen=True)
class Finished:
    """How a followed operation ended: its last record, or ``error`` when it ended without one (deleted)."""

    resource: str
    record: OperationRecord | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.record is not None and self.record.status.phase == "Complete"


@dataclass
class OperationWatch:
    """The watch of one operation's KV key, and the last record it has seen (None: none, or deleted)."""

    kind: str  # "dataload" | "dataclean"
    namespace: str
    name: str
    entries: AsyncGenerator[KeyValue.Entry | Replay | None, None]
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    latest: OperationRecord | None = None
    deleted: bool = False
    # The record before the command was published (None: there was none).
    before: OperationRecord | None = None

    @property
    def resource(self) -> str:
        return f"{self.kind}.shoal.io/{self.name}"

    async def next_change(self) -> bool:
        """Wait for the next put or delete of the key; False at the end of the initial values (or a replay)."""
        item = await self.entries.__anext__()
        if item is None or isinstance(item, Replay):
            return False
        if item.operation in ("DEL", "PURGE"):
            self.latest, self.deleted = None, True
        elif item.value is not None:
            try:
                self.latest, self.deleted = _RECORD_DECODER.decode(item.value), False
            except (msgspec.ValidationError, msgspec.DecodeError):
                return False  # a newer record version this CLI cannot read: wait for the next
        return True

    async def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            await self.entries.aclose()


async def open_watch(bus: Bus, kind: str, namespace: str, name: str) -> OperationWatch:
    """A watch of the operation's key, its current value read (so later changes are the ones that matter)."""
    kv = await bus.kv(subjects.KV_OPERATIONS)
    stopping = asyncio.Event()
    entries = kv_watch(kv, stopping, bus.reconnects, keys=subjects.operation_key(kind, namespace, name))
    watch = OperationWatch(kind, namespace, name, entries, stopping)
    while await watch.next_change():  # the initial value, if any, then the end-of-initial-values marker
        pass
    watch.deleted = False  # a delete marker left by an earlier operation of that name is not this one's end
    watch.before = watch.latest
    return watch


def unfollowed(command: DataLoadApply | DataCleanApply, before: OperationRecord | None) -> str:
    """Why ``--wait`` does not follow the operation this command applies (its runs do not come from the apply);
    "" when it does: a Once load or a clean (its one run, or the run of its changed spec), or an OnEvent load's first
    run (it starts at once)."""
    if isinstance(command, DataCleanApply):
        return ""
    spec, name = command.data_load.spec, command.data_load.metadata.name
    if spec.policy == "Cron":
        why = f"runs on its schedule ({spec.schedule!r}, policy Cron)"
    elif spec.policy == "OnEvent" and before is not None and before.status.start_time:
        why = "runs when a sync of its dataset finds new or changed objects (policy OnEvent)"
    else:
        return ""
    return (f"{why}: --wait does not wait for those runs; see them with `shoal get dataloads`, or run it now with "
            f"`shoal run dataload {name}`")


def finished(record: OperationRecord | None, generation: int) -> bool:
    """The run of the applied generation (or a later one) ended. A loader older than ``observedGeneration`` leaves it
    0: then the record's generation is all there is to go by (and such a loader does not run a changed spec)."""
    if record is None or record.status.phase not in TERMINAL_PHASES:
        return False
    return (record.status.observed_generation or record.generation) >= generation


async def follow(watches: Sequence[tuple[OperationWatch, int]], console: Console | None = None,
                 within: float | None = None) -> list[Finished]:
    """Follow each (watch, generation accepted) until its operation is Complete or Failed, drawing progress.

    ``within`` (``--wait-timeout``): seconds after which an operation not ended is given up on, its ``Finished``
    saying where it stood (Pending, and what for: a dataset that does not exist yet keeps a load Pending for the
    loader's ten minutes, as Fluid keeps it for ever). None: until each ends."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    # Off a terminal (a pipe, CI logs) a bar cannot redraw: one line per phase change instead (_follow_one).
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        tasks = [asyncio.ensure_future(_follow_one(watch, generation, bar)) for watch, generation in watches]
        try:
            await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            unended = [task for task in tasks if not task.done()]
            for task in unended:
                task.cancel()
            await asyncio.gather(*unended, return_exceptions=True)
    for task in tasks:  # a watch that failed (NATS away for good) ends the whole wait, as it did before the bound
        if task not in unended and (error := task.exception()) is not None:
            raise error
    return [_unended(watch, generation, within or 0) if task in unended else task.result()
            for task, (watch, generation) in zip(tasks, watches, strict=True)]


def _unended(watch: OperationWatch, generation: int, within: float) -> Finished:
    """The ``Finished`` of an operation ``--wait-timeout`` gave up on: where it stood, and that it goes on."""
    record = watch.latest
    if record is not None and record.generation >= generation and not _previous_end(record, generation):
        stood = _phase_line(watch.resource, record)
    else:
        stood = f"{watch.resource} not started by the loader yet"
    plural = "dataloads" if watch.kind == "dataload" else "datacleans"
    return Finished(watch.resource, None, f"{stood}, after --wait-timeout {within:g}s; it goes on without this "
                                          f"command (`shoal get {plural}` shows how it ends)")


class ConnectionLost(Exception):
    """The connection to NATS stayed down, or NATS did not answer on it, for the whole patience while operations were
    followed."""

    def __init__(self, resources: Sequence[str], patience: float, why: str = "no reconnect") -> None:
        super().__init__(f"{why} within {patience:g}s while waiting for {', '.join(resources)}")
        self.resources = list(resources)
        self.patience = patience


async def follow_connected(bus: Bus, watches: Sequence[tuple[OperationWatch, int]], patience: float,
                           console: Console | None = None, within: float | None = None) -> list[Finished]:
    """``follow``, or ``ConnectionLost`` once the connection has been down ``patience`` seconds in a row (a short
    NATS restart is ridden out: the watches start again after a reconnect), or up but unanswered that long.

    A server that stops answering without closing the connection (frozen, or cut off by the network with no reset)
    leaves it "connected": nats-py notices only when its pings go unanswered, two minutes apart, so ``--wait`` stayed
    silent for minutes past its ``--timeout``. A PING is kept in flight (``flush``) and when NATS last answered one is
    what counts; a ping sent before a reconnect is never answered (nats-py forgets it), so a new one goes out then."""
    following = asyncio.ensure_future(follow(watches, console, within))
    loop = asyncio.get_running_loop()
    down_since: float | None = None
    answered = loop.time()  # when NATS last answered a ping, or the connection came back
    ping: asyncio.Future[None] | None = None
    ping_reconnects = bus.reconnects()

    def on_answer(done: asyncio.Future[None]) -> None:
        nonlocal answered
        # A ping unanswered (the patience ran out first) or forgotten by a reconnect ends in a timeout: no answer.
        if not done.cancelled() and done.exception() is None:
            answered = loop.time()

    try:
        while not following.done():
            if bus.nc.is_connected and (ping is None or ping.done() or bus.reconnects() != ping_reconnects):
                ping_reconnects = bus.reconnects()
                # Longer than the patience: it is not cancelled while it may still be answered (nats-py would then
                # fail on the late PONG of a cancelled ping).
                ping = asyncio.ensure_future(bus.nc.flush(timeout=patience + 1))  # type: ignore[arg-type]
                ping.add_done_callback(on_answer)
            await asyncio.wait({following}, timeout=CONNECTION_CHECK_SECONDS)
            now = loop.time()
            if following.done():
                break
            if not bus.nc.is_connected:
                # The silence of the connection it comes back on starts then; until then this counts.
                answered = now
                down_since = now if down_since is None else down_since
                if now - down_since >= patience:
                    raise ConnectionLost([watch.resource for watch, _ in watches], patience)
            else:
                down_since = None
                if now - answered >= patience:
                    raise ConnectionLost([watch.resource for watch, _ in watches], patience, "no answer from NATS")
        return following.result()
    finally:
        if not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)


async def _follow_one(watch: OperationWatch, generation: int, bar: Progress) -> Finished:
    task = bar.add_task(watch.resource, total=None, detail="waiting for the loader")
    said = ("", "")
    while True:
        record = watch.latest
        if record is not None and record.generation >= generation and not _previous_end(record, generation):
            _show(bar, task, record)
            # What it waits for comes after the Pending it was saved with: said once it comes, or a log shows a bare
            # "Pending" for as long as it waits.
            now = (record.status.phase, record.status.waiting_for if record.status.phase == "Pending" else "")
            if now != said:
                said = now
                if not bar.console.is_terminal:  # no live bar there: say each phase (and what it waits for) once
                    bar.console.print(_phase_line(watch.resource, record), highlight=False, soft_wrap=True)
            if finished(record, generation):
                return Finished(watch.resource, record)
        elif watch.deleted:
            return Finished(watch.resource, None, f"{watch.resource} was deleted before it finished")
        await watch.next_change()


def _previous_end(record: OperationRecord, generation: int) -> bool:
    """The record is of the applied generation but its status still the end of the run before (the loader saves the
    new spec at once and starts its run after): "Failed" or "Complete" drawn from it was the previous run's, said
    as this apply's before its run even started."""
    return record.status.phase in TERMINAL_PHASES and not finished(record, generation)


def _phase_line(resource: str, record: OperationRecord) -> str:
    line = f"{resource} {record.status.phase}"
    progress = render.progress_text(record.status.progress, clean=record.clean is not None)
    if progress != "-":
        line += f" {progress}"
    if record.status.phase == "Pending" and record.status.waiting_for:
        line += f" (waiting for {record.status.waiting_for})"
    return line


def _show(bar: Progress, task: TaskID, record: OperationRecord) -> None:
    progress = record.status.progress
    # Blocks found already cached are "done without work" (Progress): bytes_done counts them, so the bar reaches
    # its end on a load of an already warm dataset.
    total = progress.bytes_total or None
    detail: list[str] = [record.status.phase]
    if progress.files_total:
        detail.append(f"{progress.files_done}/{progress.files_total} files")
    if progress.bytes_total:
        detail.append(f"{format_bytes(progress.bytes_done)}/{format_bytes(progress.bytes_total)}")
    if record.clean is not None and not progress.bytes_total and (
            freed := render.progress_text(progress, clean=True)) != "-":
        detail.append(freed)  # a clean with no total yet: the bar only spins, this says what it did so far
    if progress.rate_bytes_per_second > 0 and record.status.phase == "Executing":
        detail.append(render.rate_text(progress.rate_bytes_per_second))
    if progress.eta_seconds is not None and record.status.phase == "Executing":
        detail.append(f"ETA {render.eta_text(progress.eta_seconds)}")
    if record.status.waiting_for and record.status.phase == "Pending":
        detail.append(f"waiting for {record.status.waiting_for}")
    completed = progress.bytes_done if total else 0
    if record.status.phase == "Complete" and total is None:
        total, completed = 1, 1  # nothing to do (every block was cached already, or an empty target)
    bar.update(task, total=total, completed=completed, detail=", ".join(detail))


def report(results: Sequence[Finished]) -> bool:
    """One line per operation: stdout for Complete, stderr (``error: ...``) for Failed; True when all Complete."""
    for result in results:
        record = result.record
        if record is None:
            click.echo(f"error: {result.error}", err=True)
        elif record.status.phase == "Complete":
            progress = record.status.progress
            text = f"{result.resource} Complete"
            done = render.progress_text(progress, clean=record.clean is not None)
            if done != "-":
                text += f": {done}"
            if record.status.duration:
                text += f" in {record.status.duration}"
            if progress.bytes_skipped:
                skipped = "already cached" if record.kind == "DataLoad" else "not cached anywhere"
                text += f" ({format_bytes(progress.bytes_skipped)} {skipped})"
            click.echo(text)
        else:
            # One line, shown not acted on: the message may quote an object's key (a part's failure names it), and a
            # key may hold line breaks and escape sequences.
            message = render.terminal_text(record.status.message) or "no message"
            click.echo(f"error: {result.resource} Failed: {message}", err=True)
    return all(result.ok for result in results)
