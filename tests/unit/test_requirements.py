"""The machine-requirement check behind ``@pytest.mark.needs``: one clear message per missing piece."""

from __future__ import annotations

import os

import pytest

from tests import requirements


def test_missing_tools_and_privileges_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert requirements.missing("fio") == ["needs fio: fio is not installed (Debian: apt-get install fio, or make "
                                           "test-deps)"]
    (fuse,) = requirements.missing("fuse")
    assert fuse.startswith("needs root and /dev/fuse: ") and "run them as root" in fuse


def test_require_fails_the_test_with_every_missing_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(pytest.fail.Exception) as failed:
        requirements.require("fio", "sysfs", "page-cache")
    message = str(failed.value)
    assert message.count("needs ") == 3
    assert "needs a writable sysfs: /sys/class/bdi is not writable" in message
    with pytest.raises(ValueError, match="unknown test requirement 'gpu'"):
        requirements.missing("gpu")

