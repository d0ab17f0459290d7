"""The systems under test of the agent bench: the store (SeaweedFS), Shoal (its services and agent as processes,
as in production), rclone and s3fs mounts, and a minimal pyfuse3 passthrough of the local copy (the FUSE
reference). Each mount can be made cold (fresh cache and mount) and names the
processes that serve it, for CPU accounting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.processes import (
    Child,
    _mount_roots,
    descendants,
    mounted,
    mounts_under,
    unmount,
    wait_mounted,
)
from tests.bench.worker import read_tree
from tests.bench.workloads import Sizes

if TYPE_CHECKING:
    from libs.embedded import SeaweedConfig, ServerProcess

NODE = "bench-node"
DATA = "data"
EPOCH = "epoch"
NAMESPACE = "default"


@dataclass
class Store:
    config: SeaweedConfig
    process: ServerProcess

    @property
    def creds(self) -> tuple[str, str, str]:
        return self.config.endpoint, self.config.access_key_id, self.config.secret_access_key

    def warm(self) -> None:
        """Keep SeaweedFS's files in the page cache, so every system's cold reads meet the same server state."""
        read_tree(self.config.data_dir)


class MountedSystem:
    """A FUSE mount of the bench bucket that can be made cold (fresh cache and mount)."""

    name = ""
    root: Path
    cache_dirs: list[Path]

    def fresh(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def daemon_pids(self) -> list[int]:
        raise NotImplementedError

    def serving_pids(self) -> list[int]:
        """The process(es) serving the mount: a change during a workload invalidates its rows."""
        return self.daemon_pids()


class ChildMount(MountedSystem):
    """A mount served by one child process of ours (rclone, s3fs, the passthrough) at ``mnt``."""

    mnt: Path
    logs: Path
    proc: Child | None = None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = Child(self.name, argv, self.logs / f"{self.name}.log", env=env)
        wait_mounted(self.mnt, 30, self.proc, f"{self.name} mount")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        unmount(self.mnt)

    def daemon_pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid]


class ShoalNode(MountedSystem):
    name = "Shoal"

    def __init__(self, run_dir: Path, nats_url: str, store: Store, sizes: Sizes, logs: Path) -> None:
        self.run_dir = run_dir
        self.nats_url = nats_url
        self.store = store
        self.sizes = sizes
        self.logs = logs
        self.mount_root = run_dir / "mnt"
        self.cache_root = run_dir / "cache"
        _mount_roots.append(self.mount_root)
        endpoint, key, secret = store.creds
        self.env = {**os.environ, "NATS_URL": nats_url, "SHOAL_S3_ENDPOINT": endpoint,
                    "SHOAL_S3_ACCESS_KEY_ID": key, "SHOAL_S3_SECRET_ACCESS_KEY": secret,
                    "SHOAL_MOUNT_ROOT": str(self.mount_root), "SHOAL_NODE_NAME": NODE, "SHOAL_LOG_LEVEL": "warning"}
        self.services: list[Child] = []
        self.agent: Child | None = None
        self.policy = "lfu-admission"
        self.datasets: dict[str, str] = {}  # name -> a file that must be visible once mounted
        self.root = self.mountpoint(DATA)
        self.cache_dirs = [self.cache_root / NAMESPACE / DATA]

    def mountpoint(self, name: str) -> Path:
        return self.mount_root / NAMESPACE / name

    def start_services(self) -> None:
        for module in ("services.dataset", "services.runtime"):
            self.services.append(Child(module, [sys.executable, "-m", module], self.logs / f"{module}.log",
                                       env=self.env))

    def start_agent(self) -> None:
        env = {**self.env, "SHOAL_CACHE_POLICY": self.policy}
        self.agent = Child("services.agent", [sys.executable, "-m", "services.agent"],
                           self.logs / "services.agent.log", env=env, grace=30.0)

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        for path in mounts_under(self.mount_root):
            unmount(path)

    def stop(self) -> None:
        self.stop_agent()

    def daemon_pids(self) -> list[int]:
        return [] if self.agent is None else [self.agent.pid, *descendants(self.agent.pid)]

    def serving_pids(self) -> list[int]:
        return self.mount_pids(DATA)

    def mount_pids(self, name: str) -> list[int]:
        """The mount process of dataset ``name`` (a child of the agent)."""
        found = []
        for pid in self.daemon_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"services.agent.mountd" in argv and name.encode() in argv:
                found.append(pid)
        return found

    def apply(self, name: str, bucket: str, quota: int, probe: str, medium: str = "SSD") -> None:
        """A dataset of the bucket with one cache tier: SSD under ``cache_root``, or MEM."""
        asyncio.run(self._apply(name, bucket, quota, medium))
        self.datasets[name] = probe

    async def _apply(self, name: str, bucket: str, quota: int, medium: str = "SSD") -> None:
        from libs import subjects
        from libs.bus import connect
        from libs.config import NatsSettings
        from libs.events.common import ObjectMeta
        from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
        from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore

        bus = await connect(NatsSettings(urls=[self.nats_url]), "shoal-bench-agent")
        try:
            await bus.provision()
            levels = [Level(mediumtype="MEM", quota=quota) if medium == "MEM"
                      else Level(mediumtype="SSD", quota=quota, path=str(self.cache_root))]
            runtime = Runtime(metadata=ObjectMeta(name=name),
                              spec=RuntimeSpec(tieredstore=TieredStore(levels=levels)))
            dataset = Dataset(metadata=ObjectMeta(name=name),
                              spec=DatasetSpec(mounts=[Mount(mount_point=f"s3://{bucket}/")]))
            await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
            await bus.publish(subjects.DATASET_APPLY, DatasetApply(dataset=dataset))
        finally:
            await bus.close()

    def wait_mounts(self, timeout: float = 180.0) -> None:
        for name, probe in self.datasets.items():
            path = self.mountpoint(name)
            wait_mounted(path, timeout, self.agent, f"Shoal mount of {name}")
            # Mounted (seen in mountinfo), so a stat reaches the mount process, not the bare directory.
            deadline = time.monotonic() + 30
            while not (path / probe).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path / probe} not visible in the Shoal mount")
                time.sleep(0.1)

    def fresh(self, clear: Sequence[str] = (DATA,)) -> None:
        """Cold: stop the agent (its mounts go), delete the datasets' cache folders, start it, wait for mounts."""
        self.stop_agent()
        for name in clear:
            shutil.rmtree(self.cache_root / NAMESPACE / name, ignore_errors=True)
        self.start_agent()
        self.wait_mounts()
        self.settle()

    def settle(self, stable: float = 2.0, timeout: float = 60.0) -> None:
        """Wait until the mount processes stayed the same for ``stable`` seconds.

        An agent restart can make the runtime NotReady for a moment (missed heartbeats), which makes the new
        agent unmount and mount again; measuring during that would measure the restart.
        """
        deadline = time.monotonic() + timeout
        last: list[list[int]] = []
        since = time.monotonic()
        while time.monotonic() < deadline:
            current = [self.mount_pids(name) if mounted(self.mountpoint(name)) else [] for name in self.datasets]
            if current != last:
                last, since = current, time.monotonic()
            elif all(current) and time.monotonic() - since >= stable:
                self.wait_mounts()
                return
            time.sleep(0.1)
        raise TimeoutError(f"Shoal mounts not stable within {timeout:.0f} s (mount processes {last})")

    def counters(self, name: str) -> dict[str, int]:
        return asyncio.run(self._counters(name))

    async def _counters(self, name: str) -> dict[str, int]:
        """The mount's cache counters, from an inventory snapshot asked for now."""
        import msgspec

        from libs import subjects
        from libs.bus import connect
        from libs.config import NatsSettings
        from libs.events.agent import InventoryRequest
        from libs.events.common import ObjectRef

        bus = await connect(NatsSettings(urls=[self.nats_url]), "shoal-bench-agent")
        try:
            answer: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()

            async def on_event(msg: Any) -> None:
                event = msgspec.json.decode(msg.data)
                if (event.get("type") == "agent.inventory.snapshot.v2" and event["dataset"]["name"] == name
                        and not answer.done()):
                    answer.set_result(event["counters"])

            subscription = await bus.nc.subscribe(subjects.agent_inventory(NODE), cb=on_event)
            request = InventoryRequest(node=NODE, dataset=ObjectRef(name=name, namespace=NAMESPACE))
            await bus.nc.publish(subjects.INVENTORY_REQUEST, msgspec.json.encode(request))
            try:
                return await asyncio.wait_for(answer, 15)
            finally:
                await subscription.unsubscribe()
        finally:
            await bus.close()


