"""Who holds a cache folder's lock, and the short lock that makes "am I still the owner?" and what follows one step.

A folder's ``LOCK_FILE`` is flocked by every process that uses the folder (``DiskTier.hold``): shared to serve it,
exclusive to delete its blocks. flock says neither who holds it nor lets two holders agree on anything; this
module adds both:

* ``holders``: the processes holding a file's flock, read from ``/proc/locks`` (Linux; the pid as this process's
  PID namespace sees it, none for a holder outside it), so a start that waits can say which process it waits for.
* ``token_lock``: an open-file-description lock (``F_OFD_SETLKW``) on the owner token's bytes of the same file,
  held for microseconds around the token's write by a start (``DiskTier.own``) and around the compare and the
  rename of an index by a stop (``DiskTier.write_index``). It is a POSIX record lock, independent of the flock on a
  local filesystem; being per open file, not per process, two tiers of one process exclude each other too (tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

PROC_LOCKS = "/proc/locks"
# struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len, l_pid, padded to 32 bytes. l_pid must
# be 0 for an OFD lock.
_FLOCK = struct.Struct("hhqqi4x")


@dataclass(frozen=True)
class Holder:
    """A process holding a file's flock: its pid, and whether it holds it exclusive (deleting) or shared."""

    pid: int
    exclusive: bool

    def __str__(self) -> str:
        return f"process {self.pid} ({'exclusive' if self.exclusive else 'shared'})"


def holders(path: str, table: str = PROC_LOCKS) -> list[Holder]:
    """The other processes holding ``path``'s flock, by /proc/locks (``table``), this one left out; [] when none
    is known (no such file, no /proc, or holders outside this PID namespace, listed there with pid 0 or -1).
    A line reads ``1: FLOCK  ADVISORY  READ 11876 fe:00:2509339 0 EOF``; a waiter's has ``->`` after its number."""
    try:
        stat = os.stat(path)
        with open(table, encoding="ascii") as lines:
            text = lines.read()
    except OSError:
        return []
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    found: dict[int, Holder] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != where:  # a waiter's line: "->" in fields[1]
            continue
        try:
            pid = int(fields[4])
        except ValueError:
            continue
        if pid > 0 and pid != os.getpid():
            found[pid] = Holder(pid, exclusive=fields[3] == "WRITE" or found.get(pid, Holder(pid, False)).exclusive)
    return sorted(found.values(), key=lambda holder: holder.pid)


@contextlib.contextmanager
def token_lock(fd: int, length: int) -> Iterator[None]:
    """Holds an exclusive OFD lock on bytes [0, ``length``) of the open file ``fd`` (waiting for it: the other
    holders keep it for a write and a rename at most)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, length, 0))
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, length, 0))
