"""The mount's memory of failed reads and the rate limit of its "read failed" log lines
(``services.agent.readfailures``), pure: time is a parameter."""

from __future__ import annotations

from services.agent.readfailures import LogLimiter, ReadFailures

T0 = 1_800_000_000.0


def test_one_line_per_file_and_errno_then_one_per_interval_with_the_count_left_out() -> None:
    limiter: LogLimiter[tuple[str, str]] = LogLimiter(interval=30.0)
    key = ("data/model.bin", "ESTALE")
    assert limiter.admit(key, T0, "changed") == 0  # the first is logged at once
    assert [limiter.admit(key, T0 + i / 100, f"changed {i}") for i in range(1, 1000)] == [None] * 999
    # Another file, or the same file failing otherwise, has lines of its own.
    assert limiter.admit(("data/other.bin", "ESTALE"), T0 + 1) == 0
    assert limiter.admit(("data/model.bin", "EIO"), T0 + 1) == 0
    assert limiter.due(T0 + 29.9) == []
    # Once the interval is over, the next failure is logged with the count of those not logged...
    assert limiter.admit(key, T0 + 30) == 999
    assert limiter.admit(key, T0 + 31, "changed again") is None
    # ...and failures not logged when the file stops failing are told in a summary once the interval is over.
    assert limiter.due(T0 + 60) == [(key, 1, "changed again")]
    assert limiter.due(T0 + 120) == []  # told once; the others had nothing left out
    assert limiter.admit(key, T0 + 121) == 0  # forgotten: the next failure is logged at once


def test_a_zero_interval_logs_every_failure() -> None:
    limiter: LogLimiter[str] = LogLimiter(interval=0.0)
    assert [limiter.admit("f", T0) for _ in range(3)] == [0, 0, 0]
    assert limiter.due(T0) == []


def test_failing_files_are_counted_named_latest_first_and_forgotten_after_the_window() -> None:
    failures = ReadFailures(window=60.0)
    for i in range(5):
        failures.failed("a.bin", "ESTALE", "the object changed", T0 + i)
    failures.failed("b.bin", "EIO", "the object store failed: 500", T0 + 10)
    [b, a] = failures.report(T0 + 10)
    assert (b.path, b.errno, b.count, b.since, b.at) == ("b.bin", "EIO", 1, T0 + 10, T0 + 10)
    assert (a.path, a.errno, a.reason, a.count, a.since, a.at) == ("a.bin", "ESTALE", "the object changed", 5,
                                                                  T0, T0 + 4)
    assert [f.path for f in failures.report(T0 + 65)] == ["b.bin"]  # a.bin's last failure is over a minute old
    assert failures.report(T0 + 71) == [] and not failures.files
    # A file failing again after the window starts a new count.
    failures.failed("a.bin", "ESTALE", "again", T0 + 200)
    assert [(f.count, f.since) for f in failures.report(T0 + 200)] == [(1, T0 + 200)]


def test_a_read_that_succeeds_clears_its_file() -> None:
    failures = ReadFailures()
    failures.failed("a.bin", "EIO", "store down", T0)
    failures.failed("b.bin", "EIO", "store down", T0)
    failures.succeeded("a.bin")
    assert [f.path for f in failures.report(T0 + 1)] == ["b.bin"]


def test_reports_and_memory_are_bounded_whatever_fails() -> None:
    failures = ReadFailures(remembered=100)
    long_path = "d/" * 3000 + "file.bin"
    for i in range(1000):
        failures.failed(f"{i}.bin", "EIO", "x" * 100_000, T0 + i / 100)
    failures.failed(long_path, "EIO", "y", T0 + 20)
    assert len(failures.files) == 100
    report = failures.report(T0 + 20)
    assert len(report) == 3 and report[1].path == "999.bin"  # the latest
    assert report[0].path.endswith("d/file.bin") and len(report[0].path) == 300 and report[0].path[0] == "…"
    assert all(len(f.reason) <= 300 for f in report)


def test_failures_of_files_beyond_those_followed_are_counted_in_one_line() -> None:
    """A store that is down fails every file a job reads: each new file got a first line of its own (100,000 files,
    100,000 lines per interval). Beyond the files followed, failures are counted and told in one line."""
    limiter: LogLimiter[tuple[str, str]] = LogLimiter(interval=30.0, most=100)
    logged = [limiter.admit((f"/f{i}", "EIO"), 1.0, f"boom {i}") for i in range(1000)]
    assert logged.count(0) == 100 and logged[100:] == [None] * 900
    assert limiter.others_due(30.0) is None
    others = limiter.others_due(31.0)
    assert others is not None and (others.count, others.key, others.detail) == (900, ("/f999", "EIO"), "boom 999")
    assert limiter.others_due(62.0) is None  # counted afresh
    assert [key for key, _, _ in limiter.due(31.0)] == []  # the followed files had nothing left out
    assert limiter.admit(("/f500", "EIO"), 31.0) == 0  # their interval over, the followed are forgotten: room again