class RcloneMount(ChildMount):
    name = "rclone"

    def __init__(self, run_dir: Path, store: Store, bucket: str, logs: Path) -> None:
        self.mnt = run_dir / "rclone-mnt"
        self.cache = run_dir / "rclone-cache"
        self.root = self.mnt
        self.cache_dirs = [self.cache]
        self.logs = logs
        self.bucket = bucket
        _mount_roots.append(run_dir)
        endpoint, key, secret = store.creds
        self.config_file = run_dir / "rclone.conf"
        prefix = "RCLONE_CONFIG_SHOALBENCH_"
        # AWS_* variables of the caller's environment are not for this endpoint; AWS_CA_BUNDLE in particular makes
        # rclone 1.60 fail with "LoadCustomCABundleError ... unsupported transport" even for plain http.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        self.env = {**inherited, f"{prefix}TYPE": "s3", f"{prefix}PROVIDER": "Other", f"{prefix}ENDPOINT": endpoint,
                    f"{prefix}ACCESS_KEY_ID": key, f"{prefix}SECRET_ACCESS_KEY": secret,
                    f"{prefix}FORCE_PATH_STYLE": "true", f"{prefix}REGION": "us-east-1"}

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("")
        argv = ["rclone", "mount", f"shoalbench:{self.bucket}", str(self.mnt), "--vfs-cache-mode", "full",
                "--cache-dir", str(self.cache), "--read-only", "--config", str(self.config_file),
                "--log-level", "NOTICE"]
        self.start(argv, env=self.env)


