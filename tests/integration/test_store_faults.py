"""The object store misbehaving and the cache disk filling up, under a real FUSE mount (issue 15, point 2).

- The store answering 500 and 503 (``tests.faults.FaultyStoreProxy`` in front of SeaweedFS): a burst is retried
  (the reader sees no EIO, every byte is right); slow answers only make reads slower; a store failing every GET
  gives the reader one EIO in bounded time, counted in ``shoal_store_errors``, and the next read after the store
  is back succeeds at once.
- A full cache disk (a 3 MiB tmpfs under the runtime's tier, mounted and unmounted by the test; ``make soak``
  only): every read still returns the store's bytes, the tier is reported down in the agent's heartbeat and in the
  runtime's status, and no block file half-written by a failed write is ever served.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from libs import subjects
from libs.bus import Bus, kv_load
from libs.config import Settings
from libs.events.agent import AgentRecord
from libs.events.dataset import Condition
from libs.events.operation import OperationRecord
from libs.redact import MAX_ERROR_CHARS
from services.loader import app as loader_app
from tests.conftest import SeaweedServer, put_objects
from tests.faults import FaultyStoreProxy
from tests.helpers import dataset_record, eventually, json_lines, running, runtime_record
from tests.integration.agent_stack import (
    NODE,
    drop_page_cache,
    node_stack,
    read_file,
    run_tool,
    scrape,
    series,
    target_port,
)
from tests.integration.test_loader import dataload, operation
from tests.reliability import record_fault, stopwatch

pytestmark = pytest.mark.needs("fuse", "page-cache")

MiB = 1024 * 1024


async def test_store_errors_are_retried_slow_answers_wait_and_a_dead_store_fails_clearly(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {name: os.urandom(2 * MiB + 7) for name in ("burst.bin", "slow.bin", "dead.bin")}
    await put_objects(seaweedfs, bucket, objects)
    store = FaultyStoreProxy(seaweedfs.endpoint)
    await store.start()
    targets = tmp_path / "targets"
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
            await node.apply("faulty", bucket, endpoint=store.endpoint)
            root = await node.wait_mounted("faulty", expect="dead.bin", timeout=60)

            # A burst of 500s and 503s: the client retries them, the reader sees the right bytes and no error.
            store.faults = [503, 500, 503]
            with stopwatch() as burst:
                assert await read_file(root / "burst.bin") == objects["burst.bin"]
            assert store.injected == 3 and not store.faults
            record_fault("the store answers 503, 500, 503 to consecutive block GETs",
                         "retried by the S3 client; the read returns the right bytes, no EIO", burst[0],
                         area="store")

            # Slow answers: every block GET waits; reads are slower, never wrong, never an error.
            store.delay = 0.5
            with stopwatch() as slow:
                assert await read_file(root / "slow.bin") == objects["slow.bin"]
            store.delay = 0.0
            record_fault("every block GET answered 0.5 s late", "reads wait for the store; right bytes, no error",
                         slow[0], area="store")

            # A store that fails every GET: one EIO within the client's bounded retries, reported in the metrics.
            store.always = 500
            before = store.injected
            with stopwatch() as failing, pytest.raises(OSError) as raised:
                await asyncio.wait_for(read_file(root / "dead.bin"), 30)
            assert raised.value.errno == errno.EIO
            assert store.injected - before >= 3, "retried before giving up"
            port = target_port(targets, "faulty")
            assert port is not None
            errors = series(await scrape(port), "shoal_store_errors_total", operation="get", reason="other")
            assert errors, "the failed GETs are counted"
            store.always = 0
            with stopwatch() as back:
                assert await read_file(root / "dead.bin") == objects["dead.bin"]  # no cool-down after a 500
            record_fault("the store answers 500 to every block GET",
                         f"EIO after the client's retries ({failing[0]:.1f} s), counted in shoal_store_errors; "
                         "the first read after the store recovers succeeds", back[0], area="store")
    finally:
        await store.stop()


async def test_a_store_quoting_megabytes_in_its_errors_is_quoted_short_and_without_secrets(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Every block GET answered with an S3 error whose text quotes the request (a pre-signed URL's signature and
    credential, the headers) and then a megabyte: the mount process's log line of the failed read, and the agent's
    report of a DataLoad part (which becomes the operation's message), carry at most ``MAX_ERROR_CHARS`` of it, and
    no key, signature or pre-signed query anywhere in the logs or the status."""
    await put_objects(seaweedfs, bucket, {"noisy.bin": os.urandom(MiB + 7)})
    store = FaultyStoreProxy(seaweedfs.endpoint)
    await store.start()
    output: list[str] = []
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node, \
                running(lambda stop: loader_app.run(settings, stop)):
            await node.apply("noisy", bucket, endpoint=store.endpoint)
            root = await node.wait_mounted("noisy", expect="noisy.bin", timeout=60)
            store.quote = "x" * MiB
            store.always = 400
            with pytest.raises(OSError) as raised:
                await asyncio.wait_for(read_file(root / "noisy.bin"), 30)
            assert raised.value.errno == errno.EIO

            async def logged() -> bool:
                output.append(capfd.readouterr().err)
                return any(line.get("event") == "read failed" for line in json_lines("".join(output)))

            await eventually(logged, what="the mount process's log line of the failed read")
            await bus.publish(subjects.DATALOAD_APPLY, dataload("noisy", dataset="noisy"))

            async def load_failed() -> OperationRecord | None:
                found = await operation(bus, "noisy")
                return found if found is not None and found.status.phase == "Failed" else None

            failed = await eventually(load_failed, timeout=60, what="the DataLoad Failed")
            output.append(capfd.readouterr().err)
            store.always = 0
    finally:
        await store.stop()
    assert store.injected >= 2
    read_failed = [line for line in json_lines("".join(output)) if line.get("event") == "read failed"]
    assert read_failed and all(len(line["error"]) <= MAX_ERROR_CHARS for line in read_failed), \
        [len(line["error"]) for line in read_failed]
    assert read_failed[0]["error"].endswith("…") and "noisy.bin" in read_failed[0]["error"]
    message = failed.status.message
    assert message.startswith(f"node {NODE} failed 2 block(s): 'noisy.bin': S3 get of 'noisy.bin'"), message[:300]
    assert len(message) <= MAX_ERROR_CHARS + 100, len(message)
    shown = "".join(output) + message
    assert "Authorization" in read_failed[0]["error"], "the quoted request is in the message"
    assert seaweedfs.config.secret_access_key not in shown
    # The signing values the store quoted back (its request's Authorization header) are hidden.
    assert re.findall(r"(?:Signature|Credential)=[^*]", shown) == []


