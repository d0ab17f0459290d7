"""The agent's record of the tiers its mounts were started with (``services.agent.ledger``): kept across a restart,
written whole, forgotten once a cache is freed, and a file it cannot read is said and taken as empty."""

from __future__ import annotations

from pathlib import Path

import structlog

from libs.events.runtime import Level
from services.agent.ledger import FILE_NAME, TierLedger

SSD = [Level(mediumtype="SSD", quota="1Gi", path="/var/lib/shoal/cache/a,/var/lib/shoal/cache/b")]
MEM = [Level(mediumtype="MEM", quota="256Mi")]


def test_the_tiers_of_each_cache_outlive_the_agent_until_forgotten(tmp_path: Path) -> None:
    ledger = TierLedger(tmp_path / FILE_NAME)
    ledger.load()  # no file yet: nothing known
    assert ledger.caches == {}
    ledger.record(("default", "a"), SSD)
    ledger.record(("ml", "b"), MEM + SSD)
    again = TierLedger(tmp_path / FILE_NAME)
    again.load()
    assert again.caches == {("default", "a"): SSD, ("ml", "b"): MEM + SSD}
    again.forget(("default", "a"))
    again.forget(("default", "never"))
    last = TierLedger(tmp_path / FILE_NAME)
    last.load()
    assert last.caches == {("ml", "b"): MEM + SSD}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temporary file left behind


def test_a_file_it_cannot_read_is_said_and_taken_as_empty(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"caches": [{"namespace": "default"')
    ledger = TierLedger(tmp_path / FILE_NAME)
    with structlog.testing.capture_logs() as logs:
        ledger.load()
    assert ledger.caches == {}
    assert [e["event"] for e in logs] == ["cache tiers file not understood: caches of runtimes deleted meanwhile "
                                          "are not found"]
    ledger.record(("default", "a"), SSD)  # and it is written anew
    again = TierLedger(tmp_path / FILE_NAME)
    again.load()
    assert again.caches == {("default", "a"): SSD}


def test_tiers_waiting_to_be_freed_outlive_the_agent_until_freed(tmp_path: Path) -> None:
    # A mount restarted on new tiers: the old ones' blocks are freed once it is up. An agent restarted before then
    # finds them here; a file written before they were kept reads as none waiting.
    (tmp_path / FILE_NAME).write_text('{"caches": [{"namespace": "default", "name": "a", "levels": []}]}')
    old = TierLedger(tmp_path / FILE_NAME)
    old.load()
    assert (old.caches, old.retired) == ({("default", "a"): []}, {})
    ledger = TierLedger(tmp_path / FILE_NAME)
    ledger.record(("default", "a"), MEM, SSD)
    ledger.record(("default", "a"), MEM)  # no retired given: those written stay
    again = TierLedger(tmp_path / FILE_NAME)
    again.load()
    assert (again.caches, again.retired) == ({("default", "a"): MEM}, {("default", "a"): SSD})
    again.retired_freed(("default", "a"))
    last = TierLedger(tmp_path / FILE_NAME)
    last.load()
    assert (last.caches, last.retired) == ({("default", "a"): MEM}, {})
    last.record(("default", "a"), MEM, SSD)
    last.forget(("default", "a"))
    assert (last.caches, last.retired) == ({}, {})
