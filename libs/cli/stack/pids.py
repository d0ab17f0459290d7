"""Pid files of ``shoal up`` and finding and stopping processes by the PID we started (never by name).

``up.pid`` names the running ``shoal up`` (claimed with O_EXCL, so two at once cannot both own a state directory);
``pids.json`` names every child with a marker from its command line, so ``shoal down``, tests and a later
``shoal up`` can stop what a killed one left behind without ever signalling a reused PID.

A PID alone does not name a process for long (pid_max may be 32768, and a reboot starts again from 1), and a marker
such as "shoal" is also in the command line of another ``shoal`` command or of another state directory's stack. So
both files record each process's start time too (``process_start``), and a process whose start differs is not ours.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import click

from libs.cli.stack import UpError
from libs.cli.stack.layout import StateLayout

# Seconds a service gets between SIGTERM and SIGKILL, whoever stops it (``shoal up``, or a later run stopping what a
# killed one left): time to drain its consumers, and for the agent more than its own grace for a mount process
# (``STOP_GRACE_SECONDS`` in services/agent/app.py, 10 s) plus the unmount. Killed sooner, the agent leaves a mount
# process that hangs on SIGTERM running, with its mount, after everything else has stopped.
SERVICE_GRACE_SECONDS = 20.0


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def read_pidfile(path: Path) -> tuple[int | None, str | None]:
    """up.pid's PID and the start time recorded under it (None: none recorded, e.g. by an older ``shoal up``)."""
    try:
        words = path.read_text().split()
    except FileNotFoundError:
        return None, None
    return read_pid(path), (words[1] if len(words) > 1 else None)


def process_start(pid: int) -> str | None:
    """When the process started, in clock ticks after boot (field 22 of /proc/<pid>/stat): with the PID it names one
    process, as a reused PID starts later. None where /proc cannot tell."""
    try:
        # The command name (field 2) may hold spaces and parentheses: count the fields after its last ')'.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> bytes | None:
    """The process's command line; None where /proc is not there to ask (then callers trust the PID)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return b"" if Path("/proc/self").exists() else None
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether the process still runs: a zombie counts as gone once all its threads are gone.

    A multi-threaded process's main thread turns zombie first while the others still close their sockets, and
    an orphan stays a zombie as long as init does not collect it; so every thread's state is looked at.
    """
    if pid <= 0:  # 0 and negative numbers address process groups, never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def runs(pid: int, marker: str, started: str | None = None) -> bool:
    """PID is alive, its command line contains ``marker`` and it started at ``started`` (when recorded and /proc can
    tell): guards against a reused PID, also one reused by a process of the same program."""
    if not pid_alive(pid):
        return False
    if started is not None and process_start(pid) not in (None, started):
        return False
    cmdline = _cmdline(pid)
    return cmdline is None or marker.encode() in cmdline


def is_shoal_up(pid: int, started: str | None = None) -> bool:
    return runs(pid, "shoal", started) or runs(pid, "libs.cli", started)


def claim_pidfile(layout: StateLayout) -> None:
    """Write our PID to up.pid, refusing if another ``shoal up`` owns this state directory."""
    existing, started = read_pidfile(layout.pidfile)
    if existing is not None and existing != os.getpid() and is_shoal_up(existing, started):
        raise UpError(f"shoal up is already running as PID {existing}; stop it with `{layout.down_command}`")
    if layout.pidfile.exists():
        click.echo(f"Removing a stale {layout.pidfile}: it names no running shoal up.", err=True)
        layout.pidfile.unlink()
        stop_leftovers(layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: of two ``shoal up`` started at the same moment, exactly one gets the file.
        fd = os.open(layout.pidfile, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError as err:
        other = read_pid(layout.pidfile)
        raise UpError(f"shoal up is already running as PID {other}; stop it with `{layout.down_command}`") from err
    with os.fdopen(fd, "w") as file:
        # The PID alone on the first line, as pid files have it (`make clean` reads it); the start time below.
        file.write(f"{os.getpid()}\n{process_start(os.getpid()) or ''}\n")


def release_pidfile(layout: StateLayout) -> None:
    if read_pid(layout.pidfile) == os.getpid():
        layout.pidfile.unlink(missing_ok=True)
    layout.pids.unlink(missing_ok=True)


def write_pids(layout: StateLayout, processes: Mapping[str, tuple[int, str]]) -> None:
    """pids.json: {name: {pid, marker}}, replaced atomically so a reader never sees half a file."""
    record = {"up": os.getpid(), "upStarted": process_start(os.getpid()),
              "processes": {name: {"pid": pid, "marker": marker, "started": process_start(pid)}
                            for name, (pid, marker) in processes.items()}}
    temporary = layout.pids.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(layout.pids)


def stop_leftovers(layout: StateLayout, grace: float = SERVICE_GRACE_SECONDS) -> list[str]:
    """Stop children a killed ``shoal up`` left behind (by the PIDs it recorded, if they still run its programs)."""
    try:
        record = json.loads(layout.pids.read_text())
        owner, owner_started = int(record.get("up", 0)), _started(record.get("upStarted"))
        recorded = {name: (int(entry["pid"]), str(entry["marker"]), _started(entry.get("started")))
                    for name, entry in record["processes"].items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return []  # nothing recorded, or not by us: nothing to stop
    if is_shoal_up(owner, owner_started):
        return []  # its owner still runs: nothing is left over
    left = {name: pid for name, (pid, marker, started) in recorded.items() if runs(pid, marker, started)}
    for name, pid in left.items():
        click.echo(f"Stopping {name} (PID {pid}), left running by an earlier shoal up.", err=True)
    terminate(list(left.values()), grace)
    layout.pids.unlink(missing_ok=True)
    return list(left)


def _started(value: object) -> str | None:
    return None if value is None else str(value)


def terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds, then wait until they are gone (a kill is not instant)."""

    def wait_gone(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
            time.sleep(0.05)

    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_gone(grace)
    for pid in pids:
        if pid_alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # SIGKILL cannot be ignored; this only covers the moment the kernel needs to tear the process down.
    wait_gone(5.0)


def child_pids(parent: int) -> list[int]:
    """Live (non-zombie) children of ``parent``, from /proc; empty where there is no /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def stop_children(parent: int, spare: set[int], grace: float = 3.0) -> None:
    """Stop children not stopped by name yet (one spawned just as Ctrl-C arrived was never registered).

    ``spare``: children the process had before ``shoal up`` started anything, which are not ours to stop.
    """
    strays = [pid for pid in child_pids(parent) if pid not in spare]
    terminate(strays, grace)
    for pid in strays:
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