def failing_reads(path: Path, reads: int) -> int:
    """Reads of the first page of ``path``, each a FUSE read (a failed page is never cached); how many failed
    with ESTALE."""
    failed = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(reads):
            try:
                os.pread(fd, 4096, 0)
            except OSError as err:
                assert err.errno == errno.ESTALE, err
                failed += 1
    finally:
        os.close(fd)
    return failed


async def test_failed_reads_show_in_the_dataset_status_and_are_logged_once_per_interval(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """An object overwritten with another size after the listing: ``cat`` gets ESTALE, and so do 200 more reads.
    The dataset's (and runtime's) ``ReadsFailing`` condition names the node, the file, the count and what to do;
    the mount process logs one "read failed" line per 5 s (SHOAL_READ_FAILURE_LOG_SECONDS) and a summary of the
    rest, not one line per read; after a resync the file reads again and the condition goes."""
    await put_objects(seaweedfs, bucket, {"model.bin": os.urandom(MiB + 7), "ok.txt": b"fine"})
    interval = 5.0
    output: list[str] = []

    async def reads_failing() -> Condition | None:
        record = await dataset_record(bus, "drift")
        return next((c for c in record.status.conditions if c.type == "ReadsFailing"), None) if record else None

    async with node_stack(bus, settings, seaweedfs, tmp_path,
                          mount_env={"SHOAL_READ_FAILURE_LOG_SECONDS": str(interval)}) as node:
        await node.apply("drift", bucket)
        root = await node.wait_mounted("drift", expect="model.bin", timeout=60)
        new = os.urandom(2 * MiB)
        await put_objects(seaweedfs, bucket, {"model.bin": new})
        loop = asyncio.get_running_loop()
        started = loop.time()
        cat = await run_tool("cat", str(root / "model.bin"), check=False)
        assert cat.returncode != 0 and "Stale file handle" in cat.stderr, cat.stderr
        assert await asyncio.to_thread(failing_reads, root / "model.bin", 200) == 200
        elapsed = loop.time() - started
        assert await read_file(root / "ok.txt") == b"fine"

        async def logged() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int] | None:
            output.append(capfd.readouterr().err)
            lines = json_lines("".join(output))
            failed = [line for line in lines if line.get("event") == "read failed"]
            summaries = [line for line in lines if line.get("event") == "read failures not logged"]
            counted = len(failed) + sum(line.get("not_logged", 0) for line in failed) + sum(
                line["count"] for line in summaries)
            agent, _ = await kv_load(await bus.kv(subjects.KV_AGENTS), NODE, AgentRecord)
            reported = sum(f.count for f in agent.heartbeat.read_failures_of("default", "drift")) if agent else 0
            # Every failed FUSE read is in the log (a line or a count) and in the heartbeat, which converge. (The
            # status's count follows within a minute: it is not rewritten at every beat while it climbs.)
            return (failed, summaries, counted) if reported == counted else None

        failed, summaries, counted = await eventually(logged, timeout=60,
                                                      what="the failed reads logged, summarised and in the status")
        assert counted >= 201  # cat's and the loop's (the kernel may ask for a page more than once)
        assert 1 <= len(failed) <= 1 + elapsed // interval, (len(failed), elapsed)
        assert summaries and all(line["path"] == "/model.bin" and line["errno"] == "ESTALE" for line in
                                 failed + summaries)
        condition = await eventually(reads_failing, what="the dataset's ReadsFailing condition")
        assert (condition.status, condition.reason) == ("True", "ObjectChanged")
        assert condition.message.startswith(f"{NODE}: ") and "of '/model.bin': ESTALE: the object changed" in \
            condition.message and "(resync it)" in condition.message, condition.message
        assert seaweedfs.config.secret_access_key not in condition.message
        record = await dataset_record(bus, "drift")
        assert record is not None and record.status.message == condition.message and record.status.phase == "Bound"
        runtime = await runtime_record(bus, "drift")
        assert runtime is not None and [c.message for c in runtime.status.conditions
                                        if c.type == "ReadsFailing"] == [condition.message]

        # Resynced, the file reads again: the condition goes.
        await node.resync("drift")

        async def new_version_read() -> bool:
            try:
                return await read_file(root / "model.bin") == new
            except OSError:
                return False

        await eventually(new_version_read, what="the new version after a resync")

        async def cleared() -> bool:
            return await reads_failing() is None

        await eventually(cleared, timeout=30, what="ReadsFailing gone once the file reads again")


