"""CPU per sync-sized S3 listing (a dataset of 4 objects), by how the store gets its client: the cost a dataset
service pays per S3 dataset in a burst of applies, without NATS.

- ``fresh``: a store per listing with a client from a new aiobotocore session (before the shared session);
- ``shared``: a store per listing, its own client from the process's shared session;
- ``pooled``: a store per listing, its client leased from ``S3Clients`` (what the dataset service does);
- ``one``: one store for every listing (the floor).

Run: ``python -m tests.bench.s3_listing [--listings 50] [--rounds 2]`` (a SeaweedFS is started and stopped by
PID; its own CPU is not counted). Numbers go to ``docs/benchmarks.md`` by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libs.config import Secret
from libs.embedded import SeaweedConfig, start_seaweedfs
from libs.ufs import s3
from libs.ufs.base import S3Location

BUCKET = "bench"


async def listings(location: S3Location, count: int, store_of: Callable[[], s3.S3ObjectStore],
                   reuse: bool) -> float:
    """CPU ms (all threads) per listing of ``count`` listings."""
    started = time.process_time()
    store = store_of()
    for _ in range(count):
        if not reuse:
            store = store_of()
        assert len([info async for info in store.list()]) == 4
        if not reuse:
            await store.close()
    await store.close()
    return (time.process_time() - started) / count * 1000


async def main(count: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="shoal-s3-listing-"))
    config = SeaweedConfig.on_free_ports(work / "seaweedfs")
    weed = start_seaweedfs(config, work / "seaweedfs.log")
    try:
        location = S3Location(bucket=BUCKET, prefix="", endpoint_url=config.endpoint,
                              access_key_id=Secret(config.access_key_id),
                              secret_access_key=Secret(config.secret_access_key), path_style=True)
        async with s3.S3ObjectStore(location) as setup:
            client = await setup._s3()
            await client.create_bucket(Bucket=BUCKET)
            for index in range(4):
                await client.put_object(Bucket=BUCKET, Key=f"file-{index}", Body=b"x" * 100)
        from aiobotocore.session import get_session

        shared = s3.shared_session
        pool = s3.S3Clients()
        ways: dict[str, tuple[Callable[[], Any], Callable[[], s3.S3ObjectStore], bool]] = {
            "fresh": (get_session, lambda: s3.S3ObjectStore(location), False),
            "shared": (shared, lambda: s3.S3ObjectStore(location), False),
            "pooled": (shared, lambda: s3.S3ObjectStore(location, clients=pool), False),
            "one": (shared, lambda: s3.S3ObjectStore(location), True),
        }
        results: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, (session, store_of, reuse) in ways.items():
                s3.shared_session = session
                try:
                    results[way].append(await listings(location, count, store_of, reuse))
                finally:
                    s3.shared_session = shared
        await pool.close()
        print(f"{count} listings of a 4-object S3 dataset per round, {rounds} rounds: CPU ms per listing (median)")
        for way, values in results.items():
            print(f"  {way:7} {statistics.median(values):7.1f}  {[round(v, 1) for v in values]}")
    finally:
        weed.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listings", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.listings, arguments.rounds))
