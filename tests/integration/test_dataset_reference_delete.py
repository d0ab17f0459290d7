"""The manifests of reference datasets (``dataset://``), on a real nats-server with the dataset service's handlers
driven directly. Deleting a reference never touches its source: the reference's status mirrors the source's,
``manifest`` included, and the delete used to remove the manifest its status named, the source's. The source stayed
Bound and its running mounts kept their tree, but every DataLoad of it failed with "has no manifest yet" and a mount
process started later (an agent restart) had no tree to load, until the next resync of the source. A listed dataset
re-applied as a reference leaves none of its own manifests behind.
"""

from __future__ import annotations

from pathlib import Path

import nats.errors
import pytest

from libs import subjects
from libs.bus import Bus, Delivery, kv_load
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetDelete, DatasetRecord, DatasetSpec, Mount
from libs.manifest import ManifestStore
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import make_settings
from tests.integration.test_dataset_recreate import manifest_exists


def delivery(subject: str, sequence: int, deliveries: int = 1) -> Delivery:
    return Delivery(subject=subject, headers={}, deliveries=deliveries, stream_sequence=sequence)


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


async def listed_own_and_other(bus: Bus, nats_server: NatsServer, tmp_path: Path) -> DatasetHandlers:
    """Two listed datasets, ``own`` and ``other`` (commands 1 and 2), each of one file; the handlers that made them."""
    for name in ("own", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.bin").write_bytes(b"x" * 10)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    for sequence, name in enumerate(("own", "other"), start=1):
        await handlers.apply(DatasetApply(dataset=dataset(name, "default", f"local://{tmp_path / name}")),
                             delivery(subjects.DATASET_APPLY, sequence))
        await handlers.sync(subjects.resource_key("default", name))
    return handlers


async def test_a_dataset_reapplied_as_a_reference_leaves_no_manifest_behind(bus: Bus, nats_server: NatsServer,
                                                                            tmp_path: Path) -> None:
    """A listed dataset re-applied as a reference starts from an empty status (it shows its source's now), so
    nothing named its manifest any more and nothing removed it: kept in the Object Store for ever. It goes the way a
    deleted dataset's do; the manifest of the source it now mirrors stays, and a reference that mounted it is told
    why it cannot follow any more."""
    handlers = await listed_own_and_other(bus, nats_server, tmp_path)
    own = (await record(bus, "own", "default")).status.manifest
    other = (await record(bus, "other", "default")).status.manifest
    assert own and other, "both were listed"
    await handlers.apply(DatasetApply(dataset=dataset("reader", "team", "dataset://default/own")),
                         delivery(subjects.DATASET_APPLY, 3))

    await handlers.apply(DatasetApply(dataset=dataset("own", "default", "dataset://default/other")),
                         delivery(subjects.DATASET_APPLY, 4))
    await handlers.sync(subjects.resource_key("default", "own"))

    assert not await manifest_exists(bus, own), "the manifest of the dataset's own listing was kept"
    assert (await record(bus, "own", "default")).status.manifest == other, "it mirrors its new source"
    assert [entry.path for entry in await (await ManifestStore.of(bus)).load(other)] == ["/other.bin"]
    await handlers.sync(subjects.resource_key("team", "reader"))
    reader = await record(bus, "reader", "team")
    assert reader.status.phase == "Failed" and "is itself a reference" in reader.status.message, reader.status

    # Back to a listed dataset: the source's manifest, which its status named meanwhile, is not its to remove.
    await handlers.apply(DatasetApply(dataset=dataset("own", "default", f"local://{tmp_path / 'own'}")),
                         delivery(subjects.DATASET_APPLY, 5))
    await handlers.sync(subjects.resource_key("default", "own"))
    assert await manifest_exists(bus, other)
    assert (await record(bus, "own", "default")).status.phase != "Failed"


@pytest.mark.parametrize("finisher", ["redelivered-apply", "reconciler"])
async def test_a_reapplied_reference_whose_manifest_delete_failed_removes_it_later(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finisher: str) -> None:
    """The apply that made a listed dataset a reference wrote its record, then the removal of its own manifests
    failed (NATS away a moment): the record no longer named them, so its redelivery found nothing to change and the
    manifests stayed in the Object Store for ever. The record names them until they are removed: the redelivered
    apply, or the reconciler's next look at the record (an apply never delivered again), removes them."""
    handlers = await listed_own_and_other(bus, nats_server, tmp_path)
    own = (await record(bus, "own", "default")).status.manifest
    assert own, "it was listed"

    async def unreachable(self: ManifestStore, name: str) -> None:
        raise nats.errors.TimeoutError

    reference = DatasetApply(id="own.apply.3", dataset=dataset("own", "default", "dataset://default/other"))
    with monkeypatch.context() as patched:
        patched.setattr(ManifestStore, "delete", unreachable)
        with pytest.raises(nats.errors.TimeoutError):
            await handlers.apply(reference, delivery(subjects.DATASET_APPLY, 3))
    assert (await record(bus, "own", "default")).dataset.spec.mounts[0].mount_point == "dataset://default/other"
    assert await manifest_exists(bus, own), "removed though the delete failed"

    if finisher == "redelivered-apply":
        await handlers.apply(reference, delivery(subjects.DATASET_APPLY, 3, deliveries=2))
    else:
        await handlers.sync(subjects.resource_key("default", "own"))
    assert not await manifest_exists(bus, own), "the manifest of the dataset's own listing was kept"
    assert (await record(bus, "own", "default")).manifests_left == [], "still names what it removed"
