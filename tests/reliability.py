"""What a fault test saw, for docs/reliability.md: each fault tried, what it did, how long recovery took, and what
was lost.

A fault test calls ``record_fault`` once it has asserted its outcome. Nothing is written unless
``SHOAL_RELIABILITY_REPORT`` names a file (``make soak`` sets it, then renders the table from the lines); in a plain
``make test`` the call costs nothing. Lines are appended, one JSON object each, so tests in parallel workers can
share the file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

REPORT_ENV = "SHOAL_RELIABILITY_REPORT"


def record_fault(fault: str, effect: str, recovery_seconds: float | None, lost: str = "nothing",
                 area: str = "") -> None:
    """Append one row: ``fault`` (what was done, e.g. "kill -9 of one of three NATS servers while commands
    flow"), ``effect`` (what users saw), ``recovery_seconds`` (from the fault to the asserted recovery; None when
    nothing had to recover), ``lost`` (what was lost or done twice; "nothing" when the test asserted so), ``area``
    (a heading to group rows: "NATS", "services", "agents", "store", "input", "security", "load")."""
    path = os.environ.get(REPORT_ENV, "")
    if not path:
        return
    row = {"area": area, "fault": fault, "effect": effect,
           "recovery_seconds": None if recovery_seconds is None else round(recovery_seconds, 2), "lost": lost,
           "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}
    with open(path, "a", encoding="utf-8") as report:
        report.write(json.dumps(row) + "\n")


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Seconds from entering to leaving, in ``elapsed[0]`` once the block is done (a recovery time to report)."""
    elapsed = [0.0]
    start = time.monotonic()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.monotonic() - start
