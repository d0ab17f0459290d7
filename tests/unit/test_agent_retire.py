"""Freeing a dataset's cache folder in a tier directory its runtime dropped (``services.agent.retire``), on a real
filesystem: only that folder's blocks, never through a symbolic link, never a folder in use."""

from __future__ import annotations

import os
from pathlib import Path

from libs.events.agent import BlockId
from services.agent.cache import DiskTier
from services.agent.cache.tiers import MARKER
from services.agent.retire import free_folder

SUFFIX = "default/demo"


def cache_with_blocks(folder: Path, count: int, size: int = 1000) -> DiskTier:
    """A disk tier at ``folder`` holding ``count`` blocks of ``size`` bytes, as a mount process writes them."""
    tier = DiskTier(folder, 1 << 30)
    tier.scan()  # claims the folder (its marker)
    for index in range(count):
        block = BlockId(mount=0, key="k", etag="e", index=index)
        assert tier.write(block, bytes([index]) * size)
    return tier


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_the_blocks_of_the_folder_are_deleted_and_counted_and_the_folder_goes(tmp_path: Path) -> None:
    cache_with_blocks(tmp_path / "old" / SUFFIX, 3)
    cache_with_blocks(tmp_path / "old" / "default/neighbour", 2)  # another dataset in the same tier directory
    freed = free_folder(str(tmp_path / "old"), SUFFIX, [str(tmp_path / "new" / SUFFIX)])
    assert (freed.blocks, freed.bytes, freed.refused) == (3, 3000, "")
    assert not (tmp_path / "old" / SUFFIX).exists()
    assert len(files(tmp_path / "old" / "default/neighbour")) == 3, "the neighbour's two blocks and marker stay"


def test_nothing_there_is_nothing_to_free(tmp_path: Path) -> None:
    freed = free_folder(str(tmp_path / "gone"), SUFFIX, [])
    assert (freed.blocks, freed.refused) == (0, "")
    assert not (tmp_path / "gone").exists(), "nothing is created"


def test_a_symbolic_link_below_the_tier_directory_is_not_followed(tmp_path: Path) -> None:
    # The folder (or its namespace folder) points at another dataset's cache: freeing it would delete that one.
    other = tmp_path / "other" / "default/precious"
    cache_with_blocks(other, 2)
    (tmp_path / "old" / "default").mkdir(parents=True)
    (tmp_path / "old" / SUFFIX).symlink_to(other)
    freed = free_folder(str(tmp_path / "old"), SUFFIX, [])
    assert freed.blocks == 0 and "symbolic link" in freed.refused
    (tmp_path / "old2").mkdir()
    (tmp_path / "old2" / "default").symlink_to(tmp_path / "other" / "default")
    os.rename(other, tmp_path / "other" / "default" / "demo")
    freed = free_folder(str(tmp_path / "old2"), SUFFIX, [])
    assert freed.blocks == 0 and "symbolic link" in freed.refused
    assert len(files(tmp_path / "other")) == 3


def test_a_tier_directory_that_is_a_symbolic_link_is_freed_unless_it_leads_to_a_folder_in_use(tmp_path: Path) -> None:
    cache_with_blocks(tmp_path / "disk" / SUFFIX, 2)
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    # The runtime moved from /link to /disk: one folder, spelled two ways; the mount uses it now.
    freed = free_folder(str(tmp_path / "link"), SUFFIX, [str(tmp_path / "disk" / SUFFIX)])
    assert freed.blocks == 0 and "in use" in freed.refused
    assert len(files(tmp_path / "disk" / SUFFIX)) == 3
    # Moved somewhere else: the link is the tier directory as the runtime named it, its folder is the dataset's.
    freed = free_folder(str(tmp_path / "link"), SUFFIX, [str(tmp_path / "elsewhere" / SUFFIX)])
    assert (freed.blocks, freed.refused) == (2, "")


def test_a_folder_nested_in_one_in_use_or_holding_one_is_not_freed(tmp_path: Path) -> None:
    cache_with_blocks(tmp_path / "t" / SUFFIX, 1)
    # Tier directories nested in one another: /t/default/demo/x is a folder in use below the one to free.
    assert "in use" in free_folder(str(tmp_path / "t"), SUFFIX, [str(tmp_path / "t" / SUFFIX / "x" / SUFFIX)]).refused
    assert "in use" in free_folder(str(tmp_path / "t"), SUFFIX, [str(tmp_path / "t" / "default")]).refused
    assert len(files(tmp_path / "t" / SUFFIX)) == 2


def test_a_folder_shoal_did_not_make_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "old" / SUFFIX
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    freed = free_folder(str(tmp_path / "old"), SUFFIX, [])
    assert freed.blocks == 0 and MARKER in freed.refused
    assert (folder / "notes.txt").read_text() == "mine"