class S3fsMount(ChildMount):
    name = "s3fs"

    def __init__(self, run_dir: Path, store: Store, bucket: str, logs: Path) -> None:
        self.mnt = run_dir / "s3fs-mnt"
        self.cache = run_dir / "s3fs-cache"
        self.root = self.mnt
        self.cache_dirs = [self.cache]
        self.logs = logs
        self.bucket = bucket
        self.endpoint = store.config.endpoint
        _mount_roots.append(run_dir)
        self.passwd = run_dir / "s3fs.passwd"
        fd = os.open(self.passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{store.config.access_key_id}:{store.config.secret_access_key}\n")
        os.chmod(self.passwd, 0o600)

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        argv = ["s3fs", self.bucket, str(self.mnt), "-f", "-o", f"url={self.endpoint}", "-o",
                "use_path_request_style", "-o", f"passwd_file={self.passwd}", "-o", f"use_cache={self.cache}",
                "-o", "ro", "-o", "dbglevel=warn"]
        self.start(argv)


class PassthroughMount(ChildMount):
    """``tests.bench.passthrough`` over the bench's local copy: what FUSE in Python costs with nothing else."""

    name = "passthrough"

    def __init__(self, run_dir: Path, source: Path, logs: Path) -> None:
        self.mnt = run_dir / "passthrough-mnt"
        self.root = self.mnt
        self.cache_dirs = []  # the source's pages are dropped with the local copy's
        self.source = source
        self.logs = logs
        _mount_roots.append(run_dir)

    def fresh(self) -> None:
        self.stop()
        self.mnt.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "tests.bench.passthrough", str(self.source), str(self.mnt)]
        self.start(argv)
