"""Reading /proc/self/mountinfo: is a path a mount point, and which device (bdi) backs it.

Never stats the mount point itself: on our own mount that would call into the FUSE loop (a deadlock while
mounting) and on a dead mount it fails with ENOTCONN.
"""

from __future__ import annotations

import os
import re


def canonical(path: str) -> str:
    """The real path of ``path``'s parent joined with its name, without touching ``path`` itself."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str]]:
    """(device "major:minor", mount point, file system type) of every mount, oldest first."""
    with open("/proc/self/mountinfo") as mounts:
        rows = [line.split() for line in mounts]
    # The type follows the "-" that ends the optional fields (shared:N, master:N, ...), whose number varies.
    return [(fields[2], unescape(fields[4]), fields[fields.index("-", 6) + 1] if "-" in fields[6:-1] else "")
            for fields in rows if len(fields) > 4]


def device_of(path: str) -> str | None:
    target = canonical(path)
    found = [device for device, point, _ in _mounts() if point == target]
    return found[-1] if found else None  # the newest mount on that path wins


def devices() -> dict[str, str]:
    """Mount point → device of the newest mount on it: one read of the table for many lookups (``canonical``
    paths)."""
    return {point: device for device, point, _ in _mounts()}


def mount_points(fstype: str) -> list[str]:
    """The mount points of every mount of file system type ``fstype`` (e.g. ``fuse.shoal``), oldest first."""
    return [point for _, point, kind in _mounts() if kind == fstype]


def is_mounted(path: str) -> bool:
    return device_of(path) is not None