# A second node with a mount of its own: `make soak` only (SHOAL_SOAK=1), to keep `make test` within its budget; the
# rule it shows (ENOSPC takes a tier down) is in make test as tests/unit/test_cache_tiers.py.
@pytest.mark.soak("a full cache disk on tmpfs")
async def test_a_full_cache_disk_reports_the_tier_down_and_reads_still_come_from_the_store(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    objects = {f"f{i}.bin": os.urandom(2 * MiB + i) for i in range(4)}
    await put_objects(seaweedfs, bucket, objects)
    cache = tmp_path / "cache"
    cache.mkdir()
    # Room for two 1 MiB blocks and their headers, not for the eight blocks the reads below want to cache.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "shoal-test-full", str(cache)], check=True)
    try:
        async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
            await node.apply("full", bucket)
            root = await node.wait_mounted("full", expect="f3.bin", timeout=60)
            with stopwatch() as reported:
                for key, body in objects.items():
                    assert await read_file(root / key) == body

                async def tier_down() -> str | None:
                    record = await runtime_record(bus, "full")
                    message = record.status.message if record else ""
                    return message if "is down" in message else None

                message = await eventually(tier_down, timeout=15, what="the full cache directory reported down")
            assert str(cache) in message
            # Whatever made it to disk before it filled is whole (checksummed on read); the rest comes from the store.
            await asyncio.to_thread(drop_page_cache)
            for key, body in objects.items():
                assert await read_file(root / key) == body
            leftovers = [p for p in cache.rglob("*.tmp")]
            assert not leftovers, f"half-written block files left behind: {leftovers}"
            record_fault("the cache disk fills up (a 3 MiB tmpfs under an SSD tier of 256 MiB)",
                         f"reads come from the store, right bytes; the runtime says: {message}",
                         reported[0], area="store")
    finally:
        # node_stack has stopped the mount processes; lazily, in case a failure left one holding a file open.
        if subprocess.run(["umount", str(cache)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(cache)], check=False)
