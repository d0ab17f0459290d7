"""A mount follows its S3 secret files when they are rewritten (a rotated Kubernetes Secret), without a resync.

A whole node (dataset, runtime and agent services in-process, the mount process a real FUSE process over SeaweedFS)
serves a dataset whose credentials come only from secret files. The mount process reads them again every
SHOAL_SECRET_REFRESH_SECONDS (0.5 s here): a wrong key written into the file makes reads of uncached files fail,
the right key written back makes them work again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from libs import subjects
from libs.bus import Bus
from libs.config import Settings
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from libs.events.runtime import Level, Runtime, RuntimeApply, RuntimeSpec, TieredStore
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually, make_settings
from tests.integration.agent_stack import node_stack, read_file
from tests.secrets import credentials_from, secret_files

pytestmark = pytest.mark.needs("fuse")

# Each probe of ``eventually`` (every 50 ms for at most 10 s of each phase) reads a file of its own.
FILES = 400


def rotate(path: Path, value: str) -> None:
    """Replace the file at once, as the kubelet swaps a mounted Secret's files: never a half-written key."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(value)
    os.replace(staged, path)


async def test_a_rewritten_secret_file_is_used_without_a_resync(bus: Bus, settings: Settings,
                                                               seaweedfs: SeaweedServer, bucket: str,
                                                               tmp_path: Path) -> None:
    objects = {f"f{i:03d}": f"body of file {i}\n".encode() * 50 for i in range(FILES)}
    await put_objects(seaweedfs, bucket, objects)
    right = seaweedfs.config.secret_access_key
    secrets_dir = secret_files(tmp_path / "secrets", {
        "s3-creds": {"id": seaweedfs.config.access_key_id, "secret": right}})
    key_file = Path(secrets_dir) / "s3-creds" / "secret"
    # No default credentials anywhere: the secret files are the only way into the bucket.
    node_settings = make_settings(settings.nats.urls[0], seaweedfs.endpoint, secrets_dir=secrets_dir)
    env = {"SHOAL_S3_ACCESS_KEY_ID": "", "SHOAL_S3_SECRET_ACCESS_KEY": "", "SHOAL_SECRETS_DIR": secrets_dir,
           "SHOAL_SECRET_REFRESH_SECONDS": "0.5"}
    unread = iter(sorted(objects))  # each probe reads a file never read: none of its blocks is cached

    async with node_stack(bus, node_settings, seaweedfs, tmp_path, mount_env=env) as node:
        runtime = Runtime(metadata=ObjectMeta(name="rotated"), spec=RuntimeSpec(
            tieredstore=TieredStore(levels=[Level(mediumtype="SSD", quota="64Mi", path=str(node.cache_dir))]),
            block_size="1Mi"))
        await bus.publish(subjects.RUNTIME_APPLY, RuntimeApply(runtime=runtime))
        mount = Mount(mount_point=f"s3://{bucket}/", encrypt_options=credentials_from("s3-creds"))
        await bus.publish(subjects.DATASET_APPLY, DatasetApply(
            dataset=Dataset(metadata=ObjectMeta(name="rotated"), spec=DatasetSpec(mounts=[mount]))))
        root = await node.wait_mounted("rotated", expect="f000")

        async def read_next() -> int:
            """0 when the next unread file reads back whole, else the errno of its read."""
            key = next(unread, None)
            assert key is not None, "every file was read: the probes outran the test's files"
            try:
                assert await read_file(root / key) == objects[key]
            except OSError as err:
                return err.errno or -1
            return 0

        assert await read_next() == 0

        rotate(key_file, "wrong-secret-7d2e91c4")

        async def refused() -> bool:
            return await read_next() == errno.EIO

        await eventually(refused, timeout=10, what="reads refused with the wrong key")

        rotate(key_file, right)

        async def served() -> bool:
            return await read_next() == 0

        await eventually(served, timeout=10, what="reads served again with the right key")
