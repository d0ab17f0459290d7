"""Node agent: heartbeats for the runtimes it serves, and one supervised mount process per Bound dataset.

| source | what | effect |
|---|---|---|
| KV shoal_runtimes, shoal_datasets (watched) | Bound datasets of served runtimes | start / stop mount processes |
| timer | every SHOAL_HEARTBEAT_SECONDS | publish agent.heartbeat.v1 on shoal.agent.heartbeat.<node> |

A mount process that dies is restarted with backoff; its stale mount (ENOTCONN) stays until the new process has
loaded everything and moves its mount in beneath it, so readers get an error, never an empty folder. On stop every
mount process gets SIGTERM, any mount left behind is removed with ``fusermount3 -u -z``, and the bare mount point is
removed. Heartbeats say how each mount is doing (Serving, Starting, Failing). A deleted dataset is
unmounted at once (its mount process deletes its cached blocks; the agent deletes those a dead one left); one
that merely stops being Bound (its runtime briefly NotReady, e.g. while this agent restarts) keeps its mount for
a grace period, so readers are not cut off by a blip.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from libs import subjects
from libs.bus import Bus, KvMirror, connect
from libs.config import Settings
from libs.events.agent import AgentHeartbeat, MountReport
from libs.events.common import ObjectRef
from libs.events.dataset import DatasetRecord
from libs.events.runtime import RuntimeRecord
from libs.telemetry import get_logger
from services.agent import domain
from services.agent.cache import BlockCache
from services.agent.handover import remove_mountpoint
from services.agent.mountinfo import device_of, is_mounted

SERVICE_NAME = "shoal-agent"
log = get_logger(SERVICE_NAME)

# How often the wanted mounts are recomputed from the watched buckets: well inside "mounted within a second".
POLL_SECONDS = 0.25
# A mount whose dataset is no longer Bound (but still exists) is kept this long before it is stopped.
UNBOUND_GRACE_SECONDS = 30.0
# A mount process gets this long to unmount cleanly after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 10.0


async def force_unmount(path: str) -> None:
    """Remove a mount left by a dead process (readers would get ENOTCONN until it goes)."""
    if not is_mounted(path):
        return
    process = await asyncio.create_subprocess_exec("fusermount3", "-u", "-z", path,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    if process.returncode != 0:
        log.warning("could not unmount", path=path, error=stderr.decode(errors="replace").strip())


@dataclass
class MountWorker:
    namespace: str
    name: str
    path: str
    process: asyncio.subprocess.Process | None = None
    failures: int = 0
    next_start: float = 0.0
    unwanted_since: float | None = None
    exit_code: int | None = None
    # The dead mount a crashed process left (kept until its replacement moves in beneath it).
    stale_device: str | None = None


@dataclass
class NodeAgent:
    settings: Settings
    bus: Bus
    runtimes: KvMirror[RuntimeRecord]
    datasets: KvMirror[DatasetRecord]
    # Environment of mount processes; None inherits the agent's (tests run the agent in-process).
    child_env: dict[str, str] | None = None
    workers: dict[tuple[str, str], MountWorker] = field(default_factory=dict)
    served: list[tuple[str, str]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(Path(self.settings.agent.mount_root).mkdir, parents=True, exist_ok=True)
        heartbeat = asyncio.create_task(self._heartbeats(stop))
        mirrors = [asyncio.create_task(self.runtimes.run()), asyncio.create_task(self.datasets.run())]
        await asyncio.wait([asyncio.create_task(self.runtimes.ready.wait()), *mirrors],
                           return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait([asyncio.create_task(self.datasets.ready.wait()), *mirrors],
                           return_when=asyncio.FIRST_COMPLETED)
        try:
            while not stop.is_set():
                await self.reconcile()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=POLL_SECONDS)
        finally:
            heartbeat.cancel()
            self.runtimes.stop()
            self.datasets.stop()
            await asyncio.gather(heartbeat, *mirrors, return_exceptions=True)
            await asyncio.gather(*(self._stop_worker(w) for w in list(self.workers.values())))
            self.workers.clear()

    async def reconcile(self) -> None:
        if not (self.runtimes.ready.is_set() and self.datasets.ready.is_set()):
            return
        self.served = domain.served_runtimes(self.runtimes.values.values(), self.settings.agent.runtimes)
        wanted = domain.wanted_mounts(self.datasets.values.values(), self.served)
        now = time.monotonic()
        for ref in [r for r in self.workers if r not in wanted]:
            unwanted = self.workers[ref]
            exists = subjects.resource_key(*ref) in self.datasets.values
            if unwanted.unwanted_since is None:
                unwanted.unwanted_since = now
            if not exists or now - unwanted.unwanted_since >= UNBOUND_GRACE_SECONDS:
                await self._stop_worker(self.workers.pop(ref))
            if not exists:
                await self._free_cache(*ref)
        for namespace, name in sorted(wanted):
            worker = self.workers.get((namespace, name))
            if worker is None:
                path = domain.mountpoint(self.settings.agent.mount_root, namespace, name)
                worker = self.workers[(namespace, name)] = MountWorker(namespace, name, path)
            worker.unwanted_since = None
            if worker.process is not None and worker.process.returncode is not None:
                worker.failures += 1
                worker.next_start = now + domain.restart_delay(worker.failures)
                worker.exit_code, worker.stale_device = worker.process.returncode, device_of(worker.path)
                log.warning("mount process exited", dataset=f"{namespace}/{name}", code=worker.process.returncode,
                            restart_in=round(worker.next_start - now, 1))
                worker.process = None
            if worker.process is None and now >= worker.next_start:
                await self._start_worker(worker)

    async def _start_worker(self, worker: MountWorker) -> None:
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.agent.mountd", "--namespace", worker.namespace, "--name", worker.name,
            "--mountpoint", worker.path, stdin=asyncio.subprocess.DEVNULL, env=self.child_env,
        )
        log.info("mount process started", dataset=f"{worker.namespace}/{worker.name}", pid=worker.process.pid,
                 mountpoint=worker.path)

    async def _stop_worker(self, worker: MountWorker) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        await force_unmount(worker.path)
        await asyncio.to_thread(remove_mountpoint, worker.path)
        log.info("mount stopped", dataset=f"{worker.namespace}/{worker.name}")

    async def _free_cache(self, namespace: str, name: str) -> None:
        """Delete the blocks of a deleted dataset that its mount process (down, or never told) left on disk."""
        runtime = self.runtimes.values.get(subjects.resource_key(namespace, name))
        if runtime is None:
            return
        levels = runtime.runtime.spec.tieredstore.levels
        suffix = f"{namespace}/{name}"
        folders = [Path(d.strip()) / suffix for level in levels for d in level.path.split(",") if d.strip()]
        if not await asyncio.to_thread(lambda: any(folder.is_dir() for folder in folders)):
            return  # the mount process freed it (the usual case)

        def free() -> int:
            cache = BlockCache.from_levels(levels, suffix)
            cache.load()  # scans what is Shoal's (block files), so only that is deleted
            return cache.purge()

        try:
            freed = await asyncio.to_thread(free)
        except (OSError, ValueError) as err:
            log.warning("could not free the cache of a deleted dataset", dataset=suffix, error=str(err))
            return
        log.info("deleted dataset's cache freed", dataset=suffix, blocks=freed)

    def _mount_reports(self) -> list[MountReport]:
        reports = []
        for (namespace, name), worker in sorted(self.workers.items()):
            if worker.unwanted_since is not None:
                continue
            alive = worker.process is not None and worker.process.returncode is None
            device = device_of(worker.path) if alive else None
            reports.append(domain.mount_report(
                ObjectRef(name=name, namespace=namespace), alive=alive,
                mounted=device is not None and device != worker.stale_device, exit_code=worker.exit_code,
                failures=worker.failures,
            ))
        return reports

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        interval = self.settings.agent.heartbeat_seconds
        # A first beat listing nothing would make this node's runtimes briefly not ready (and unbind them).
        await self.runtimes.ready.wait()
        while not stop.is_set():
            served = domain.served_runtimes(self.runtimes.values.values(), self.settings.agent.runtimes)
            beat = AgentHeartbeat(
                node=self.settings.agent.node_name,
                runtimes=[ObjectRef(name=name, namespace=namespace) for namespace, name in served],
                healthy=True, sent_at=time.time(), interval_seconds=interval, mounts=self._mount_reports(),
            )
            try:
                await self.bus.publish(subjects.agent_heartbeat(self.settings.agent.node_name), beat)
            except Exception:
                log.exception("heartbeat failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


async def run(settings: Settings, stop: asyncio.Event, child_env: dict[str, str] | None = None) -> None:
    bus = await connect(settings.nats, SERVICE_NAME)
    try:
        await bus.provision()
        agent = NodeAgent(settings, bus, KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord),
                          KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord), child_env)
        await agent.run(stop)
    finally:
        await bus.close()
