"""glibc malloc settings of a mount process: block-sized buffers reused from the heap instead of fresh pages.

A mount process allocates and frees a block-sized ``bytes`` (4 MiB by default) for every block it fetches or
reads: the joined body of a GET, a peer's answer, a block read from disk. glibc serves allocations that large
with their own ``mmap`` and gives them back with ``munmap`` (its dynamic threshold rises to the block size after
the first free, but heap trimming then returns the top of the heap, and the next blocks fault their pages in
again). Every fresh 4 KiB page is a page fault, and on this project's VMs a fault costs several microseconds:
a cold sequential read took ~100-200k faults per GiB. With the mmap threshold above any block and a trim threshold
of a few blocks, freed blocks are reused from the heap: ~0 faults per GiB and about a quarter less CPU per GiB on
cold reads (``tests/bench/cpu_per_gib.py``; numbers in docs/benchmarks.md, "CPU per GiB of the byte paths").
The cost: up to ``TRIM_THRESHOLD`` of freed memory stays in the process instead of going back to the kernel.
"""

from __future__ import annotations

import ctypes

from libs.telemetry import get_logger

log = get_logger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The most glibc accepts on 64-bit: blocks up to 32 MiB (the default is 4 MiB) come from the heap; larger ones
# (the runtime allows 64 MiB) are mmapped as before, which is only slower.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Freed memory kept at the top of the heap before it goes back to the kernel: a read-ahead window of blocks
# (16 x 4 MiB). What the process may hold beyond what it uses.
TRIM_THRESHOLD = 64 * 1024 * 1024


def reuse_block_buffers() -> bool:
    """Apply the settings above to this process's glibc malloc; False where there is no glibc (nothing done)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("malloc settings refused; block buffers come from fresh pages")
    return ok
