"""Processes, mounts and CPU accounting of the agent bench: every child started through ``libs.embedded.spawn``
(its own session and log file) and registered, so ``cleanup`` stops them all by PID, unmounts whatever is left
under the bench's mount folders and stops the embedded servers, also on errors and Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from libs.embedded import ServerProcess, spawn

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Child:
    """A process we started, in its own session (its descendants share its process group); logs to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 grace: float = 15.0) -> None:
        self.name = name
        self.log_path = log_path
        self.server: ServerProcess = spawn(name, argv, log_path, env=env, grace=grace, cwd=PROJECT_ROOT)
        self.proc = self.server.process
        _children.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.server.alive()

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period, then SIGKILL to whatever is left of its process group."""
        self.server.stop()
        # The group is this child's own (start_new_session): only its descendants can be in it, e.g. a mount
        # process the agent could not stop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            _children.remove(self)


_children: list[Child] = []
_servers: list[ServerProcess] = []
_mount_roots: list[Path] = []
_cleanup_lock = threading.Lock()


def cleanup() -> None:
    """Stop every child (newest first), unmount anything left under our mount folders, stop the servers."""
    with _cleanup_lock:
        while _children:
            child = _children[-1]
            try:
                child.stop()
            except Exception as err:
                print(f"could not stop {child.name} (pid {child.pid}): {err}", file=sys.stderr)
                with contextlib.suppress(ValueError):
                    _children.remove(child)
        for root in list(_mount_roots):
            for path in mounts_under(root):
                unmount(path)
        while _servers:
            server = _servers.pop()
            try:
                server.stop()
            except Exception as err:
                print(f"could not stop {server.name}: {err}", file=sys.stderr)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def exclusive_run(state: Path, what: str) -> Iterator[None]:
    """One ``what`` bench at a time on ``state`` (a lock file held for the run), with SIGTERM and SIGHUP cleaning
    up like Ctrl-C; the previous handlers come back afterwards."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / f"{what}-bench.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another {what} bench is running on {state}") from None
        previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mounts:
        return [_unescape(line.split()[4]) for line in mounts if len(line.split()) > 4]


def mounted(path: Path | str) -> bool:
    return str(path) in mount_points()


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    # Deepest first, so nested mounts go before their parents.
    return sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True)


def unmount(path: Path | str) -> None:
    """fusermount3 -u, then a lazy -u -z, then umount -l (s3fs mounts with libfuse 2)."""
    for argv in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*argv, str(path)], capture_output=True, timeout=30, check=False)
    if mounted(path):
        print(f"WARNING: {path} is still mounted", file=sys.stderr)


def fresh_run_dir(run_dir: Path, logs: Path) -> None:
    """Empty ``run_dir`` for a run (unmounting what a run killed hard left there), make ``logs``, and register
    the folder so every mount below it is removed at exit."""
    for path in mounts_under(run_dir):
        unmount(path)
    left = mounts_under(run_dir)
    if left:
        raise SystemExit(f"cannot clear {run_dir}: still mounted: {', '.join(left)}")
    shutil.rmtree(run_dir, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    _mount_roots.append(run_dir)


def wait_mounted(path: Path, timeout: float, owner: Child | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if owner is not None and not owner.alive():
            raise RuntimeError(f"{what or owner.name} exited with {owner.proc.returncode} before mounting "
                               f"{path}:\n{owner.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or path} not mounted within {timeout:.0f} s")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Runnable(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


def run_then_stop(bench: Runnable) -> None:
    """Run a bench whose ``stop`` ends every process it started: after the run, on an error, and at interpreter
    exit (a signal that ends the interpreter before the ``finally``)."""
    atexit.register(bench.stop)
    try:
        bench.run()
    finally:
        bench.stop()
