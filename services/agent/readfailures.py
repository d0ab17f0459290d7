"""What a mount process remembers of its failed reads, pure (``now`` is a parameter): the files whose reads fail
lately, for its status file and so the heartbeat and the runtime's ``ReadsFailing`` condition; and which "read
failed" log lines to write, so a job looping over a changed file does not write one line per FUSE read.

``ReadFailures``: per file, how many reads failed since its failures began, the errno, the last reason and when.
A file is forgotten when one of its reads succeeds (after a resync, say) or ``WINDOW_SECONDS`` after its last
failure, so the condition clears by itself. ``LogLimiter``: per (file, errno) the first failure is logged at
once, then at most one line per ``LOG_INTERVAL_SECONDS``, which counts the failures not logged since; failures not
logged when a file stops failing are told in a summary line once the interval is over (``due``). At most
``LOGGED_FILES`` files are followed at once: beyond them (a store that is down fails every file a job reads) the
failures of other files are only counted, and told in one line once the interval is over (``others_due``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from libs.events.agent import ReadFailure

K = TypeVar("K", bound=Hashable)

# A file is reported as failing for this long after its last failed read: a heartbeat (every 5 s by default) and
# the runtime service surely see it, and a user looking a minute later still finds why their job got EIO.
WINDOW_SECONDS = 60.0
# Files a status file lists (the latest failures): enough to name what is wrong, small in every heartbeat.
REPORTED_FILES = 3
# Files remembered at once: a store that is down fails every file read, and memory must not grow with them.
REMEMBERED_FILES = 1000
# A reason in a status is this long at most: a status line, not the store's whole answer (logs carry more).
REASON_CHARS = 300
# Paths are up to 4096 bytes; a status names the file, and its end is what tells files apart.
PATH_CHARS = 300
# One "read failed" line per file and errno at most this often.
LOG_INTERVAL_SECONDS = 30.0


def shorten(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis (at the start with ``keep_end``)."""
    if len(text) <= limit:
        return text
    return "…" + text[len(text) - limit + 1:] if keep_end else text[:limit - 1] + "…"


@dataclass
class _Failing:
    errno: str
    reason: str
    count: int
    since: float
    at: float


class ReadFailures:
    """The files of one mount whose reads failed lately."""

    def __init__(self, window: float = WINDOW_SECONDS, remembered: int = REMEMBERED_FILES) -> None:
        self.window = window
        self.remembered = remembered
        # Empty almost always: the read path tests it before looking a file up.
        self.files: dict[str, _Failing] = {}

    def failed(self, path: str, errno: str, reason: str, now: float) -> None:
        failing = self.files.get(path)
        if failing is None or now - failing.at > self.window:
            self.files.pop(path, None)
            if len(self.files) >= self.remembered:  # the one failing the longest ago goes
                del self.files[min(self.files, key=lambda name: self.files[name].at)]
            self.files[path] = _Failing(errno, reason, 1, now, now)
            return
        failing.errno, failing.reason, failing.at = errno, reason, now
        failing.count += 1

    def succeeded(self, path: str) -> None:
        self.files.pop(path, None)

    def report(self, now: float, limit: int = REPORTED_FILES) -> list[ReadFailure]:
        """The files that failed within the window, the latest first (``limit`` of them); older ones forgotten."""
        for path in [path for path, failing in self.files.items() if now - failing.at > self.window]:
            del self.files[path]
        latest = sorted(self.files.items(), key=lambda item: (-item[1].at, item[0]))[:limit]
        return [ReadFailure(path=shorten(path, PATH_CHARS, keep_end=True), errno=failing.errno,
                            reason=shorten(failing.reason, REASON_CHARS), count=failing.count,
                            since=failing.since, at=failing.at)
                for path, failing in latest]


# Files the log limiter follows at once, each with a first line of its own: a job reading 100,000 files from a
# store that is down would otherwise log 100,000 first lines per interval.
LOGGED_FILES = 100


@dataclass
class _Logged:
    at: float
    suppressed: int = 0
    detail: str = ""


@dataclass
class Others(Generic[K]):
    """Failures of files beyond those followed, since ``since``: how many, and the last one's key and detail."""

    since: float
    count: int
    key: K
    detail: str


class LogLimiter(Generic[K]):
    """Which failures to log, per key: the first at once, then one per ``interval`` with the count left out."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS, most: int = LOGGED_FILES) -> None:
        self.interval = interval
        self.most = most
        self._keys: dict[K, _Logged] = {}
        self._others: Others[K] | None = None

    def admit(self, key: K, now: float, detail: str = "") -> int | None:
        """None: do not log this one (its ``detail`` is kept for the summary); else log it, saying how many were
        not logged since the last line."""
        logged = self._keys.get(key)
        if logged is None and len(self._keys) >= self.most:
            others = self._others or Others(since=now, count=0, key=key, detail=detail)
            others.count, others.key, others.detail = others.count + 1, key, detail
            self._others = others
            return None
        if logged is None or now - logged.at >= self.interval:
            suppressed = logged.suppressed if logged is not None else 0
            self._keys[key] = _Logged(at=now)
            return suppressed
        logged.suppressed += 1
        logged.detail = detail
        return None

    def due(self, now: float) -> list[tuple[K, int, str]]:
        """The keys whose interval is over and that have failures not logged since their last line: each with
        their count and the last one's detail, for a summary line. Every key whose interval is over is forgotten,
        so its next failure is logged at once."""
        over = [(key, logged) for key, logged in self._keys.items() if now - logged.at >= self.interval]
        for key, _ in over:
            del self._keys[key]
        return [(key, logged.suppressed, logged.detail) for key, logged in over if logged.suppressed]

    def others_due(self, now: float) -> Others[K] | None:
        """The failures of files beyond those followed, once an interval has passed since the first of them (then
        counted afresh); None before, or when there were none."""
        others = self._others
        if others is None or now - others.since < self.interval:
            return None
        self._others = None
        return others
