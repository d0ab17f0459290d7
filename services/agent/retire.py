"""Freeing a dataset's cache folder in a tier directory its runtime no longer names (the I/O; which directories is
``domain.retired_directories``).

A mount process builds its cache from its runtime's tiers once, at start; when the tiers change, the agent starts it
again on the new ones, and its blocks in a directory the new tiers dropped would stay on disk for ever, in no tier's
quota. Once the new process is mounted, the agent deletes them here: only the dataset's own folder
``<directory>/<cache suffix>`` (``domain.cache_suffix``), only if it is a cache folder Shoal made (its ``MARKER``),
and only what a cache would delete in it (block files, unfinished writes and garbled files in its shard folders,
then the emptied folders: ``DiskTier``). Nothing is deleted when:

- the folder, or a folder between it and the tier directory, is a symbolic link: freeing it would delete what the
  link points to (another dataset's cache, or another tier of this one);
- the folder is, contains or lies within a folder in use (``in_use``: the cache folders of every mount the agent
  runs or will run, in their current tiers), however spelled: a directory that is another's by a symbolic link, or
  tier directories nested in one another.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from services.agent.cache.tiers import MARKER, DiskTier

# Why a folder is left when another process holds its lock: the only refusal that passes, so its blocks are freed later.
IN_USE = "a mount process uses it (one that outlived an earlier agent)"


@dataclass(frozen=True)
class Freed:
    """What freeing one folder did: the blocks and their bytes deleted, or why nothing was (``refused``)."""

    folder: str
    blocks: int = 0
    bytes: int = 0
    refused: str = ""


def _overlap(one: str, other: str) -> bool:
    return one == other or one.startswith(other.rstrip("/") + "/") or other.startswith(one.rstrip("/") + "/")


def free_folder(directory: str, suffix: str, in_use: Iterable[str]) -> Freed:
    """Delete the blocks of the cache folder ``<directory>/<suffix>`` (blocking file I/O: run it off the loop)."""
    folder = os.path.join(directory, suffix)
    if not os.path.lexists(folder):
        return Freed(folder)  # nothing left there (the usual case after a clean stop: never made, or freed)
    real = os.path.realpath(folder)
    if real != os.path.join(os.path.realpath(directory), suffix) or not os.path.isdir(real):
        return Freed(folder, refused="a symbolic link (or no folder) below the tier directory: what it points to "
                                     "is not this dataset's to delete")
    for used in in_use:
        if _overlap(real, os.path.realpath(used)):
            return Freed(folder, refused=f"it is, holds or lies in the cache folder {used}, in use")
    if not os.path.isfile(os.path.join(real, MARKER)) or os.path.islink(os.path.join(real, MARKER)):
        return Freed(folder, refused=f"not a cache folder Shoal made (no {MARKER})")
    tier = DiskTier(real, 1)  # the quota is not used: nothing is admitted, only scanned and removed
    if not tier.hold(exclusive=True):
        return Freed(folder, refused=IN_USE)
    blocks = freed = 0
    for block in tier.scan():
        if tier.remove(block.name):
            blocks, freed = blocks + 1, freed + block.size
    tier.remove_empty_directories()
    tier.release()
    return Freed(folder, blocks=blocks, bytes=freed)
