"""``make bench``: the control-plane bench, the agent data-path bench (``tests/bench/agent.py``), the seed
bench (``tests/bench/seed.py``: N consumers of one model behind a bandwidth-limited store, and peer reads), then the
warm-up bench (``tests/bench/warmup.py``: a DataLoad against direct GETs of the same objects), then the scheduler
bench (``tests/bench/scheduler.py``: inventory fold rate against the JetStream ceiling, decision latency), then the
metrics-cost bench (``tests/bench/metrics.py``: reads through a mount with metrics on against ``SHOAL_METRICS=off``),
then the load bench (``tests/bench/load.py``: 10,000 datasets applied at once and at a steady 500/s while 100
simulated agents beat, apply → synced p50/p99, the services' RSS).

``python -m tests.bench [--only control|agent|seed|warmup|scheduler|metrics|load] [--quick]`` runs them all by default;
``SHOAL_BENCH=seed make bench`` (or ``control``, ``agent``, ``warmup``, ``scheduler``, ``metrics``) runs one.
``--quick`` makes the agent, seed, warm-up, scheduler and metrics benches small; other arguments the control bench
does not know (e.g. ``--workloads``) go to the agent bench; the seed, warm-up and metrics benches take their settings
from ``SHOAL_BENCH_SEED_*``, ``SHOAL_BENCH_WARMUP_*``, ``SHOAL_BENCH_METRICS_*`` and ``SHOAL_BENCH_LOAD_*``.

The control-plane bench runs on the embedded stack (real nats-server and SeaweedFS) and measures, for a bucket of
10k objects:
- time from publishing ``dataset.apply`` to the synced status event (median of several runs), with the dataset
  service running as its own process, as in production;
- listing throughput (objects/s) of Shoal's S3 client and of a full sync (listing + manifest upload), against
  the peer measured in the same run: a bare aiobotocore paginated listing.

The bucket is seeded once and kept under .shoal/bench/ so later runs skip the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec
from aiobotocore.session import get_session
from rich.console import Console
from rich.table import Table

from libs import subjects
from libs.bus import connect
from libs.config import NatsSettings, Secret
from libs.embedded import NatsConfig, SeaweedConfig, free_port, start_nats, start_seaweedfs
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from libs.ufs import S3Location, open_store

BUCKET = "bench-10k"
BENCHES = ("control", "agent", "seed", "warmup", "scheduler", "metrics", "load")
console = Console(width=120)


async def seed(endpoint: str, key: str, secret: str, count: int) -> float:
    """Upload ``count`` small objects unless they are there; returns seconds spent."""
    started = time.perf_counter()
    session = get_session()
    async with session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                                     aws_secret_access_key=secret) as s3:
        buckets = {b["Name"] for b in (await s3.list_buckets())["Buckets"]}
        if BUCKET not in buckets:
            await s3.create_bucket(Bucket=BUCKET)
        present: set[str] = set()
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            present.update(item["Key"] for item in page.get("Contents", []))
        missing = [f"shard-{i // 1000:02d}/obj-{i:05d}.bin" for i in range(count)]
        missing = [k for k in missing if k not in present]
        semaphore = asyncio.Semaphore(64)

        async def put(object_key: str) -> None:
            async with semaphore:
                await s3.put_object(Bucket=BUCKET, Key=object_key, Body=object_key.encode() * 8)

        await asyncio.gather(*(put(k) for k in missing))
    return time.perf_counter() - started


async def bare_listing(endpoint: str, key: str, secret: str) -> tuple[int, float]:
    session = get_session()
    # Timed from client creation, like Shoal's store, which opens its client on first use.
    started = time.perf_counter()
    async with session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                                     aws_secret_access_key=secret) as s3:
        count = 0
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, PaginationConfig={"PageSize": 1000})
        async for page in pages:
            count += len(page.get("Contents", []))
        return count, time.perf_counter() - started


async def shoal_listing(endpoint: str, key: str, secret: str) -> tuple[int, float]:
    store = open_store(S3Location(bucket=BUCKET, endpoint_url=endpoint, access_key_id=Secret(key),
                                  secret_access_key=Secret(secret)))
    try:
        started = time.perf_counter()
        count = 0
        async for _ in store.list(page_size=1000):
            count += 1
        return count, time.perf_counter() - started
    finally:
        await store.close()


async def apply_to_synced(nats_url: str, runs: int, expected: int) -> list[float]:
    bus = await connect(NatsSettings(urls=[nats_url]), "shoal-bench")
    await bus.provision()
    durations = []
    try:
        for run in range(runs):
            name = f"bench-{os.getpid()}-{run}"
            done = asyncio.get_running_loop().create_future()

            async def on_status(msg, name=name, done=done):
                event = msgspec.json.decode(msg.data)
                if event["name"] == name and event["status"].get("fileNum") == expected and not done.done():
                    done.set_result(time.perf_counter())

            subscription = await bus.nc.subscribe(subjects.DATASET_STATUS, cb=on_status)
            command = DatasetApply(dataset=Dataset(metadata=ObjectMeta(name=name),
                                                   spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{BUCKET}")])))
            started = time.perf_counter()
            await bus.publish(subjects.DATASET_APPLY, command)
            finished = await asyncio.wait_for(done, 120)
            durations.append(finished - started)
            await subscription.unsubscribe()
    finally:
        await bus.close()
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    only = os.environ.get("SHOAL_BENCH", "").strip() or None
    parser.add_argument("--only", choices=BENCHES, default=only,
                        help="run one of the benches (default: all, or $SHOAL_BENCH)")
    parser.add_argument("--objects", type=int, default=10_000, help="control bench: objects in the bucket")
    parser.add_argument("--runs", type=int, default=5, help="control bench: apply → synced runs")
    parser.add_argument("--state-dir", type=Path, default=Path(".shoal/bench"))
    parser.add_argument("--quick", action="store_true", help="agent and seed benches: small sizes, for trying "
                        "them out")
    args, agent_args = parser.parse_known_args()
    if args.only not in (None, *BENCHES):
        parser.error(f"SHOAL_BENCH={args.only!r}: expected one of {', '.join(BENCHES)}")
    if agent_args and args.only in ("control", "seed", "warmup", "scheduler", "metrics", "load"):
        parser.error(f"unrecognized arguments: {' '.join(agent_args)}")
    failed = []
    if args.only in (None, "control"):
        try:
            control_bench(args)
        except Exception:
            if args.only == "control":
                raise
            console.print_exception()
            failed.append("control")
    if args.only in (None, "agent"):
        from tests.bench import agent

        try:
            agent.main(["--state-dir", str(args.state_dir), *(["--quick"] if args.quick else []), *agent_args])
        except Exception:
            if args.only == "agent":
                raise
            console.print_exception()
            failed.append("agent")
    if args.only in (None, "seed"):
        from tests.bench import seed

        seed.main(args.state_dir, quick=args.quick)
    if args.only in (None, "warmup"):
        from tests.bench import warmup

        try:
            warmup.main(args.state_dir, quick=args.quick)
        except Exception:
            if args.only == "warmup":
                raise
            console.print_exception()
            failed.append("warmup")
    if args.only in (None, "scheduler"):
        from tests.bench import scheduler

        try:
            scheduler.main(args.state_dir, quick=args.quick)
        except Exception:
            if args.only == "scheduler":
                raise
            console.print_exception()
            failed.append("scheduler")
    if args.only in (None, "metrics"):
        from tests.bench import metrics

        try:
            metrics.main(args.state_dir, quick=args.quick)
        except Exception:
            if args.only == "metrics":
                raise
            console.print_exception()
            failed.append("metrics")
    if args.only in (None, "load"):
        from tests.bench import load

        try:
            load.main(args.state_dir, quick=args.quick)
        except Exception:
            if args.only == "load":
                raise
            console.print_exception()
            failed.append("load")
    if failed:
        sys.exit(f"the {', '.join(failed)} bench failed (see above)")


def control_bench(args: argparse.Namespace) -> None:
    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    nats_config = NatsConfig(port=free_port(), monitor_port=free_port(), store_dir=state / f"nats-{os.getpid()}")
    seaweed_config = SeaweedConfig.on_free_ports(state / "seaweedfs")
    nats = start_nats(nats_config, state / "nats.log")
    seaweed = start_seaweedfs(seaweed_config, state / "seaweedfs.log")
    service = None
    try:
        creds = (seaweed_config.endpoint, seaweed_config.access_key_id, seaweed_config.secret_access_key)
        console.print(f"seeding {args.objects} objects into s3://{BUCKET} (kept for later runs)...")
        seed_seconds = asyncio.run(seed(*creds, args.objects))
        env = {**os.environ, "NATS_URL": nats_config.url, "SHOAL_S3_ENDPOINT": creds[0],
               "SHOAL_S3_ACCESS_KEY_ID": creds[1], "SHOAL_S3_SECRET_ACCESS_KEY": creds[2], "SHOAL_LOG_LEVEL": "warning"}
        with open(state / "dataset-service.log", "ab") as log:
            service = subprocess.Popen([sys.executable, "-m", "services.dataset"], env=env, stdout=log, stderr=log)
        bare = [asyncio.run(bare_listing(*creds)) for _ in range(3)]
        ours = [asyncio.run(shoal_listing(*creds)) for _ in range(3)]
        syncs = asyncio.run(apply_to_synced(nats_config.url, args.runs, args.objects))
    finally:
        if service is not None:
            service.terminate()
            service.wait(15)
        seaweed.stop()
        nats.stop()
        # JetStream state is per run: only the bucket in SeaweedFS is kept for later runs.
        shutil.rmtree(nats_config.store_dir, ignore_errors=True)
        (state / f"nats-{nats_config.port}.conf").unlink(missing_ok=True)
    count = bare[0][0]
    bare_rate = count / statistics.median(t for _, t in bare)
    ours_rate = ours[0][0] / statistics.median(t for _, t in ours)
    sync_median = statistics.median(syncs)
    sync_rate = args.objects / sync_median
    table = Table(title=f"Shoal control plane, {count} objects in SeaweedFS S3 (seeding took {seed_seconds:.1f} s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("vs bare aiobotocore listing", justify="right")
    table.add_row("bare aiobotocore listing (peer)", f"{bare_rate:,.0f} objects/s", "1.00x")
    table.add_row("Shoal S3ObjectStore.list", f"{ours_rate:,.0f} objects/s", f"{ours_rate / bare_rate:.2f}x")
    table.add_row("Shoal full sync (list + manifest)", f"{sync_rate:,.0f} objects/s", f"{sync_rate / bare_rate:.2f}x")
    table.add_row(f"apply → synced status, median of {len(syncs)}", f"{sync_median:.3f} s", "")
    table.add_row("apply → synced status, min / max", f"{min(syncs):.3f} / {max(syncs):.3f} s", "")
    console.print(table)


if __name__ == "__main__":
    main()
