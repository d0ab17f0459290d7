"""What must never be shown or touched, as pure rules (libs.redact, libs.hostpaths), and the pieces that apply
them to real files: the local store's served modes, a disk tier's ownership marker, the FUSE attributes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyfuse3
import pytest

from libs.blocks import BlockId
from libs.events.common import ObjectMeta
from libs.events.runtime import Level, Runtime, RuntimeSpec, TieredStore
from libs.hostpaths import cache_path_error, local_root_error, real_local_root_error
from libs.manifest import ManifestEntry
from libs.redact import (
    MAX_ERROR_CHARS,
    cut_error,
    hide_secret_query,
    hide_signing,
    redact_payload,
    secret_query_names,
    shown_text,
    strip_userinfo,
)
from libs.ufs.base import LocalLocation
from libs.ufs.local import LocalObjectStore
from services.agent.cache.tiers import MARKER, DiskTier, Health
from services.agent.fs import NOBODY, DatasetFS
from services.agent.namespace import InodeAllocator, Namespace
from services.runtime.domain import validate_runtime

SECRET = "s3cr3t-VALUE/with+chars"


# --- libs.redact ---


@pytest.mark.parametrize(("text", "shown"), [
    (f"s3://AKIA:{SECRET}@bucket/x", "s3://***@bucket/x"),
    (f"cannot reach http://admin:{SECRET}@127.0.0.1:9000: refused", "cannot reach http://***@127.0.0.1:9000: refused"),
    ("https://user@host/path", "https://***@host/path"),
    ("s3://bucket/a@b", "s3://bucket/a@b"),  # '@' in a path is not userinfo
    ("no url here, a@b.c", "no url here, a@b.c"),
])
def test_strip_userinfo(text: str, shown: str) -> None:
    assert strip_userinfo(text) == shown


@pytest.mark.parametrize(("text", "shown"), [
    ("GET /b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261206%2Fus-east-1%2Fs3%2Faws4_request"
     "&X-Amz-Date=20261206T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=0badc0ffee not found",
     "GET /b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20261206T000000Z&X-Amz-Expires=3600"
     "&X-Amz-SignedHeaders=host&X-Amz-Signature=*** not found"),
    ("{'Authorization': 'AWS4-HMAC-SHA256 Credential=AKIA/20261206/us-east-1/s3/aws4_request, "
     "SignedHeaders=host;range, Signature=0badc0ffee', 'X-Amz-Security-Token': 'FwoGZXIvYXdzE'}",
     "{'Authorization': 'AWS4-HMAC-SHA256 Credential=***, SignedHeaders=host;range, Signature=***', "
     "'X-Amz-Security-Token': '***'}"),
    ("/b/k?AWSAccessKeyId=AKIA&Expires=1&Signature=abc%2B", "/b/k?AWSAccessKeyId=***&Expires=1&Signature=***"),
    ("SignatureDoesNotMatch: the request signature we calculated does not match",
     "SignatureDoesNotMatch: the request signature we calculated does not match"),
])
def test_hide_signing(text: str, shown: str) -> None:
    assert hide_signing(text) == shown


@pytest.mark.parametrize(("url", "shown", "names"), [
    (f"https://h/f/?X-Amz-Signature={SECRET}&x=1&token={SECRET}", "https://h/f/?X-Amz-Signature=***&x=1&token=***",
     ["X-Amz-Signature", "token"]),
    (f"https://h/f/?sv=2024&sig={SECRET}", "https://h/f/?sv=2024&sig=***", ["sig"]),  # Azure SAS
    (f"https://h/f/#access_token={SECRET}", "https://h/f/#access_token=***", ["access_token"]),
    ("local:///data/run#3", "local:///data/run#3", []),  # a name with '#', no parameter: shown as given
    ("https://h/f/?sort=name&token=", "https://h/f/?sort=name&token=***", []),  # nothing in it
])
def test_a_urls_query_credentials_are_named_and_hidden(url: str, shown: str, names: list[str]) -> None:
    assert hide_secret_query(url) == shown
    assert secret_query_names(url) == names


@pytest.mark.parametrize(("text", "keep", "spellings", "shown"), [
    ("data/a.bin ünïcödé 日本", "", None, "data/a.bin ünïcödé 日本"),  # printable: as it is
    ("evil\x1b]0;pwned\x07\nforged\r\x0b\x7f\x85", "", None, "evil\\x1b]0;pwned\\x07\\nforged\\r\\x0b\\x7f\\x85"),
    ("a\u202eb\u200bc\u2028d\ttab", "", None, "a\\u202eb\\u200bc\\u2028d\\ttab"),  # format chars, separators
    ("line one\nline\x1b two", "\n", None, "line one\nline\\x1b two"),  # a traceback keeps its line breaks
    ("a\tb\x1b[31m\nc", "\t", {"\x1b": "^["}, "a\tb^[[31m\\nc"),  # the CLI: kubectl's ESC, the tab kept
])
def test_shown_text_escapes_what_a_terminal_would_act_on(text: str, keep: str, spellings: dict[str, str] | None,
                                                         shown: str) -> None:
    """The one escaper of logs and the CLI: every character that is not printable, as ``repr`` writes it."""
    assert shown_text(text, keep, spellings) == shown
    assert shown.isprintable() or keep  # what is kept is all that is not printable


def test_cut_error_bounds_an_error_text_and_marks_the_cut() -> None:
    assert cut_error("short") == "short"
    assert cut_error("x" * MAX_ERROR_CHARS) == "x" * MAX_ERROR_CHARS
    cut = cut_error("y" * 10 * MAX_ERROR_CHARS)
    assert len(cut) == MAX_ERROR_CHARS and cut.endswith("…")


def test_redact_payload_masks_secret_fields_at_any_depth_and_keeps_the_rest() -> None:
    payload = json.dumps({"type": "dataset.apply.v1", "dataset": {"spec": {
        "sharedOptions": {"aws.secretKey": SECRET, "region": "eu"},
        "mounts": [{"mountPoint": f"s3://k:{SECRET}@b/", "options": {"fs.s3a.secret.key": SECRET,
                                                                    "password": SECRET, "endpoint": "http://x"}}]}}})
    redacted = json.loads(redact_payload(payload.encode()))
    spec = redacted["dataset"]["spec"]
    assert spec["sharedOptions"] == {"aws.secretKey": "***", "region": "eu"}
    assert spec["mounts"][0]["mountPoint"] == "s3://***@b/"
    assert spec["mounts"][0]["options"] == {"fs.s3a.secret.key": "***", "password": "***", "endpoint": "http://x"}
    assert SECRET not in redact_payload(payload.encode()).decode()


def test_redact_payload_leaves_ordinary_payloads_byte_for_byte() -> None:
    for payload in (b'{"type":  "x", "id": 1}', b"not json at all \xff", b'{"a": "b"'):
        assert redact_payload(payload) is payload


def test_redact_payload_masks_malformed_json_by_pattern() -> None:
    payload = b'{"spec": {"options": {"aws.secretKey": "' + SECRET.encode() + b'", "x": "s3://u:p@b"'
    redacted = redact_payload(payload)
    assert SECRET.encode() not in redacted and b":p@" not in redacted
    assert redacted == b'{"spec": {"options": {"aws.secretKey": "***", "x": "s3://***@b"'


# --- libs.hostpaths ---


@pytest.mark.parametrize("path", ["/", "/etc", "/var", "/home", "/usr", "/tmp", "/etc/shoal", "/proc/1", "/sys/x",
                                  "/dev/shm", "/boot/cache", "/usr/local/cache", "//", "/var/../etc",
                                  "/data/a\x00b", "/data/a\nb"])
def test_system_paths_hold_no_cache(path: str) -> None:
    assert cache_path_error(path) is not None


@pytest.mark.parametrize("path", ["/var/cache/shoal", "/mnt/nvme0/cache", "/home/ml/cache", "/tmp/x", "/data"])
def test_paths_of_their_own_may_hold_a_cache(path: str) -> None:
    assert cache_path_error(path) is None


def test_local_roots_follow_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "out").symlink_to("/etc")
    assert local_root_error(str(root / "data"), [str(root)]) is None
    assert real_local_root_error(str(root / "data"), [str(root)]) is None
    assert local_root_error(str(root / "out"), [str(root)]) is None  # lexically inside
    assert "leads to '/etc'" in (real_local_root_error(str(root / "out"), [str(root)]) or "")
    assert local_root_error(str(tmp_path / "rootless"), [str(root)]) is not None


# --- runtime validation ---


def runtime_with(level: Level) -> Runtime:
    return Runtime(metadata=ObjectMeta(name="rt"), spec=RuntimeSpec(tieredstore=TieredStore(levels=[level])))


@pytest.mark.parametrize("quota", ["1000000000000000000000000000000", "2Pi", "1Ei", 10**30])
def test_tier_quota_has_an_upper_bound(quota: str | int) -> None:
    [error] = validate_runtime(runtime_with(Level(mediumtype="MEM", quota=quota)))
    # Above 2^63 - 1 bytes the quantity itself is refused (Kubernetes holds no more), before the tiers' 1Pi bound.
    assert re.search(r"is more than (1Pi|9223372036854775807 bytes)", error), error


def test_tier_path_on_a_system_folder_is_rejected() -> None:
    [error] = validate_runtime(runtime_with(Level(mediumtype="SSD", quota="1Gi", path="/mnt/ok,/")))
    assert error == ("spec.tieredstore.levels[0].path '/' is a system folder; give a folder of its own, "
                     "e.g. /var/cache/shoal")


# --- real files: served modes, the tier marker ---


async def test_local_listing_serves_modes_narrowed_by_folders(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "closed").mkdir()
    for folder, name, mode in (("open", "a", 0o644), ("open", "b", 0o600), ("closed", "c", 0o644),
                               ("closed", "d", 0o755)):
        path = tmp_path / folder / name
        path.write_text(name)
        path.chmod(mode)
    (tmp_path / "closed").chmod(0o700)
    tmp_path.chmod(0o755)
    store = LocalObjectStore(LocalLocation(root=tmp_path))
    modes = {info.key: (info.mode, info.uid) async for info in store.list()}
    assert modes == {"open/a": (0o644, os.getuid()), "open/b": (0o600, os.getuid()),
                     "closed/c": (0o600, os.getuid()), "closed/d": (0o700, os.getuid())}


def test_a_tier_directory_with_foreign_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "repo"
    (foreign / "ab").mkdir(parents=True)
    (foreign / "ab" / ("cd" * 16)).write_bytes(b"not a block")  # looks like a block name
    tier = DiskTier(foreign, 1 << 20)
    assert tier.scan() == []
    assert (foreign / "ab" / ("cd" * 16)).read_bytes() == b"not a block"
    assert tier.refused and "has no .shoal-cache-tier" in tier.refused
    assert tier.health is Health.DOWN and not tier.available()
    assert tier.write(BlockId(mount=0, key="k", etag="e", index=0), b"data") is False
    assert not (foreign / MARKER).exists() and sorted(p.name for p in foreign.rglob("*")) == ["ab", "cd" * 16]


def test_a_new_tier_directory_is_marked_and_then_cleaned_as_shoals(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "new", 1 << 20)
    assert tier.scan() == [] and (tmp_path / "new" / MARKER).exists()
    garbage = tmp_path / "new" / "ab" / ("cd" * 16)
    garbage.parent.mkdir()
    garbage.write_bytes(b"garbled")
    again = DiskTier(tmp_path / "new", 1 << 20)
    assert again.scan() == [] and not garbage.exists() and not again.refused


def test_a_cache_written_before_the_marker_is_claimed_with_its_blocks(tmp_path: Path) -> None:
    block = BlockId(mount=0, key="k", etag="e", index=0)
    old = DiskTier(tmp_path / "old", 1 << 20)
    assert old.scan() == [] and old.write(block, b"data")
    (tmp_path / "old" / MARKER).unlink()  # as an older Shoal left it
    upgraded = DiskTier(tmp_path / "old", 1 << 20)
    assert [scanned.block for scanned in upgraded.scan()] == [block]
    assert not upgraded.refused and (tmp_path / "old" / MARKER).exists()


# --- FUSE attributes: no value can make a handler raise ---


@pytest.mark.parametrize(("uid", "gid", "mtime", "size"), [
    (2**32, 2**40, 0.0, 1), (-1, -5, float("nan"), 0), (None, None, float("inf"), 2**70), (7, 8, -1e300, 3),
])
async def test_attributes_never_raise(uid: int | None, gid: int | None, mtime: float, size: int) -> None:
    entry = ManifestEntry(path="/f", mount=0, key="f", size=size, etag="e", mtime=mtime, mode=0o640, uid=2**33,
                          gid=5)
    namespace = Namespace.build([entry], InodeAllocator())
    fs = DatasetFS(namespace, reader=None, uid=uid, gid=gid, block_size=4096)  # type: ignore[arg-type]
    node = namespace.lookup(1, "f")
    assert node is not None
    attrs = await fs.getattr(node.inode)
    assert attrs.st_uid == (uid if uid is not None and 0 <= uid < 2**32 - 1 else NOBODY)
    assert attrs.st_gid == (gid if gid is not None and 0 <= gid < 2**32 - 1 else NOBODY if gid is not None else 5)
    assert attrs.st_mode & 0o777 == 0o440
    assert 0 <= attrs.st_size < 2**63
    root = await fs.getattr(1)
    assert isinstance(root, pyfuse3.EntryAttributes)
