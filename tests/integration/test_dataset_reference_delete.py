"""Deleting a reference dataset (``dataset://``) never touches its source, on a real nats-server with the dataset
service's handlers driven directly: the reference's status mirrors the source's, ``manifest`` included, and the
delete used to remove the manifest its status named, the source's. The source stayed Bound and its running mounts
kept their tree, but every DataLoad of it failed with "has no manifest yet" and a mount process started later
(an agent restart) had no tree to load, until the next resync of the source.
"""

from __future__ import annotations

from pathlib import Path

from libs import subjects
from libs.bus import Bus, Delivery, kv_load
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.manifest import ManifestStore
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import make_settings


def delivery(subject: str, sequence: int) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=1, stream_sequence=sequence)


def dataset(name: str, namespace: str, mount_point: str) -> Dataset:
    return Dataset(metadata=ObjectMeta(name=name, namespace=namespace),
                   spec=DatasetSpec(mounts=[Mount(mount_point=mount_point)]))


async def record(bus: Bus, name: str, namespace: str) -> DatasetRecord:
    found, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), subjects.resource_key(namespace, name),
                             DatasetRecord)
    assert found is not None, f"no record of {namespace}/{name}"
    return found


async def test_deleting_a_reference_keeps_its_sources_manifest(bus: Bus, nats_server: NatsServer,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "data"  # tmp_path holds the nats-server's store too
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "a.bin").write_bytes(b"a" * 1000)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    await handlers.apply(DatasetApply(dataset=dataset("src", "default", f"local://{folder}")),
                         delivery(subjects.DATASET_APPLY, 1))
    await handlers.sync(subjects.resource_key("default", "src"))
    manifest = (await record(bus, "src", "default")).status.manifest
    assert manifest, "the source was listed"

    await handlers.apply(DatasetApply(dataset=dataset("ref", "team", "dataset://default/src")),
                         delivery(subjects.DATASET_APPLY, 2))
    assert (await record(bus, "ref", "team")).status.manifest == manifest, "the reference mirrors its source"
    await handlers.delete(DatasetDelete(name="ref", namespace="team"), delivery(subjects.DATASET_DELETE, 3))

    assert (await record(bus, "src", "default")).status.manifest == manifest
    entries = await (await ManifestStore.of(bus)).load(manifest)
    assert [entry.path for entry in entries] == ["/train/a.bin"], "the source's manifest was deleted with its reference"
