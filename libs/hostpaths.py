"""Which host paths Shoal may touch: ``local://`` mounts only below the roots the operator configured, and cache
tier directories never on a system path.

Lexical checks (pure) are for validation, where a spec is judged without touching the disk; the agent and the
sync repeat the ``local://`` check on real paths (``real_local_root_error``), so a link under a root cannot lead
out of it.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence

# Folders of the operating system that a cache tier must never be, whatever is below them: Shoal creates and
# deletes files in its tier directories.
SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/cache",
    "/var/log", "/var/tmp", "/usr/local",
})
# Trees that belong to the system or the kernel as a whole: nothing below them is a cache directory.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr")


def normal_path(path: str) -> str:
    """``path`` written one way (no '.', '..', doubled or trailing '/'), lexically: two spellings of one folder
    compare equal."""
    # normpath keeps a leading '//' (POSIX leaves its meaning open); Linux reads it as '/'.
    return "/" + posixpath.normpath(path).lstrip("/")


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def local_root_of(path: str, roots: Sequence[str]) -> str | None:
    """The root of ``roots`` (SHOAL_LOCAL_ROOTS) the folder ``path`` lies below, as written; None if none."""
    normal = normal_path(path)
    return next((root for root in roots if _below(normal, normal_path(root))), None)


def local_root_error(path: str, roots: Sequence[str]) -> str | None:
    """Why the folder ``path`` may not be mounted through ``local://``, or None if it lies below a root."""
    if not roots:
        return ("local:// mounts are disabled on this installation: the operator lists the folders that may be "
                "mounted in SHOAL_LOCAL_ROOTS")
    if local_root_of(path, roots) is not None:
        return None
    return f"{normal_path(path)!r} is not below an allowed local root (SHOAL_LOCAL_ROOTS: {', '.join(roots)})"


def real_local_root_error(path: str, roots: Sequence[str]) -> str | None:
    """Like ``local_root_error``, on the real paths (links resolved): does I/O."""
    lexical = local_root_error(path, roots)
    if lexical is not None:
        return lexical
    real = os.path.realpath(path)
    if any(_below(real, os.path.realpath(root)) for root in roots):
        return None
    return f"{path!r} leads to {real!r}, which is not below an allowed local root ({', '.join(roots)})"


# A NUL byte makes every file call on the path fail (ValueError: the mount process's cache scan died on it); the
# other control characters (a newline, a tab pasted into YAML) are typos that would name folders no one can type.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def cache_path_error(path: str) -> str | None:
    """Why ``path`` may not hold a cache tier (a control character, a system folder, or below one), or None if it
    may."""
    if (char := CONTROL_CHARACTERS.search(path)) is not None:
        return f"{path!r} contains the control character {char.group()!r}; give a plain folder path"
    normal = normal_path(path)
    if normal in SYSTEM_FOLDERS:
        return f"{path!r} is a system folder; give a folder of its own, e.g. /var/cache/shoal"
    tree = next((tree for tree in SYSTEM_TREES if _below(normal, tree)), None)
    if tree is not None:
        return f"{path!r} is inside the system folder {tree}; give a folder of its own, e.g. /var/cache/shoal"
    return None
