"""The ring of block owners: deterministic, balanced, and a change of workers moves only the blocks it must."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from libs.ring import owners, primary_owner

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
worker_sets = st.sets(names, min_size=1, max_size=12)
blocks = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50)


@given(worker_sets, blocks)
def test_owners_are_every_worker_once_in_an_order_that_does_not_depend_on_the_input_order(
        workers: set[str], keys: list[str]) -> None:
    for key in keys:
        ranked = owners(key, sorted(workers))
        assert sorted(ranked) == sorted(workers)
        assert owners(key, sorted(workers, reverse=True)) == ranked
        assert owners(key, workers, 2) == ranked[:2]


@given(worker_sets, names, blocks)
def test_a_worker_joining_takes_blocks_only_for_itself(workers: set[str], joining: str, keys: list[str]) -> None:
    grown = workers | {joining}
    for key in keys:
        before, after = owners(key, workers), owners(key, grown)
        # The others keep their relative order: only the newcomer is inserted.
        assert [w for w in after if w != joining] == [w for w in before if w != joining]
        if primary_owner(key, grown) != primary_owner(key, workers):
            assert primary_owner(key, grown) == joining


@given(worker_sets, blocks)
def test_a_worker_leaving_hands_its_blocks_to_their_next_owner(workers: set[str], keys: list[str]) -> None:
    leaving = sorted(workers)[0]
    shrunk = workers - {leaving}
    for key in keys:
        before = owners(key, workers)
        assert owners(key, shrunk) == [w for w in before if w != leaving]


def test_blocks_spread_evenly_over_workers() -> None:
    workers = [f"node-{i}" for i in range(4)]
    counts = Counter(primary_owner(f"block-{i}", workers) for i in range(8000))
    assert set(counts) == set(workers)
    assert all(1700 <= count <= 2300 for count in counts.values()), counts


def test_scaling_three_to_four_workers_moves_about_a_quarter_of_the_blocks() -> None:
    three = ["a", "b", "c"]
    four = [*three, "d"]
    keys = [f"block-{i}" for i in range(4000)]
    moved = [k for k in keys if primary_owner(k, three) != primary_owner(k, four)]
    assert all(primary_owner(k, four) == "d" for k in moved)
    assert 800 <= len(moved) <= 1200


def test_no_workers_no_owner() -> None:
    assert owners("x", []) == []
    assert primary_owner("x", []) is None
