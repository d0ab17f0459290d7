"""The agent's block cache: tiers of memory and disk that keep dataset blocks between reads.

Design (one module per concern):

* ``eviction`` — pure decisions, no I/O and no clock: per tier, an in-memory index in LRU order that answers
  "may this block enter, and whom does it displace?" (``EvictionPolicy.plan``).
* ``tiers`` — storage: ``MemoryTier`` (a dict) and ``DiskTier`` (one checksummed file per block, written
  atomically, verified on every read (its chunks and the block id it holds), with normal → unstable → down health
  so a failing disk is bypassed).
* ``store`` — ``BlockCache``: the index of which tier holds which block, hit/miss accounting, and the plans
  applied to the tiers; ``BlockCache.from_levels`` builds it from a Runtime's ``tieredstore.levels``.
* ``locks`` — who holds a cache folder's lock (``/proc/locks``), and the short lock between a start saying it owns
  the folder and an older process's compare-and-rename of its index.

Policy: the default ``FrequencyAdmissionPolicy`` evicts in LRU order but lets a new block in over the LRU victim
only if it has been accessed clearly more often (ties keep the resident), so shuffled epochs over a dataset larger
than the cache keep hitting a stable subset (0.475 per epoch for a dataset twice the tier, where LRU gets about
0.1); counts are halved every 10 x the tier's block count lookups so a new working set takes over.

Knobs: per tier the quota and the watermarks ``high``/``low`` (fractions of the quota: past ``high`` the tier
evicts down to ``low``, Fluid's defaults 0.95/0.7); per policy ``admission_margin`` (2), ``table_factor`` (4),
``aging_factor`` (10); per disk tier ``cooldown_seconds`` (30, before a down tier is probed again) and ``fsync``
(off: a torn block fails its checksum and is fetched again). Each disk level's directory gets the dataset's
``<namespace>/<name>`` appended, so datasets never share a folder; a comma-separated path gives one tier per
directory with its own quota (Fluid's ``quotaList``) or an equal share of the level's.

Restarts: a clean stop writes each disk tier's index (``BlockCache.save_index``); ``BlockCache.start`` reads it
and the cache serves (a block not indexed is looked for on disk when asked for), then ``BlockCache.scan_rest``
finds the block files no index listed (after a crash: all) in worker threads while it serves; a clean meanwhile
scans the shards the scan has not taken (``BlockCache.sweep_rest``). ``BlockCache.load`` does both inline (tools,
tests).

Threads: one event loop owns ``BlockCache``; only ``Reservation.write`` (file writes and victim deletes) runs in a
worker thread, via ``BlockCache.put_async``, and so do the scans' and ``BlockCache.purge_async``'s file I/O.
Reads run inline: ~0.6 ms per 4 MiB block from the page cache, checksum included.
"""

from services.agent.cache.eviction import EvictionPolicy, FrequencyAdmissionPolicy, LruPolicy, PolicyFactory
from services.agent.cache.store import BlockCache, CacheStats, Reservation, TierStats
from services.agent.cache.tiers import (
    BlockFile,
    DiskTier,
    FillBuffer,
    Health,
    MemoryTier,
    ScanCancelled,
    ScannedBlock,
    Tier,
)

__all__ = [
    "BlockCache",
    "BlockFile",
    "CacheStats",
    "DiskTier",
    "EvictionPolicy",
    "FillBuffer",
    "FrequencyAdmissionPolicy",
    "Health",
    "LruPolicy",
    "MemoryTier",
    "PolicyFactory",
    "Reservation",
    "ScanCancelled",
    "ScannedBlock",
    "Tier",
    "TierStats",
]
