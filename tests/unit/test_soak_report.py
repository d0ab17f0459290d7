"""docs/reliability.md's renderer: rows grouped by area in a fixed order, a fault recorded twice shown once, failed
and skipped tests named instead of hidden, and an empty run refused."""

from __future__ import annotations

import json
from pathlib import Path

from tests.soak import report


def rows_file(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_by_area_once_each_and_the_failures_named(tmp_path: Path) -> None:
    rows = rows_file(tmp_path, [
        {"area": "store", "fault": "503 burst", "effect": "retried", "recovery_seconds": 1.26, "lost": "nothing",
         "test": "tests/x.py::test_a"},
        {"area": "NATS", "fault": "kill a server", "effect": "leader moved", "recovery_seconds": None,
         "lost": "nothing", "test": "tests/y.py::test_b"},
        {"area": "store", "fault": "503 burst", "effect": "retried again", "recovery_seconds": 2.0,
         "lost": "nothing", "test": "tests/x.py::test_a"},
    ])
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite time="12.5"><testcase classname="tests.x" name="test_a"/>'
                     '<testcase classname="tests.z" name="test_c"><failure message="AssertionError: boom"/>'
                     '</testcase></testsuite></testsuites>')
    out = tmp_path / "reliability.md"
    assert report.main([str(rows), str(junit), str(out)]) == 0
    text = out.read_text()
    assert text.index("## NATS") < text.index("## Object store and cache disk")
    assert text.count("503 burst") == 1 and "| retried again | 2.0 | nothing | `test_a` |" in text
    assert "| kill a server | leader moved | — |" in text
    assert "2 tests in 12 s, 1 failed" in text and "- failed: `tests.z::test_c`: AssertionError: boom" in text


def test_no_rows_is_an_error_and_leaves_the_page(tmp_path: Path) -> None:
    out = tmp_path / "reliability.md"
    out.write_text("before")
    assert report.main([str(tmp_path / "missing.jsonl"), str(out)]) == 1
    assert out.read_text() == "before"
