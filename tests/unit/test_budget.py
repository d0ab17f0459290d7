"""Per-node budgets: the accounting rules (pure), the slot file shared by processes, and crash release."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.blocks import BlockId
from libs.events.runtime import Level
from services.agent import budget
from services.agent.cache import BlockCache
from services.agent.nodebudget import BudgetFileError, NodeReadAhead, SlotFile
from services.agent.readahead import MemoryBudget

MiB = 1024 * 1024
BLOCK = 4 * MiB


# --- read-ahead rules ---


def test_a_lone_mount_may_use_the_whole_budget_and_no_more() -> None:
    slots = [0, 0, 0]
    for _ in range(4):
        assert budget.may_take(slots, 1, BLOCK, 16 * MiB)
        slots = budget.after_take(slots, 1, BLOCK)
    assert slots == [0, 16 * MiB, 0]
    assert not budget.may_take(slots, 1, BLOCK, 16 * MiB)
    assert not budget.may_take(slots, 0, BLOCK, 16 * MiB)  # the node's total, not the mount's


def test_a_mount_past_its_share_cannot_take_back_what_another_needs() -> None:
    limit = 16 * MiB
    slots = [16 * MiB, 0]
    assert not budget.may_take(slots, 1, BLOCK, limit)  # full: the newcomer waits for a block to be consumed
    slots = budget.after_give_back(slots, 0, BLOCK)
    assert budget.may_take(slots, 0, BLOCK, limit)  # still alone: it may take the block back
    # The first one holds 12 MiB of a 16 MiB budget; once the second holds anything, the share is 8 MiB.
    slots = budget.after_take(slots, 1, BLOCK)
    assert slots == [12 * MiB, 4 * MiB]
    slots = budget.after_give_back(slots, 0, BLOCK)
    assert not budget.may_take(slots, 0, BLOCK, limit)
    assert budget.may_take(slots, 1, BLOCK, limit)


def test_a_mount_may_always_hold_one_block_when_the_node_has_room() -> None:
    # 20 mounts holding read-ahead: the equal share (1 MiB) is smaller than a block, yet each may hold one.
    slots = [BLOCK] * 19 + [0]
    assert budget.may_take(slots, 19, BLOCK, 80 * MiB)
    assert not budget.may_take(budget.after_take(slots, 19, BLOCK), 19, BLOCK, 80 * MiB)


def test_giving_back_never_goes_below_zero_and_slots_grow_on_demand() -> None:
    assert budget.after_give_back([MiB], 0, BLOCK) == [0]
    assert budget.after_take([], 2, MiB) == [0, 0, MiB]
    assert budget.may_take([], 5, MiB, MiB)
    assert budget.free_slot([0, 1, 3]) == 2
    assert budget.free_slot([]) == 0


operations = st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.sampled_from([MiB, BLOCK, 8 * MiB])),
                      max_size=200)


@given(operations, st.sampled_from([BLOCK, 16 * MiB, 64 * MiB]))
def test_the_node_total_never_exceeds_the_budget(ops: list[tuple[int, bool, int]], limit: int) -> None:
    slots: list[int] = []
    held = [0] * 6
    for slot, take, size in ops:
        if take:
            if budget.may_take(slots, slot, size, limit):
                slots = budget.after_take(slots, slot, size)
                held[slot] += size
        else:
            given_back = min(size, held[slot])
            slots = budget.after_give_back(slots, slot, given_back)
            held[slot] -= given_back
        assert sum(slots) <= limit
        assert all(value >= 0 for value in slots)
        # A mount holding nothing may always start when the node has room for its block.
        assert all(budget.may_take(slots, s, size, limit) for s in range(6) if held[s] == 0
                   and sum(slots) + size <= limit)


# --- MEM tier grants ---


def test_memory_grants_are_capped_by_what_the_node_has_left() -> None:
    assert budget.memory_grant(2 * MiB, 5 * MiB, 0) == 2 * MiB
    assert budget.memory_grant(2 * MiB, 5 * MiB, 4 * MiB) == MiB
    assert budget.memory_grant(2 * MiB, 5 * MiB, 6 * MiB) == 0


def test_memory_quota_sums_mem_levels_only() -> None:
    levels = [Level(mediumtype="MEM", quota="2Mi"), Level(mediumtype="SSD", quota="1Gi", path="/x"),
              Level(mediumtype="MEM", quota=MiB)]
    assert budget.memory_quota(levels) == 3 * MiB


def test_capped_levels_cut_mem_tiers_to_the_grant() -> None:
    mem = Level(mediumtype="MEM", quota="8Mi", high="0.9", low="0.5")
    ssd = Level(mediumtype="SSD", quota="1Gi", path="/cache")
    assert budget.capped_levels([mem, ssd], 8 * MiB) == [mem, ssd]  # untouched when the whole quota is granted
    (cut, disk) = budget.capped_levels([mem, ssd], 3 * MiB)
    assert (cut.quota, cut.high, cut.low, disk) == (3 * MiB, "0.9", "0.5", ssd)
    assert budget.capped_levels([mem, ssd], 0) == [ssd]  # nothing left: no MEM tier, the disk still caches
    (alone,) = budget.capped_levels([mem], 0)  # a tier cannot be empty: one that admits no block
    assert (alone.mediumtype, alone.quota) == ("MEM", budget.NOTHING_GRANTED_QUOTA)
    second = Level(mediumtype="MEM", quota="8Mi")
    assert [level.quota for level in budget.capped_levels([mem, second], 10 * MiB)] == ["8Mi", 2 * MiB]


# --- the slot file ---


def test_slot_file_is_shared_by_every_opener(tmp_path: Path) -> None:
    path = str(tmp_path / "readahead.slots")
    agent = SlotFile.create(path, 8 * MiB)
    one, two = SlotFile(path), SlotFile(path)
    try:
        assert one.limit == 8 * MiB
        assert one.try_take(0, BLOCK)
        assert two.try_take(3, BLOCK)
        assert not two.try_take(3, MiB)
        assert agent.slots() == [BLOCK, 0, 0, BLOCK]
        one.give_back(0, BLOCK)
        assert two.try_take(3, MiB)  # alone again: past the equal share is fine
        agent.zero(3)
        assert agent.slots() == [0, 0, 0, 0]
    finally:
        for file in (agent, one, two):
            file.close()


def test_a_file_that_is_not_a_budget_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"not a budget file at all")
    with pytest.raises(BudgetFileError):
        SlotFile(str(other))


def test_memory_budget_takes_from_the_node_and_gives_back_only_what_it_took(tmp_path: Path) -> None:
    path = str(tmp_path / "readahead.slots")
    agent = SlotFile.create(path, 2 * BLOCK)
    node = SlotFile(path)
    try:
        first = MemoryBudget(node.limit, node=NodeReadAhead(node, 0))
        second = MemoryBudget(node.limit, node=NodeReadAhead(node, 1))
        assert first.try_take(BLOCK) and second.try_take(BLOCK)
        assert not first.try_take(BLOCK)
        first.give_back(BLOCK)
        first.give_back(BLOCK)  # more than it holds: the other mount's bytes are not freed
        assert agent.slots() == [0, BLOCK]
        assert first.used == 0
    finally:
        agent.close()
        node.close()


_TAKER = """
import os, signal, sys
from services.agent.nodebudget import SlotFile
file = SlotFile(sys.argv[1])
assert file.try_take(int(sys.argv[2]), int(sys.argv[3]))
print("taken", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_crashed_process_holds_its_slot_until_released(tmp_path: Path) -> None:
    path = str(tmp_path / "readahead.slots")
    agent = SlotFile.create(path, 2 * BLOCK)
    try:
        run = subprocess.run([sys.executable, "-c", _TAKER, path, "1", str(2 * BLOCK)], capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).parents[2])
        assert run.returncode == -signal.SIGKILL and run.stdout == "taken\n", run.stderr
        assert not agent.try_take(0, BLOCK)  # the dead process's read-ahead is still counted...
        agent.zero(1)  # ...until the agent, seeing it exit, frees its slot
        assert agent.try_take(0, BLOCK)
    finally:
        agent.close()


