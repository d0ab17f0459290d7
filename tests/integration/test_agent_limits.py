"""A mount process at the limits of its resources, on real FUSE mounts over SeaweedFS.

- Out of file descriptors (its ``RLIMIT_NOFILE`` lowered to what it holds, as a busy node's limit would be reached):
  a read that needs a descriptor fails with EMFILE, saying so, never EIO "cannot reach S3 endpoint"; the cache
  directory is not taken for a failing disk (before, three EMFILEs took the tier down for its 30 s cool-down and
  reported its directory down) and forgets none of its blocks; the mount's status file is written again (a failed
  write ended its loop for good); every byte read is right, the process lives on, and once the limit is raised every
  read works again, cached blocks from the disk.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import resource
import threading
from pathlib import Path

import pytest

from libs.bus import Bus
from libs.config import Settings
from services.agent.mountstatus import read_status
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import (
    NODE,
    drop_page_cache,
    mount_pids,
    node_stack,
    read_file,
    scrape,
    series,
    target_port,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.needs("fuse", "page-cache")


def read_all(root: Path, objects: dict[str, bytes], keys: list[str]) -> dict[str, int]:
    """Each file of ``keys`` read whole by a thread of its own, all at once: its errno, or 0 for the right bytes."""
    outcome: dict[str, int] = {}
    start = threading.Barrier(len(keys))

    def read(key: str) -> None:
        start.wait()
        try:
            outcome[key] = 0 if (root / key).read_bytes() == objects[key] else -1  # -1: wrong bytes
        except OSError as err:
            outcome[key] = err.errno or -2

    threads = [threading.Thread(target=read, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def mount_args(pid: int) -> dict[str, str]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}


async def test_a_mount_out_of_file_descriptors_fails_reads_with_emfile_and_keeps_its_cache_directory_up(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"f{i:02d}.bin": os.urandom(MiB + MiB // 2 + i) for i in range(32)}
    await put_objects(seaweedfs, bucket, objects)
    cached, cold = sorted(objects)[:8], sorted(objects)[8:]
    targets = tmp_path / "targets"
    async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
        await node.apply("nofile", bucket)
        root = await node.wait_mounted("nofile", expect=cold[-1], timeout=60)
        (pid,) = mount_pids(root)
        port = target_port(targets, "nofile")
        assert port is not None
        mine = {"node": NODE, "dataset": "default/nofile"}
        for key in cached:
            assert await read_file(root / key) == objects[key]
        cached_bytes = sum(len(objects[key]) for key in cached)

        async def on_disk() -> float | None:
            held = series(await scrape(port), "shoal_cache_bytes", **mine, tier="disk") or 0
            return held if held >= cached_bytes else None

        await eventually(on_disk, what="the first files' blocks in the disk tier")
        await asyncio.to_thread(drop_page_cache)

        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard))
        try:
            outcome = await asyncio.to_thread(read_all, root, objects, cached + cold)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        failed = {key: code for key, code in outcome.items() if code}
        assert failed, "reads of files never cached need a socket each, and there is none"
        assert set(failed.values()) == {errno.EMFILE}, f"not EMFILE (-1: wrong bytes): {failed}"
        assert mount_pids(root) == [pid], "the mount process lives on"

        status = mount_args(pid)["--status-file"]

        def said() -> str | None:
            current = read_status(status)
            failures = current.read_failures if current is not None else []
            return next((f.reason for f in failures if f.errno == "EMFILE"), None)

        reason = await eventually(lambda: asyncio.to_thread(said), what="the EMFILE reads in the mount's status")
        assert "too many files open" in reason and "RLIMIT_NOFILE" in reason, reason
        assert "cannot reach" not in reason, reason

        # The limit raised: every file reads, and no cached block is fetched from the store again: the disk tier
        # never went down, nor forgot a block whose read found no descriptor.
        before = series(await scrape(port), "shoal_read_bytes_total", **mine, source="store") or 0
        await asyncio.to_thread(drop_page_cache)
        assert await asyncio.to_thread(read_all, root, objects, cached + cold) == dict.fromkeys(cached + cold, 0)
        after = series(await scrape(port), "shoal_read_bytes_total", **mine, source="store") or 0
        assert after - before <= sum(len(objects[key]) for key in cold), "cached files fetched from the store again"
        current = read_status(status)
        assert current is not None and not current.down
