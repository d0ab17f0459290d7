"""Where each dataset's cache was kept on this node, remembered across the agent's restarts.

A runtime's record says where its tiers are; once the runtime is deleted nothing says it any more. So the agent
writes down the tiers of every mount it starts, before the mount process can write a block, in a file of its own
(``FILE_NAME`` in its mount root: kept on the node, a hostPath in a cluster), and forgets a dataset's entry once
its cache is freed. At its start it looks in these tiers as well as in those of the runtimes that exist, so the
blocks of a dataset deleted together with its runtime while the agent was down are found and freed. Only folders
holding a tier's ``MARKER`` are taken for a cache there, as in the runtimes' tiers: an entry (stale, or a file
edited by hand) naming another folder deletes nothing.

With each cache's tiers it keeps those of the mounts stopped for a change of tiers (``retired``) until the agent has
freed their blocks in the directories the new tiers dropped (``services.agent.retire``), which it does once the
mount runs on the new tiers: an agent restarted in between (the new tiers written down, the new mount not up yet)
finds them here and frees them then, instead of leaving them on disk for ever; or with the rest of the cache, and
looks for it there too, if the dataset was deleted meanwhile.

With each cache it keeps the dataset's incarnation its mount was started for: a dataset deleted and applied again
while the agent was down, or while its mount was stopped and its blocks kept, is another incarnation, and the
blocks are the old dataset's, freed as on a delete.

A file that cannot be read or decoded is said in the log and taken as empty: the agent still runs, and finds what
the runtimes that exist say.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from libs.events.runtime import Level
from libs.telemetry import get_logger

log = get_logger(__name__)

# In the agent's mount root, whose entries are <namespace>/<name> folders: a name starting with a dot is no
# namespace (DNS labels cannot start with one).
FILE_NAME = ".shoal-cache-tiers.json"

Ref = tuple[str, str]


class _Entry(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    name: str
    levels: list[Level]
    # The tiers of mounts stopped for a change of tiers, whose dropped directories are not freed yet (absent in a
    # file of an agent from before they were written down: none).
    retired: list[Level] = []
    # Which life of the dataset (``DatasetRecord.incarnation``) the blocks are of: a record of another one means the
    # dataset was deleted and applied again unseen, and these blocks are the old one's (absent in older files: "").
    incarnation: str = ""


class _File(msgspec.Struct, frozen=True, kw_only=True):
    # The dataset caches this agent started mounts for and has not freed yet, with their runtime's tiers then.
    caches: list[_Entry] = []


class TierLedger:
    """The tiers of each dataset cache this node's mounts were started with, in the file at ``path`` (None: kept
    in memory only). Blocking file I/O: the agent calls it off its event loop."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.caches: dict[Ref, list[Level]] = {}
        self.retired: dict[Ref, list[Level]] = {}
        self.incarnations: dict[Ref, str] = {}  # only those known ("" is not kept)

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("cache tiers file not readable: caches of runtimes deleted meanwhile are not found",
                        path=str(self.path), error=str(err))
            return
        try:
            entries = msgspec.json.decode(data, type=_File).caches
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.warning("cache tiers file not understood: caches of runtimes deleted meanwhile are not found",
                        path=str(self.path), error=str(err))
            return
        self.caches = {(entry.namespace, entry.name): list(entry.levels) for entry in entries}
        self.retired = {(entry.namespace, entry.name): list(entry.retired) for entry in entries if entry.retired}
        self.incarnations = {(entry.namespace, entry.name): entry.incarnation for entry in entries if entry.incarnation}

    def record(self, ref: Ref, levels: list[Level], retired: list[Level] | None = None,
               incarnation: str | None = None) -> None:
        """Remember that ``ref``'s cache is kept in ``levels``, had blocks in ``retired`` not freed yet, and holds
        blocks of its ``incarnation`` (None: as written before); written at once when that is news."""
        retired = self.retired.get(ref, []) if retired is None else retired
        incarnation = self.incarnations.get(ref, "") if incarnation is None else incarnation
        if (self.caches.get(ref) == levels and self.retired.get(ref, []) == retired
                and self.incarnations.get(ref, "") == incarnation):
            return
        self.caches[ref] = list(levels)
        if incarnation:
            self.incarnations[ref] = incarnation
        else:
            self.incarnations.pop(ref, None)
        if retired:
            self.retired[ref] = list(retired)
        else:
            self.retired.pop(ref, None)
        self._save()

    def retired_freed(self, ref: Ref) -> None:
        """The blocks of ``ref``'s retired tiers are freed (or said to be left): nothing to free at a restart."""
        if self.retired.pop(ref, None) is not None:
            self._save()

    def forget(self, ref: Ref) -> None:
        """``ref``'s cache is freed: nothing to look for any more."""
        had = self.caches.pop(ref, None) is not None
        self.incarnations.pop(ref, None)
        if self.retired.pop(ref, None) is not None or had:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        entries = [_Entry(namespace=ns, name=name, levels=levels, retired=self.retired.get((ns, name), []),
                          incarnation=self.incarnations.get((ns, name), ""))
                   for (ns, name), levels in sorted(self.caches.items())]
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(temporary, "wb") as out:
                out.write(msgspec.json.encode(_File(caches=entries)))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)  # whole or not at all: a crash leaves the previous file
        except OSError as err:
            log.warning("cache tiers file not written: a cache whose runtime is deleted while the agent is down "
                        "may stay on disk", path=str(self.path), error=str(err))
