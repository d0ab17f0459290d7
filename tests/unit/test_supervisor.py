"""The one backoff and the child-process supervisor, with an injected clock and fake processes."""

from __future__ import annotations

from dataclasses import dataclass

from libs.backoff import REDELIVERY, RESTART
from libs.supervisor import RestartPolicy, Supervisor


@dataclass
class FakeProcess:
    code: int | None = None


def test_restart_backoff_doubles_from_one_second_to_thirty() -> None:
    assert [RESTART.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert REDELIVERY.delay(0) == REDELIVERY.delay(1) == 0.5
    assert RESTART.delay(10**9) == 30.0


def crash(supervisor: Supervisor[FakeProcess], name: str, now: float) -> float:
    """Kill the child's process at ``now``; return the restart delay the supervisor chose."""
    child = supervisor.children[name]
    assert child.process is not None
    child.process.code = 1
    exits, _ = supervisor.step(now)
    assert [e.child.name for e in exits] == [name]
    return exits[0].delay


def restart(supervisor: Supervisor[FakeProcess], name: str, now: float) -> None:
    _, due = supervisor.step(now)
    assert [child.name for child in due] == [name]
    supervisor.started(due[0], FakeProcess(), now)


def test_a_child_is_restarted_with_growing_delays_and_counts_as_failing_after_three_exits() -> None:
    supervisor: Supervisor[FakeProcess] = Supervisor(lambda p: p.code, RestartPolicy(failing_after=3))
    supervisor.add("mount", now=0.0)
    restart(supervisor, "mount", now=0.0)
    now, delays = 0.0, []
    for _ in range(4):
        now += 0.5
        delays.append(crash(supervisor, "mount", now))
        assert supervisor.step(now + delays[-1] - 0.01)[1] == []  # not due before its delay
        now += delays[-1]
        restart(supervisor, "mount", now)
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert [child.name for child in supervisor.failing()] == ["mount"]


def test_backoff_resets_after_the_child_ran_stably() -> None:
    """A crash hours after the last one restarts after the first delay again, and the child is healthy again."""
    supervisor: Supervisor[FakeProcess] = Supervisor(lambda p: p.code, RestartPolicy(stable_after=60.0))
    supervisor.add("mount", now=0.0)
    restart(supervisor, "mount", now=0.0)
    now = 0.0
    for _ in range(4):  # a crash loop: 1, 2, 4, 8 s
        now += 0.1
        now += crash(supervisor, "mount", now)
        restart(supervisor, "mount", now)
    assert supervisor.children["mount"].failures == 4
    assert supervisor.failing()

    supervisor.step(now + 61.0)  # ran stably for a minute: the count starts over and it is no longer failing
    assert supervisor.children["mount"].failures == 0
    assert supervisor.failing() == []

    hours_later = now + 3 * 3600.0
    assert crash(supervisor, "mount", hours_later) == 1.0


def test_an_exit_after_a_long_run_counts_as_the_first_failure_even_without_a_step_in_between() -> None:
    supervisor: Supervisor[FakeProcess] = Supervisor(lambda p: p.code, RestartPolicy(stable_after=60.0))
    supervisor.add("svc", now=0.0)
    restart(supervisor, "svc", now=0.0)
    for now in (1.0, 3.0, 7.0):
        crash(supervisor, "svc", now)
        restart(supervisor, "svc", supervisor.children["svc"].restart_at)
    started = supervisor.children["svc"].started_at
    assert crash(supervisor, "svc", started + 3600.0) == 1.0
    assert supervisor.children["svc"].failures == 1


def test_removed_children_are_no_longer_started() -> None:
    supervisor: Supervisor[FakeProcess] = Supervisor(lambda p: p.code)
    supervisor.add("a", now=0.0)
    supervisor.add("b", now=0.0)
    supervisor.remove("a")
    assert [child.name for child in supervisor.step(0.0)[1]] == ["b"]
