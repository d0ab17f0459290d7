"""Supervision of child processes: when a child that exited is started again, and when it counts as failing.

``shoal up`` supervises the services and the node agent supervises its mount processes with this one
``Supervisor``. It is pure bookkeeping with the time as a parameter; the caller owns the processes: it calls
``step(now)`` every so often, then logs the exits it returns and starts the children it says are due (blocking
``subprocess`` children in ``shoal up``, asyncio ones in the agent).

Restart rule: the n-th consecutive failure waits ``RESTART.delay(n)`` (1 s doubling to 30 s). A child that has run
for ``stable_after`` seconds was healthy, so its failure count goes back to zero: a crash hours after the last
one restarts after 1 s, not 30. A child with ``failing_after`` consecutive failures or more is *failing*, which
the agent reports in its heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from libs.backoff import RESTART, Backoff

P = TypeVar("P")


@dataclass(frozen=True)
class RestartPolicy:
    backoff: Backoff = RESTART
    # A minute of running is far longer than any start-up failure takes to show (bad settings, an unreachable
    # server, a mount that cannot be made): a child that lasted this long was working.
    stable_after: float = 60.0
    # Three exits in a row without a stable run: 1 + 2 s of backoff, so a broken child shows within seconds
    # while a single crash (the agent restarted, a kill -9) does not.
    failing_after: int = 3


@dataclass
class Child(Generic[P]):
    """One supervised child: its current process (None while it waits for a restart) and its bookkeeping."""

    name: str
    process: P | None = None
    started_at: float = 0.0
    failures: int = 0  # consecutive exits without a stable run in between
    restart_at: float = 0.0  # when a child without a process is due to start
    last_exit: int | None = None

    def failing(self, policy: RestartPolicy) -> bool:
        return self.failures >= policy.failing_after


@dataclass(frozen=True)
class Exit(Generic[P]):
    """A child's process exited: with which code, after how many consecutive failures, restarted in ``delay``."""

    child: Child[P]
    process: P
    code: int
    failures: int
    delay: float


@dataclass
class Supervisor(Generic[P]):
    """The children, by name. ``exit_code(process)`` is None while the process runs (``Popen.poll``,
    ``asyncio.subprocess.Process.returncode``)."""

    exit_code: Callable[[P], int | None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    children: dict[str, Child[P]] = field(default_factory=dict)

    def add(self, name: str, now: float) -> Child[P]:
        """A new child, due to start at once."""
        child = self.children[name] = Child(name, restart_at=now)
        return child

    def remove(self, name: str) -> Child[P] | None:
        return self.children.pop(name, None)

    def started(self, child: Child[P], process: P, now: float) -> None:
        child.process = process
        child.started_at = now

    def step(self, now: float) -> tuple[list[Exit[P]], list[Child[P]]]:
        """Exits seen since the last step (each schedules a restart), and the children due to start now."""
        exits: list[Exit[P]] = []
        for child in self.children.values():
            process = child.process
            if process is None:
                continue
            code = self.exit_code(process)
            if code is None:
                if now - child.started_at >= self.policy.stable_after:
                    child.failures = 0  # running stably: whatever failed before is history
                continue
            child.failures = 1 if now - child.started_at >= self.policy.stable_after else child.failures + 1
            delay = self.policy.backoff.delay(child.failures)
            child.process, child.restart_at, child.last_exit = None, now + delay, code
            exits.append(Exit(child, process, code, child.failures, delay))
        due = [child for child in self.children.values() if child.process is None and now >= child.restart_at]
        return exits, due

    def failing(self) -> list[Child[P]]:
        return [child for child in self.children.values() if child.failing(self.policy)]
