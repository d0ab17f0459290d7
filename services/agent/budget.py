"""Per-node budgets, pure: read-ahead memory shared by every mount process of a node, and MEM tier grants.

Read-ahead (dynamic): each mount process holds some bytes of blocks fetched ahead, in its own slot; a mount may
take more only while the node's total stays within the budget (``SHOAL_READAHEAD_BUDGET``) and, when other mounts
hold read-ahead too, only up to an equal share of the budget among the mounts holding some (always at least one
block). So a lone busy mount may use the whole budget, and a second one that starts reading gets its share as the
first one's blocks are consumed: the first cannot take them again past its share. The file the slots live in,
and its lock, are ``services.agent.nodebudget``.

MEM tiers (static): the agent grants each mount process at most its runtime's MEM quota out of what the node's
``SHOAL_MEMORY_TIER_BUDGET`` has left, when it starts the process; the grant is the mount's until it stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from libs.events.common import parse_quantity
from libs.events.runtime import Level

MEDIUM_MEM = "MEM"
# What a MEM level is given when it got nothing and is the runtime's only level: a tier cannot be empty, and a
# 1-byte tier admits no block, so the mount reads through to the store and caches nothing.
NOTHING_GRANTED_QUOTA = 1


def may_take(slots: Sequence[int], slot: int, size: int, limit: int) -> bool:
    """Whether ``slot`` may hold ``size`` more bytes of read-ahead, given what every slot holds now."""
    if size <= 0:
        return True
    total = sum(slots)
    if total + size > limit:
        return False
    own = slots[slot] if slot < len(slots) else 0
    holders = sum(1 for index, held in enumerate(slots) if held > 0 and index != slot) + 1
    share = limit // holders
    return own + size <= max(share, size)


def after_take(slots: Sequence[int], slot: int, size: int) -> list[int]:
    """The slots once ``slot`` holds ``size`` more bytes (grown to reach ``slot`` if needed)."""
    grown = [*slots, *([0] * (slot + 1 - len(slots)))]
    grown[slot] += size
    return grown


def after_give_back(slots: Sequence[int], slot: int, size: int) -> list[int]:
    """The slots once ``slot`` holds ``size`` fewer bytes (never below zero)."""
    grown = [*slots, *([0] * (slot + 1 - len(slots)))]
    grown[slot] = max(0, grown[slot] - size)
    return grown


def free_slot(used: Iterable[int]) -> int:
    """The lowest slot number nobody uses (the agent gives each mount worker one, kept across restarts)."""
    taken = set(used)
    slot = 0
    while slot in taken:
        slot += 1
    return slot


def memory_quota(levels: Iterable[Level]) -> int:
    """Bytes of the runtime's MEM levels together: what one mount of it would hold in memory at most."""
    return sum(parse_quantity(level.quota) for level in levels if level.mediumtype == MEDIUM_MEM)


def memory_grant(wanted: int, budget: int, granted_to_others: int) -> int:
    """What a mount that wants ``wanted`` bytes of MEM tier gets: at most what the node's budget has left."""
    return max(0, min(wanted, budget - granted_to_others))


def capped_levels(levels: Sequence[Level], granted: int) -> list[Level]:
    """The runtime's levels with the MEM levels cut to ``granted`` bytes together (in order); a MEM level that
    gets nothing is left out, unless it is the only level (then it keeps a quota that admits nothing)."""
    left = granted
    capped: list[Level] = []
    for level in levels:
        if level.mediumtype != MEDIUM_MEM:
            capped.append(level)
            continue
        wanted = parse_quantity(level.quota)
        quota = min(wanted, left)
        left -= quota
        if quota > 0:
            capped.append(level if quota == wanted else msgspec.structs.replace(level, quota=quota))
    if not capped and levels:
        capped.append(msgspec.structs.replace(levels[0], quota=NOTHING_GRANTED_QUOTA))
    return capped
