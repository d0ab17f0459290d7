"""The links of reference datasets in the mount root (``domain.wanted_links``): made, replaced and removed here.

A reference's mount point is a symbolic link into its source's mount point, so readers of the reference go through
the source's FUSE mount: the same tree, block cache and store reads. Only links are ever removed or replaced
here; what stands in the way otherwise (a dataset that was mounted here before it became a reference, still
mounted or not yet removed) is left alone and the link is tried again on the next pass.
"""

from __future__ import annotations

import contextlib
import os

from services.agent.handover import remove_mountpoint


def make_link(path: str, target: str) -> str | None:
    """Point the link at ``path`` to ``target`` (made or replaced at once, readers never see it missing); None
    when done, else why not."""
    if os.path.islink(path) and os.readlink(path) == target:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path) and not os.path.islink(path):
        remove_mountpoint(path)  # an empty, unmounted folder a previous mount left
        if os.path.lexists(path):
            return f"{path} is in the way (a mount or folder, not a link); the link is made once it is gone"
    staged = f"{path}.link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staged)
    os.symlink(target, staged)
    try:
        os.replace(staged, path)
    except OSError as err:
        os.unlink(staged)
        return f"{path}: {err.strerror or err}"
    return None


def existing_links(mount_root: str) -> dict[tuple[str, str], str]:
    """The links at ``<mount root>/<namespace>/<name>`` an earlier run of the agent left (it may have stopped
    without removing them, or been killed): adopted, so those no longer wanted are removed like any other."""
    found: dict[tuple[str, str], str] = {}
    with contextlib.suppress(FileNotFoundError):
        for namespace in os.scandir(mount_root):
            if not namespace.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(namespace.path):
                if entry.is_symlink():
                    found[(namespace.name, entry.name)] = os.readlink(entry.path)
    return found


def remove_link(path: str) -> None:
    """Remove the link at ``path``; anything else there is not ours to remove."""
    if os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
