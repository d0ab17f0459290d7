"""The mount process's malloc settings: accepted by this machine's glibc, and block-sized buffers then come back
from the heap instead of fresh pages (counted as page faults)."""

from __future__ import annotations

import resource

from services.agent.malloc import reuse_block_buffers


def test_glibc_takes_the_settings_and_block_buffers_stop_faulting_pages() -> None:
    assert reuse_block_buffers() is True
    assert reuse_block_buffers() is True  # idempotent: a second call changes nothing
    pieces = [b"x" * (256 * 1024)] * 16

    def read_ahead_windows(count: int) -> None:
        for _ in range(count):  # 8 blocks of 4 MiB alive at once, then all freed (glibc alone trims them: faults)
            held = [b"".join(pieces) for _ in range(8)]
            del held

    read_ahead_windows(2)  # the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    read_ahead_windows(8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Fresh pages would be 1024 faults per block (65k here, measured without the settings).
    assert faults < 8 * 8 * 1024 // 4, f"{faults} page faults for 64 blocks of 4 MiB"
