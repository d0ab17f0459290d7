"""The CPU an autoSync pass of an unchanged large dataset costs in the dataset service.

A real nats-server (a temporary one, stopped at the end) and the dataset service's handlers (``DatasetHandlers.sync``,
as the reconciler calls it); the store is an in-memory listing of ``--objects`` objects in ``--folders`` folders,
in key order as S3 lists them, so what is measured is the service's own work: checking each key, building the
manifest, hashing it, comparing it with the stored one. The first pass writes the manifest; each later pass is due
(the clock moves a period on) and finds nothing changed. Prints the process CPU seconds of each unchanged pass.

    PYTHONPATH=$PWD .venv/bin/python -m tests.bench.autosync_cpu [--objects 300000] [--passes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from libs import subjects
from libs.bus import connect, kv_load, kv_save
from libs.config import NatsSettings
from libs.embedded import NatsConfig, free_port, start_nats
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, Mount
from libs.telemetry import setup_logging
from libs.ufs.base import Location, ObjectInfo
from services.dataset.handlers import DatasetHandlers
from tests.helpers import make_settings

PERIOD = 60.0


class Listing:
    """An object store that lists ``objects`` keys from memory, the same ones every time."""

    def __init__(self, objects: int, folders: int) -> None:
        # In key order, as S3 lists.
        keys = sorted(f"dir-{i % folders:04d}/file-{i:07d}.jpg" for i in range(objects))
        self.infos = [ObjectInfo(key=key, size=100_000 + i, etag=f"etag-{i}", mtime=1_700_000_000.0 + i)
                      for i, key in enumerate(keys)]

    def __call__(self, location: Location) -> Listing:
        return self

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        for start in range(0, len(self.infos), page_size):
            for info in self.infos[start:start + page_size]:
                yield info
            await asyncio.sleep(0)  # a page boundary, as a real listing awaits the store

    async def head(self, key: str) -> ObjectInfo:
        raise NotImplementedError("a sync lists; it reads no object")

    async def names_object(self) -> bool:
        return False

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        raise NotImplementedError("a sync lists; it reads no object")

    async def close(self) -> None:
        pass


async def measure(url: str, objects: int, folders: int, passes: int) -> list[float]:
    bus = await connect(NatsSettings(urls=[url]), "bench-autosync")
    try:
        await bus.provision()
        settings = make_settings(url)
        settings = dataclasses.replace(settings, service=dataclasses.replace(settings.service,
                                                                             autosync_seconds=PERIOD))
        clock = [1_700_000_000.0]
        handlers = DatasetHandlers(bus, settings, clock=lambda: clock[0], opener=Listing(objects, folders))
        kv = await bus.kv(subjects.KV_DATASETS)
        key = subjects.resource_key("default", "big")
        dataset = Dataset(metadata=ObjectMeta(name="big"), spec=DatasetSpec(mounts=[Mount(mount_point="s3://b/p/")]))
        await kv_save(kv, key, DatasetRecord(dataset=dataset, generation=1), None)
        assert await handlers.sync(key) == PERIOD  # the first listing writes the manifest
        first, revision = await kv_load(kv, key, DatasetRecord)
        assert first is not None and first.status.file_num == objects, first
        seconds = []
        for _ in range(passes):
            clock[0] += PERIOD
            started = time.process_time()
            assert await handlers.sync(key) == PERIOD
            seconds.append(time.process_time() - started)
        assert await kv_load(kv, key, DatasetRecord) == (first, revision)  # unchanged: nothing written
        return seconds
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300_000)
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    setup_logging("warning", "json")
    with tempfile.TemporaryDirectory() as tmp:
        config = NatsConfig(port=free_port(), monitor_port=free_port(), store_dir=Path(tmp) / "jetstream")
        server = start_nats(config, Path(tmp) / "nats.log")
        try:
            seconds = asyncio.run(measure(config.url, args.objects, args.folders, args.passes))
        finally:
            server.stop()
    print(f"autoSync of an unchanged dataset of {args.objects} objects: CPU seconds per pass "
          f"{', '.join(f'{s:.2f}' for s in seconds)} (median {statistics.median(seconds):.2f})")


if __name__ == "__main__":
    main()
