"""The node's read-ahead budget file: one slot per mount process, shared by all of them under a file lock.

Owns the file I/O only; the rules are ``services.agent.budget``. Layout (little-endian): 8 bytes of magic
``shoalra1``, the budget as an int64, then one int64 per slot (bytes of read-ahead that mount process holds now).
The agent creates the file in its status folder and gives each mount worker a slot number (kept across restarts
of that mount process). Every change reads the slots and writes one under an exclusive ``flock`` of the file (a
few microseconds: a pread and a pwrite of a few hundred bytes), so the total across slots never exceeds the
budget whatever the interleaving. A take never waits for the lock (a busy lock refuses that read-ahead, which the
next read asks for again); only giving back waits, for a lock held microseconds. A mount process writes only its
own slot; the agent zeroes a slot once its process has exited (crash included) and before it starts the next one,
so a crash never leaks budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator

from services.agent import budget

MAGIC = b"shoalra1"
_HEADER = struct.Struct("<8sq")
_SLOT = struct.Struct("<q")
FILE_NAME = "readahead.slots"
# Far more mounts than a node runs; bounds the read of the slots (64 KiB).
MAX_SLOTS = 8192


class BudgetFileError(Exception):
    """The file is not a read-ahead budget file (or cannot be read)."""


class SlotFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with self._locked():
                self.limit = self._header()
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(cls, path: str, limit: int) -> SlotFile:
        """A new file with every slot free (an old one at ``path`` is replaced)."""
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as out:
            out.write(_HEADER.pack(MAGIC, limit))
        os.replace(temporary, path)
        return cls(path)

    def close(self) -> None:
        os.close(self._fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _header(self) -> int:
        raw = os.pread(self._fd, _HEADER.size, 0)
        if len(raw) != _HEADER.size or raw[:8] != MAGIC:
            raise BudgetFileError(f"{self.path} is not a read-ahead budget file")
        return int(_HEADER.unpack(raw)[1])

    def _slots(self) -> list[int]:
        raw = os.pread(self._fd, MAX_SLOTS * _SLOT.size, _HEADER.size)
        whole = len(raw) - len(raw) % _SLOT.size
        return [value for (value,) in _SLOT.iter_unpack(raw[:whole])]

    def _write(self, slot: int, value: int) -> None:
        os.pwrite(self._fd, _SLOT.pack(value), _HEADER.size + slot * _SLOT.size)

    def slots(self) -> list[int]:
        """What every slot holds, read under the lock (a consistent view: the sum is within the budget)."""
        with self._locked():
            return self._slots()

    def held(self) -> int:
        """Bytes the slots hold together, read without the lock: for a gauge, which must never make a mount's
        ``try_take`` find the lock taken (a torn view is off by a block for one scrape at most)."""
        return sum(self._slots())

    def try_take(self, slot: int, size: int) -> bool:
        """Take ``size`` bytes for ``slot`` if the rules allow; never waits for the lock (the caller is a FUSE
        event loop, and a read-ahead refused now is simply asked for again on the next read)."""
        if not self._try_lock():
            return False
        try:
            slots = self._slots()
            if not budget.may_take(slots, slot, size, self.limit):
                return False
            self._write(slot, budget.after_take(slots, slot, size)[slot])
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def give_back(self, slot: int, size: int) -> None:
        with self._locked():
            self._write(slot, budget.after_give_back(self._slots(), slot, size)[slot])

    def zero(self, slot: int) -> None:
        """Free everything ``slot`` holds (its process exited, or is starting and holds nothing yet)."""
        with self._locked():
            self._write(slot, 0)


class NodeReadAhead:
    """One mount process's share of the node budget, as ``readahead.MemoryBudget`` uses it."""

    def __init__(self, file: SlotFile, slot: int) -> None:
        self.file = file
        self.slot = slot

    def try_take(self, size: int) -> bool:
        return self.file.try_take(self.slot, size)

    def give_back(self, size: int) -> None:
        self.file.give_back(self.slot, size)
