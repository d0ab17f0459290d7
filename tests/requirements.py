"""What some tests need from the machine, checked up front so a missing piece fails with one clear message.

Tests ask with the marker ``@pytest.mark.needs("fuse", "fio", ...)`` (checked in ``conftest``) or by calling
``require(...)`` (``node_stack`` does for FUSE). A missing requirement fails the test — it is not skipped, so a
machine that cannot run the FUSE tests never passes for one that did — with a message such as
"needs root and /dev/fuse: /dev/fuse does not exist (install fuse3 ...)".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


def _fuse() -> str | None:
    if os.geteuid() != 0:
        return "the tests mount with allow_other and read back as other users; run them as root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (a container needs --device /dev/fuse and CAP_SYS_ADMIN)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian: apt-get install fuse3 libfuse3-dev pkg-config, or make test-deps)"
    return None


def _fio() -> str | None:
    if shutil.which("fio") is None:
        return "fio is not installed (Debian: apt-get install fio, or make test-deps)"
    return None


def _openssl() -> str | None:
    if shutil.which("openssl") is None:
        return "openssl is not installed (Debian: apt-get install openssl); it makes the tests' TLS certificates"
    return None


def _page_cache() -> str | None:
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "/proc/sys/vm/drop_caches is not writable (tests drop the page cache so reads reach the agent)"
    return None


def _sysfs() -> str | None:
    if not os.access("/sys/class/bdi", os.W_OK):
        return "/sys/class/bdi is not writable (the agent raises a mount's read-ahead there; sysfs is read-only here)"
    return None


def _prometheus() -> str | None:
    from libs.cli.stack.prometheus import find_tool

    if find_tool("prometheus") is None or find_tool("promtool") is None:
        return ("prometheus and promtool are not in .shoal/tools/prometheus/ or on PATH (make system-deps unpacks "
                "Debian's prometheus package there)")
    return None


NEEDS: dict[str, tuple[str, Callable[[], str | None]]] = {
    "fuse": ("root and /dev/fuse", _fuse),
    "fio": ("fio", _fio),
    "openssl": ("the openssl command", _openssl),
    "page-cache": ("root and a writable /proc/sys/vm/drop_caches", _page_cache),
    "sysfs": ("a writable sysfs", _sysfs),
    "prometheus": ("Prometheus", _prometheus),
}


def missing(*needs: str) -> list[str]:
    """One message per requirement that this machine does not meet, e.g. "needs fio: fio is not installed"."""
    problems = []
    for need in needs:
        if need not in NEEDS:
            raise ValueError(f"unknown test requirement {need!r}; known: {', '.join(NEEDS)}")
        what, check = NEEDS[need]
        reason = check()
        if reason is not None:
            problems.append(f"needs {what}: {reason}")
    return problems


def require(*needs: str) -> None:
    """Fail the running test at once, with every missing requirement named, if any is missing."""
    problems = missing(*needs)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
