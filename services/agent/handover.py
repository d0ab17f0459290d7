"""Putting a FUSE mount in place so readers of the mount point never see the bare directory beneath it.

A mount process mounts at a private staging directory, answers FUSE INIT there, and only then moves the mount
onto the mount point: *beneath* whatever is mounted there (``move_mount`` with ``MOVE_MOUNT_BENEATH``, Linux ≥ 6.5),
then detaches the old mount on top. A reader therefore sees the old mount (a dead one answers ``ENOTCONN``) or the
new one, never an empty directory. On older kernels the old mount is detached just before the move (a window of
microseconds); without the privilege to mount (no CAP_SYS_ADMIN), the mount is made in place as before.

While nothing is mounted, the mount point does not exist (it is created right before the move and removed after
the unmount), so a reader gets ``ENOENT`` rather than an empty listing.

The staging directory is a private bind mount of itself: moving a mount whose parent is a shared mount (systemd
makes ``/`` shared) is refused with EINVAL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess

from libs.telemetry import get_logger
from services.agent.mountinfo import device_of, is_mounted

log = get_logger(__name__)

_SYS_MOVE_MOUNT = 429  # the same number on every architecture (new syscalls share a table since 5.1)
_AT_FDCWD = -100
_MOVE_MOUNT_BENEATH = 0x200
_MS_BIND = 0x1000
_MS_MOVE = 0x2000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)


def _move_mount(source: str, target: str, flags: int) -> None:
    result = _libc.syscall(_SYS_MOVE_MOUNT, _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                           ctypes.c_uint(flags))
    _check(result, "move_mount", target)


def _move(source: str, target: str) -> None:
    """Move a mount (``mount --move``): every kernel has it, unlike ``move_mount``."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, _MS_MOVE, None), "move mount", target)


def detach(path: str) -> None:
    """Lazily unmount the top mount at ``path`` (``umount -l``); through fusermount3 when not privileged."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.EPERM:
        raise OSError(code, f"umount2: {os.strerror(code)}", path)
    subprocess.run(["fusermount3", "-u", "-z", path], check=True, capture_output=True)


def remove_mountpoint(path: str) -> None:
    """Remove the bare mount point, so readers get ENOENT rather than an empty directory; only if empty."""
    if not is_mounted(path):
        with contextlib.suppress(OSError):
            os.rmdir(path)


class Staging:
    """A private directory to mount at before the mount is moved into place (``prepare``, ``attach``, ``cleanup``)."""

    def __init__(self, mountpoint: str) -> None:
        parent, name = os.path.split(os.path.abspath(mountpoint))
        self.mountpoint = os.path.abspath(mountpoint)
        self.path = os.path.join(parent, f".{name}.staging-{os.getpid()}")

    def prepare(self) -> bool:
        """Make the staging directory a private mount; False when this process may not mount (then mount in place)."""
        self.remove_stale()
        os.makedirs(self.path, exist_ok=True)
        path = os.fsencode(self.path)
        try:
            _check(_libc.mount(path, path, None, _MS_BIND, None), "bind mount", self.path)
            _check(_libc.mount(None, path, None, _MS_PRIVATE, None), "make private", self.path)
        except OSError as err:
            log.info("mount handover unavailable; mounting in place", reason=str(err))
            self.cleanup()
            return False
        return True

    def remove_stale(self) -> None:
        """Remove the staging mounts of earlier mount processes of this mount point that died mid-handover.

        The agent runs one mount process per mount point at a time, so a staging directory whose process is gone
        is left over from a kill between mounting and moving; nothing else would ever unmount it.
        """
        parent, prefix = os.path.dirname(self.path), os.path.basename(self.path).rsplit("-", 1)[0] + "-"
        stale: list[str] = []
        with contextlib.suppress(OSError), os.scandir(parent) as entries:  # no parent yet: nothing stale
            stale = [entry.path for entry in entries if entry.name.startswith(prefix) and entry.path != self.path
                     and not _process_alive(entry.name[len(prefix):])]
        for path in stale:
            log.warning("staging mount of a dead mount process removed", path=path)
            Staging.cleanup_path(path)

    def attach(self) -> None:
        """Move the mount made at the staging directory onto the mount point (beneath any mount there)."""
        if is_mounted(self.mountpoint):
            try:
                _move_mount(self.path, self.mountpoint, _MOVE_MOUNT_BENEATH)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                log.info("mounting beneath is not supported here; replacing the old mount", reason=str(err))
                detach(self.mountpoint)
                os.makedirs(self.mountpoint, exist_ok=True)
                _move(self.path, self.mountpoint)
            else:
                detach(self.mountpoint)  # the old mount on top; ours is revealed
        else:
            os.makedirs(self.mountpoint, exist_ok=True)
            _move(self.path, self.mountpoint)

    def cleanup(self) -> None:
        """Remove the staging mounts (the bind, and the FUSE mount too if it was never moved) and the directory."""
        Staging.cleanup_path(self.path)

    @staticmethod
    def cleanup_path(path: str) -> None:
        for _ in range(2):
            if not is_mounted(path):
                break
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                detach(path)
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _process_alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not a name we made: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def replace_in_place(mountpoint: str) -> None:
    """Without a staging mount: remove what is mounted at ``mountpoint`` and make sure the directory exists."""
    if is_mounted(mountpoint):
        detach(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)


def unmount_own(mountpoint: str, device: str | None) -> None:
    """On a clean stop: detach ``mountpoint`` if ``device`` (ours) is what is mounted there, then remove it.

    A newer mount process may already have replaced ours; its mount is then left alone.
    """
    if device is None or device_of(mountpoint) != device:
        return
    try:
        detach(mountpoint)
    except (OSError, subprocess.CalledProcessError) as err:
        log.warning("could not unmount", mountpoint=mountpoint, error=str(err))
        return
    remove_mountpoint(mountpoint)