def _hammer(path: str, slot: int, rounds: int) -> None:
    file = SlotFile(path)
    held = 0
    for round_ in range(rounds):
        if round_ % 3 != 2 and file.try_take(slot, BLOCK):
            held += BLOCK
        elif held:
            file.give_back(slot, BLOCK)
            held -= BLOCK
    file.give_back(slot, held)
    os._exit(0)


def test_concurrent_processes_never_exceed_the_budget(tmp_path: Path) -> None:
    path = str(tmp_path / "readahead.slots")
    limit = 3 * BLOCK
    agent = SlotFile.create(path, limit)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(path, slot, 1500)) for slot in range(4)]
    try:
        for worker in workers:
            worker.start()
        peak = 0
        while any(worker.is_alive() for worker in workers):
            total = sum(agent.slots())
            assert total <= limit
            peak = max(peak, total)
        assert [worker.exitcode for worker in workers] == [0] * 4
        assert sum(agent.slots()) == 0
        assert peak > BLOCK  # the processes did contend for the budget
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        agent.close()


def test_a_mount_granted_no_memory_still_builds_a_cache_that_holds_nothing() -> None:
    cache = BlockCache.from_levels(budget.capped_levels([Level(mediumtype="MEM", quota="8Mi")], 0), "default/d")
    assert not cache.put(BlockId(0, "k", "e", 0), b"x" * 1024)  # reads go through to the store
    assert cache.stats().capacity_bytes == budget.NOTHING_GRANTED_QUOTA
