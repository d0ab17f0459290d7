"""The bridge's handlers driven event by event, for orders of events the whole bridge cannot be made to see on
demand (an object deleted and made again between two lists, two kinds claiming one name in a chosen order, another
controller's write between the bridge's read of an object and its patch).

The API server is the project's kmock subclass (``tests/kube.py``: there is no kube-apiserver here), reached
through kubernetes-asyncio; NATS is a real nats-server, with the real dataset service where Shoal's answer matters.
The test plays the watches (``on_listing`` / ``on_event``) and the periodic pass (``tick``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from kmock import Server
from kubernetes_asyncio import client

from libs import kube, subjects
from libs.bus import Bus, KvMirror
from libs.events.dataset import DatasetRecord
from libs.events.operation import OperationRecord
from libs.events.runtime import RuntimeRecord
from services.bridge import handlers as bridge_handlers
from services.bridge.domain import Applied, ObjectKey
from services.bridge.handlers import BridgeHandlers, Mirrors, RejectionFact
from services.dataset import app as dataset_app
from tests.conftest import NatsServer
from tests.helpers import dataset_record, eventually, make_settings, running
from tests.kube import FakeApiServer

SHOAL = kube.SHOAL_RESOURCES[0]
FLUID = next(r for r in kube.FLUID_RESOURCES if r.kind == "Dataset")
DATALOAD = next(r for r in kube.SHOAL_RESOURCES if r.kind == "DataLoad")
MERGE = "application/merge-patch+json"


@dataclasses.dataclass
class Harness:
    handlers: BridgeHandlers
    server: FakeApiServer

    async def create(self, resource: kube.Resource, name: str, spec: dict[str, Any],
                     namespace: str = "default") -> dict[str, Any]:
        body = {"apiVersion": resource.api_version, "kind": resource.kind,
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        created: dict[str, Any] = await self.handlers.custom.create_namespaced_custom_object(
            resource.group, resource.version, namespace, resource.plural, body)
        return created

    async def delete(self, resource: kube.Resource, name: str, namespace: str = "default") -> dict[str, Any]:
        """Delete in the API server; the object, held by Shoal's finalizer, as the watch would show it next."""
        await self.handlers.custom.delete_namespaced_custom_object(resource.group, resource.version, namespace,
                                                                   resource.plural, name)
        held = self.get(resource, name, namespace)
        assert held is not None and held["metadata"].get("deletionTimestamp")
        return held

    def get(self, resource: kube.Resource, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.server.stored(resource.group, resource.plural, namespace, name)

    async def first_lists(self, *but: kube.Resource) -> None:
        """The bridge's first list of every resource (but ``but``), empty: its objects' families are known."""
        for resource in kube.RESOURCES:
            if resource not in but:
                await self.handlers.on_listing(resource, None, [])

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        """Run the bridge's periodic pass until ``check`` holds (as its Periodic loop would)."""
        async def probe() -> Any:
            await self.handlers.tick()
            return check()

        return await eventually(probe, what=what)


@pytest.fixture
async def harness(nats_server: NatsServer, bus: Bus, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = make_settings(nats_server.url, secrets_dir=str(tmp_path / "secrets"))
    async with FakeApiServer() as server, Server(server) as http, \
            client.ApiClient(client.Configuration(host=str(http.url).rstrip("/"))) as api:
        mirrors = Mirrors(datasets=KvMirror(await bus.kv(subjects.KV_DATASETS), DatasetRecord),
                          runtimes=KvMirror(await bus.kv(subjects.KV_RUNTIMES), RuntimeRecord),
                          operations=KvMirror(await bus.kv(subjects.KV_OPERATIONS), OperationRecord))
        loops = (mirrors.datasets, mirrors.runtimes, mirrors.operations)
        tasks = [asyncio.create_task(loop.run()) for loop in loops]
        try:
            await eventually(lambda: _async(mirrors.ready()), what="the KV mirrors")
            yield Harness(BridgeHandlers(bus, api, settings, mirrors), server)
        finally:
            for loop in loops:
                loop.stop()
            await asyncio.gather(*tasks)


def files(folder: Path, count: int = 3) -> str:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"f{i}").write_bytes(b"x" * (100 + i))
    return f"local://{folder}"


async def collect(bus: Bus, subject: str) -> tuple[list[str], Callable[[], Awaitable[None]]]:
    """The ``Nats-Msg-Id`` (the command id) of every message on ``subject`` from now on, and how to stop."""
    ids: list[str] = []

    async def add(msg: Any) -> None:
        ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))

    subscription = await bus.nc.subscribe(subject, cb=add)
    return ids, subscription.unsubscribe


async def test_a_dataset_deleted_and_made_again_between_two_lists_is_a_new_object(
        harness: Harness, bus: Bus, tmp_path: Path) -> None:
    """The reviewer's sequence: the old object's delete (finalizer and deletionTimestamp) is handled and its
    finalizer removed; its DELETED and the new object's ADDED are missed, and only a re-list shows the new uid; the
    new object's delete is then published under its own uid, and its finalizer released once Shoal is done (before,
    the old object's "delete sent" stuck to the name: no delete, the finalizer held for ever). The new object's
    status is written too (the old one's last write does not count for it)."""
    deletes, stop = await collect(bus, subjects.DATASET_DELETE)
    await harness.first_lists()
    async with running(lambda halt: dataset_app.run(harness.handlers.settings, halt)):
        old = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "a")}]})
        await harness.handlers.on_listing(SHOAL, None, [old])
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the old object's status")
        await harness.handlers.on_event(SHOAL, "MODIFIED", await harness.delete(SHOAL, "demo"))
        await harness.until(lambda: harness.get(SHOAL, "demo") is None, what="the old object released")
        assert deletes == [f"k8s.dataset.{old['metadata']['uid']}.delete"]

        new = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "b", 2)}]})
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        await harness.handlers.on_listing(SHOAL, None, [new])  # a re-list: no DELETED, no ADDED seen
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 2,
                            what="the new object's status")
        await harness.handlers.on_event(SHOAL, "MODIFIED", await harness.delete(SHOAL, "demo"))
        await harness.until(lambda: harness.get(SHOAL, "demo") is None, what="the new object released")
    await stop()
    assert deletes == [f"k8s.dataset.{old['metadata']['uid']}.delete", f"k8s.dataset.{new['metadata']['uid']}.delete"]


async def test_a_shoal_and_a_fluid_dataset_of_one_name_are_not_one_record(harness: Harness, bus: Bus,
                                                                         tmp_path: Path) -> None:
    """Shoal keeps one dataset per namespace and name: a shoal.io Dataset accepted before (it holds Shoal's
    finalizer) keeps the name even when a restarted bridge lists the data.fluid.io one first; the Fluid one is
    refused (Invalid, naming the other object, with a Warning Event), gets no finalizer, publishes nothing, and its
    delete leaves Shoal's record alone. Once the Shoal one is deleted, the Fluid one becomes Shoal's dataset."""
    applies, stop_applies = await collect(bus, subjects.DATASET_APPLY)
    deletes, stop_deletes = await collect(bus, subjects.DATASET_DELETE)
    source = files(tmp_path / "shoal")
    shoal = await harness.handlers.custom.create_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural,
        {"apiVersion": SHOAL.api_version, "kind": SHOAL.kind,  # accepted by a bridge before this one
         "metadata": {"name": "demo", "finalizers": [kube.FINALIZER]}, "spec": {"mounts": [{"mountPoint": source}]}})
    fluid = await harness.create(FLUID, "demo", {"mounts": [{"mountPoint": files(tmp_path / "fluid", 2),
                                                             "name": "f"}]})
    async with running(lambda halt: dataset_app.run(harness.handlers.settings, halt)):
        await harness.handlers.on_listing(FLUID, None, [fluid])  # the Shoal kind not listed yet
        assert applies == []  # it waits for the other Dataset kind's list
        await harness.first_lists(FLUID, SHOAL)
        await harness.handlers.on_listing(SHOAL, None, [shoal])
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the Shoal Dataset served")
        condition = await harness.until(lambda: _accepted(harness.get(FLUID, "demo")), what="the Fluid one refused")
        assert condition["reason"] == "Invalid" and "Dataset.shoal.io default/demo" in condition["message"]
        refused = harness.get(FLUID, "demo") or {}
        assert kube.FINALIZER not in refused["metadata"].get("finalizers", [])
        assert "fileNum" not in refused["status"]  # the Shoal one's status is not shown on it
        assert [e for e in harness.server.objects("", "events")
                if e["involvedObject"]["name"] == "demo" and e["involvedObject"]["kind"] == "Dataset"
                and e["reason"] == "Invalid" and e["type"] == "Warning"]
        assert applies == [harness.handlers.published[_key(SHOAL)]]  # only the Shoal one's command

        await harness.handlers.custom.delete_namespaced_custom_object(FLUID.group, FLUID.version, "default",
                                                                      FLUID.plural, "demo")
        assert harness.get(FLUID, "demo") is None  # no finalizer held it
        await harness.handlers.on_event(FLUID, "DELETED", refused)
        assert deletes == []
        record = await dataset_record(bus, "demo")
        assert record is not None and record.dataset.spec.mounts[0].mount_point == source

        # Made again while the Shoal one holds the name: refused again; once that one is gone, it is Shoal's.
        again = await harness.create(FLUID, "demo", {"mounts": [{"mountPoint": files(tmp_path / "again", 2),
                                                                 "name": "f"}]})
        await harness.handlers.on_event(FLUID, "ADDED", again)
        assert _key(FLUID) in harness.handlers.invalid and len(applies) == 1
        await harness.handlers.on_event(SHOAL, "MODIFIED", await harness.delete(SHOAL, "demo"))
        await harness.until(lambda: harness.get(SHOAL, "demo") is None, what="the Shoal Dataset released")
        await harness.handlers.on_event(SHOAL, "DELETED", shoal)
        await harness.until(lambda: ((harness.get(FLUID, "demo") or {}).get("status") or {}).get("fileNum") == "2",
                            what="the Fluid Dataset served")
    await stop_applies()
    await stop_deletes()
    assert deletes == [f"k8s.dataset.{shoal['metadata']['uid']}.delete"]
    assert applies[-1].startswith(f"k8s.dataset.{again['metadata']['uid']}.")


async def test_a_secret_reference_dropped_by_a_spec_change_leaves_the_mirror(harness: Harness) -> None:
    """With the secret mirror: a Dataset edited from Secret creds-old to creds-new loses creds-old's key from the
    mirror Secret (before, it stayed until the Dataset was deleted), while a key it also dropped but another Dataset
    still names stays."""
    handlers = harness.handlers
    handlers.settings = dataclasses.replace(handlers.settings, kube=dataclasses.replace(
        handlers.settings.kube, secret_mirror=f"{kube.SYSTEM_NAMESPACE}/shoal-dataset-secrets"))
    for namespace, name in (("default", "creds-old"), ("default", "creds-new"), ("default", "shared"),
                            (kube.SYSTEM_NAMESPACE, "shoal-dataset-secrets")):
        data = {} if namespace == kube.SYSTEM_NAMESPACE else {"secret": name}
        await handlers.core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name), string_data=data))

    def spec(*secrets: str) -> dict[str, Any]:
        return {"mounts": [{"mountPoint": "s3://bucket", "encryptOptions": [
            {"name": f"aws.secretKey{i}", "valueFrom": {"secretKeyRef": {"name": secret, "key": "secret"}}}
            for i, secret in enumerate(secrets)]}]}

    def mirror() -> set[str]:
        stored = harness.server.stored("", "secrets", kube.SYSTEM_NAMESPACE, "shoal-dataset-secrets") or {}
        return set(stored.get("data") or {})

    await harness.first_lists()
    await handlers.on_object(SHOAL, await harness.create(SHOAL, "demo", spec("creds-old", "shared")))
    await handlers.on_object(SHOAL, await harness.create(SHOAL, "other", spec("shared")))
    assert mirror() == {"default.creds-old.secret", "default.shared.secret"}

    await handlers.custom.patch_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo", {"spec": spec("creds-new")},
        _content_type=MERGE)  # type: ignore[call-arg]
    await handlers.on_event(SHOAL, "MODIFIED", harness.get(SHOAL, "demo") or {})
    assert mirror() == {"default.creds-new.secret", "default.shared.secret"}
    assert "default.creds-old.secret" not in handlers.mirror_owners  # the name is free for another reference


async def test_another_controllers_finalizer_survives_the_bridges_finalizer_patches(harness: Harness) -> None:
    """The bridge's finalizer patch carries the whole list (a merge patch replaces a list), built from the object
    as the bridge last saw it. Another controller changes its finalizers after that read and before the bridge's
    patch: it adds one before the bridge adds Shoal's finalizer, and removes one (its clean-up done; nothing may be
    added once the object is being deleted) before the bridge removes Shoal's: the list stays as the other
    controller left it (before, the first was overwritten, and the second brought back). The patch carries the
    resourceVersion it was built from, the API server refuses it once the object changed (409; ``tests/kube.py``
    does as the apiserver), and the bridge reads the object again and retries."""
    handlers = harness.handlers
    await harness.first_lists()
    seen = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": "s3://bucket"}]})
    await _other_controller_adds(harness, "example.com/first")
    await handlers.on_event(SHOAL, "ADDED", seen)  # the bridge acts on the version it saw
    assert _key(SHOAL) not in handlers.pending
    assert (harness.get(SHOAL, "demo") or {})["metadata"]["finalizers"] == ["example.com/first", kube.FINALIZER]

    await _other_controller_adds(harness, "example.com/second")
    held = await harness.delete(SHOAL, "demo")
    await harness.handlers.custom.patch_namespaced_custom_object(  # the other controller lets go of its first
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo",
        [{"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/first"},
         {"op": "remove", "path": "/metadata/finalizers/0"}],
        _content_type="application/json-patch+json")  # type: ignore[call-arg]
    # No dataset service runs: Shoal holds no record, so the bridge lets go of the object at once.
    await handlers.on_event(SHOAL, "MODIFIED", held)
    assert _key(SHOAL) not in handlers.pending
    left = harness.get(SHOAL, "demo")
    assert left is not None, "the other controller's finalizer was dropped, and the object with it"
    assert left["metadata"]["finalizers"] == ["example.com/second"]
    bridge_patches = _finalizer_patches(harness)
    assert len(bridge_patches) == 4  # add and remove, each refused once and sent again
    assert all(patch["metadata"].get("resourceVersion") for patch in bridge_patches)


async def test_an_object_already_being_deleted_gets_no_finalizer_and_is_deleted_in_shoal(harness: Harness,
                                                                                         bus: Bus) -> None:
    """An object another controller's finalizer holds, deleted before the bridge first sees it: the API server adds
    no finalizer to an object being deleted (422, as ``tests/kube.py`` does), so the bridge sends none; it publishes
    the delete, once, and is done (before, it published nothing, and Shoal kept the record while the object
    lingered)."""
    deletes, stop = await collect(bus, subjects.DATASET_DELETE)
    await harness.first_lists()
    await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": "s3://bucket"}]})
    await _other_controller_adds(harness, "example.com/keep")
    held = await harness.delete(SHOAL, "demo")
    await harness.handlers.on_event(SHOAL, "ADDED", held)
    await harness.until(lambda: deletes, what="the delete command")
    await harness.handlers.tick()
    assert not harness.handlers.pending and not harness.handlers.failures
    assert (harness.get(SHOAL, "demo") or {})["metadata"]["finalizers"] == ["example.com/keep"]
    assert not _finalizer_patches(harness)
    await stop()
    assert deletes == [f"k8s.dataset.{held['metadata']['uid']}.delete"]


async def test_an_object_deleted_between_the_bridges_read_and_its_finalizer_patch_is_deleted_not_held(
        harness: Harness, bus: Bus) -> None:
    """The bridge acts on a version that is not being deleted; by its patch the object is (another controller's
    finalizer holds it). The patch is refused as stale (409) and the object read again: being deleted, it gets no
    finalizer (before, the bridge sent one, the API server answered 422, and every pass tried again) and no apply;
    its delete is published instead."""
    applies, stop_applies = await collect(bus, subjects.DATASET_APPLY)
    deletes, stop_deletes = await collect(bus, subjects.DATASET_DELETE)
    await harness.first_lists()
    seen = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": "s3://bucket"}]})
    await _other_controller_adds(harness, "example.com/keep")
    await harness.delete(SHOAL, "demo")
    await harness.handlers.on_event(SHOAL, "ADDED", seen)  # the watch has not shown the delete yet
    await harness.until(lambda: deletes, what="the delete command")
    assert not harness.handlers.pending and not harness.handlers.failures
    assert (harness.get(SHOAL, "demo") or {})["metadata"]["finalizers"] == ["example.com/keep"]
    assert len(_finalizer_patches(harness)) == 1  # the stale one, refused with 409; none after the read
    await stop_applies()
    await stop_deletes()
    assert applies == []
    assert deletes == [f"k8s.dataset.{seen['metadata']['uid']}.delete"]


def _finalizer_patches(harness: Harness) -> list[Any]:
    return [r.data for r in harness.server.recorded("PATCH", "/datasets/demo")
            if r.headers.get("Content-Type") == MERGE and not r.url.path.endswith("/status")]


async def _other_controller_adds(harness: Harness, finalizer: str) -> None:
    """Another controller adds its finalizer, as it should: a JSON patch appending to the list as it stands."""
    current = harness.get(SHOAL, "demo") or {}
    operation = ({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}
                 if current["metadata"].get("finalizers") else
                 {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
    await harness.handlers.custom.patch_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo", [operation],
        _content_type="application/json-patch+json")  # type: ignore[call-arg]


def _key(resource: kube.Resource) -> ObjectKey:
    return ObjectKey(resource, "default", "demo")


def _accepted(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Accepted"), None)


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize("cut", [".", "-"])
async def test_an_object_of_a_long_name_gets_its_events_and_does_not_hold_back_every_pass(
        harness: Harness, cut: str) -> None:
    """A Fluid Dataset (Fluid's own CRDs let a name be any DNS-1123 subdomain, up to 253 characters) whose name the
    Event name's cut (236 characters, then the digest) ends at a '.' or '-': the Event's name was no DNS-1123
    subdomain, which the API server refuses (422), so the object's Warning never showed and the refused create
    failed every pass, keeping every object's status behind the pass's back-off for as long as the object lived."""
    await harness.first_lists()
    name = "a" * 235 + cut + "b" * 10
    obj = await harness.create(FLUID, name, {"mounts": "not a list"})
    await harness.handlers.on_event(FLUID, "ADDED", obj)
    condition = await harness.until(lambda: _accepted(harness.get(FLUID, name)), what="the object refused")
    assert condition["reason"] == "Invalid"
    [event] = await harness.until(lambda: harness.server.objects("", "events"), what="its Warning Event")
    assert event["involvedObject"]["name"] == name and event["reason"] == "Invalid"
    await harness.handlers.tick()
    assert harness.handlers._tick_failures == 0  # the pass went through


async def test_an_object_too_large_for_a_nats_message_is_invalid_with_the_reason(harness: Harness, bus: Bus) -> None:
    """A Dataset of 6000 mounts (1.2 MB: the API server takes up to about 1.5 MB, a NATS message 1 MiB): its
    command cannot be published. It is Invalid with that reason, gets no finalizer and publishes nothing (before,
    the publish failed at every pass, for ever, with nothing on the object, and kept every pass in back-off)."""
    applies, stop = await collect(bus, subjects.DATASET_APPLY)
    await harness.first_lists()
    mounts = [{"mountPoint": f"s3://bucket/{'p' * 150}{i}", "name": f"m{i}"} for i in range(6000)]
    # Straight into the store: kubernetes-asyncio's aiohttp warns about a body this large (warnings are errors).
    huge = await harness.server._create(harness.server.kinds[(SHOAL.group, SHOAL.plural)], "default", {
        "apiVersion": SHOAL.api_version, "kind": SHOAL.kind, "metadata": {"name": "demo"}, "spec": {"mounts": mounts}})
    await harness.handlers.on_event(SHOAL, "ADDED", huge)
    condition = await harness.until(lambda: _accepted(harness.get(SHOAL, "demo")), what="the object refused")
    assert condition["reason"] == "Invalid" and "too large for Shoal" in condition["message"]
    stored = harness.get(SHOAL, "demo") or {}
    assert stored["status"]["phase"] == "Failed"
    assert kube.FINALIZER not in stored["metadata"].get("finalizers", [])
    assert not harness.handlers.pending and harness.handlers._tick_failures == 0
    await stop()
    assert applies == []


async def test_a_status_write_answered_409_is_retried_until_it_lands(harness: Harness, tmp_path: Path) -> None:
    """A status patch answered 409 Conflict (a write racing another): not one of the answers that drop a status
    (``STATUS_REFUSALS``), so the pass counts as failed and a later pass writes the same status once the conflict is
    gone; nothing is lost."""
    handlers = harness.handlers
    await harness.first_lists()
    harness.server.fail("PATCH", "/datasets/demo/status", 409)
    async with running(lambda halt: dataset_app.run(handlers.settings, halt)):
        obj = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "a")}]})
        await handlers.on_event(SHOAL, "ADDED", obj)
        await harness.until(lambda: len(harness.server.recorded("PATCH", "/datasets/demo/status")) >= 2,
                            what="the status write tried again after its 409")
        assert "status" not in (harness.get(SHOAL, "demo") or {}) and handlers._tick_failures > 0
        harness.server.heal()
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the status written once the conflict is gone")


@pytest.mark.parametrize("code", [404, 413, 422])
async def test_a_status_write_the_api_server_refuses_is_dropped_and_holds_back_no_other(
        harness: Harness, tmp_path: Path, code: int) -> None:
    """The status patch of one object answers 422 (the CRD's validation refuses it), 413 (too large: the request
    body's limit, or the object's in etcd, a status of thousands of nodes on a large spec) or 404 (deleted meanwhile):
    the same status would get the same answer, so it is sent once and dropped (422: with a Warning Event saying
    why); the pass does not count as failed, so the other objects' statuses are not held back by the back-off meant
    for an unavailable API server (before, every pass failed and waited up to 5 s, for ever)."""
    handlers = harness.handlers
    await harness.first_lists()
    harness.server.fail("PATCH", "/datasets/bad/status", code)

    def passes(count: int) -> Callable[[], bool]:
        """A probe true on its ``count``-th look (``harness.until`` looks once a pass)."""
        looks = 0

        def probe() -> bool:
            nonlocal looks
            looks += 1
            return looks >= count
        return probe

    async with running(lambda halt: dataset_app.run(handlers.settings, halt)):
        for name in ("bad", "good"):
            obj = await harness.create(SHOAL, name, {"mounts": [{"mountPoint": files(tmp_path / name)}]})
            await handlers.on_event(SHOAL, "ADDED", obj)
        await harness.until(lambda: ((harness.get(SHOAL, "good") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the other object's status")
        await harness.until(lambda: harness.server.recorded("PATCH", "/datasets/bad/status"),
                            what="the refused status write")
        # Each change of Shoal's status of "bad" (its sync moving on) is written once more; then nothing is, for
        # however many passes. Ten passes in a row without a write, within a few writes in all.
        for _ in range(4):
            writes = len(harness.server.recorded("PATCH", "/datasets/bad/status"))
            await harness.until(passes(10), what="ten more passes")
            if len(harness.server.recorded("PATCH", "/datasets/bad/status")) == writes:
                break
        else:
            raise AssertionError("the refused status is written again pass after pass")
    assert writes <= 3, f"{writes} status writes of the refused object"
    assert handlers._tick_failures == 0
    refused = [e for e in harness.server.objects("", "events") if e["reason"] == "StatusRefused"]
    if code in (413, 422):
        assert [e["involvedObject"]["name"] for e in refused] == ["bad"] and refused[0]["type"] == "Warning"
        assert "injected failure" in refused[0]["message"]
    else:
        assert refused == []


async def test_a_status_someone_else_overwrote_is_written_back(harness: Harness, tmp_path: Path) -> None:
    """Another writer changes the status the bridge wrote (kubectl patch --subresource=status, an old controller):
    the bridge writes Shoal's status back (before, it remembered having written it and never looked again)."""
    handlers = harness.handlers
    await harness.first_lists()
    async with running(lambda halt: dataset_app.run(handlers.settings, halt)):
        await handlers.on_event(SHOAL, "ADDED", await harness.create(
            SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "a")}]}))
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the status written")
        await handlers.custom.patch_namespaced_custom_object_status(
            SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo", {"status": {"phase": "Bound", "fileNum": 0}},
            _content_type=MERGE)  # type: ignore[call-arg]
        await handlers.on_event(SHOAL, "MODIFIED", harness.get(SHOAL, "demo") or {})
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="Shoal's status written back")
    assert (harness.get(SHOAL, "demo") or {})["status"]["phase"] == "NotBound"


async def test_a_status_due_for_an_object_made_again_under_its_name_is_not_written_to_the_new_one(
        harness: Harness) -> None:
    """A DataLoad's status is due (refused: Failed, saying why) when the object is deleted and made again under its
    name, before the watch shows either: the write names the old uid and is not applied to the new object (before,
    the API server found the object by name and the new one showed the old one's status). It is dropped quietly,
    not written again pass after pass and not taken for a refusal of the CRD's; once the watch brings the new
    object, it gets its own status."""
    handlers = harness.handlers
    await harness.first_lists()
    old = await harness.create(DATALOAD, "load", {"dataset": {"name": "demo"}, "policy": "Sometimes"})
    await handlers.on_event(DATALOAD, "ADDED", old)  # invalid: no finalizer, its status due at the next pass
    await handlers.custom.delete_namespaced_custom_object(DATALOAD.group, DATALOAD.version, "default",
                                                          DATALOAD.plural, "load")
    new = await harness.create(DATALOAD, "load", {"dataset": {"name": "demo"}, "policy": "Rarely"})
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    with structlog.testing.capture_logs() as logs:
        await handlers.tick()
    assert len(harness.server.recorded("PATCH", "/dataloads/load/status")) == 1  # the old object's write, tried
    assert "status" not in (harness.get(DATALOAD, "load") or {})
    assert [e for e in logs if e["log_level"] == "debug" and "made again" in e["event"]]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    later = itertools.count(time.time() + 10, 10)  # passes seconds apart: the refusal's time is not taken afresh
    handlers.clock = lambda: next(later)
    for _ in range(3):  # dropped: not sent again while the watch has not shown the new object
        await handlers.tick()
    assert len(harness.server.recorded("PATCH", "/dataloads/load/status")) == 1
    assert handlers._tick_failures == 0
    assert not [e for e in harness.server.objects("", "events") if e["reason"] == "StatusRefused"]

    await handlers.on_event(DATALOAD, "DELETED", old)
    await handlers.on_event(DATALOAD, "ADDED", new)
    condition = await harness.until(lambda: _accepted(harness.get(DATALOAD, "load")), what="the new one's status")
    assert "'Rarely'" in condition["message"] and "Sometimes" not in condition["message"]


async def test_a_refused_status_whose_object_cannot_be_read_back_is_tried_again(harness: Harness) -> None:
    """A status write answered 422 is followed by a read of the object (replaced under its name, or refused by the
    CRD's validation?); a read answered 500 is the write's failure: the pass counts it, nothing is dropped, and once
    the server answers the refusal is told as any (a StatusRefused Event)."""
    handlers = harness.handlers
    await harness.first_lists()
    obj = await harness.create(DATALOAD, "load", {"dataset": {"name": "demo"}, "policy": "Sometimes"})
    harness.server.fail("PATCH", "/dataloads/load/status", 422)
    harness.server.fail("GET", "/dataloads/load", 500)
    await handlers.on_event(DATALOAD, "ADDED", obj)  # invalid: its status due at the next pass
    await handlers.tick()
    assert handlers._tick_failures == 1  # a failed pass: the next one waits, then writes again
    assert not [e for e in harness.server.objects("", "events") if e["reason"] == "StatusRefused"]

    harness.server.heal()
    harness.server.fail("PATCH", "/dataloads/load/status", 422)
    refused = await harness.until(lambda: [e for e in harness.server.objects("", "events")
                                           if e["reason"] == "StatusRefused"], what="the refusal told")
    assert [e["involvedObject"]["name"] for e in refused] == ["load"]
    assert len(harness.server.recorded("GET", "/dataloads/load")) >= 2


async def test_a_refused_status_whose_object_reads_back_without_a_uid_is_told_not_dropped(
        harness: Harness) -> None:
    """A status write answered 422, and the object read back has no uid (an odd answer): that is no other object
    under the name, only another uid would be, so the refusal is the CRD's and is told (a StatusRefused Event).
    Before, an empty uid differed from the watch's and the refusal was dropped quietly as a replaced object's."""
    handlers = harness.handlers
    await harness.first_lists()
    obj = await harness.create(DATALOAD, "load", {"dataset": {"name": "demo"}, "policy": "Sometimes"})
    assert obj["metadata"]["uid"]
    del harness.server.store[(DATALOAD.group, DATALOAD.plural, "default", "load")]["metadata"]["uid"]
    harness.server.fail("PATCH", "/dataloads/load/status", 422)
    await handlers.on_event(DATALOAD, "ADDED", obj)  # invalid: its status due at the next pass

    refused = await harness.until(lambda: [e for e in harness.server.objects("", "events")
                                           if e["reason"] == "StatusRefused"], what="the refusal told")
    assert [e["involvedObject"]["name"] for e in refused] == ["load"]
    assert harness.server.recorded("GET", "/dataloads/load")  # read back: a uid test could have failed
    assert handlers._tick_failures == 0


async def test_access_modes_that_promise_writes_are_a_warning_of_their_own_not_ignored_fields(
        harness: Harness, tmp_path: Path) -> None:
    """A Fluid Dataset with ``accessModes: [ReadWriteMany]`` is accepted and mounted read-only: the bridge said so
    in its ``FieldsIgnored`` Event, though the field is used (the volume and claim carry it), so a user filtering
    Events by reason got the wrong story. It is a Warning Event of its own, under the reason of the ReadOnly
    condition the dataset service sets; the fields Shoal does ignore keep their Normal ``FieldsIgnored`` Event."""
    await harness.first_lists()
    async with running(lambda halt: dataset_app.run(harness.handlers.settings, halt)):
        await harness.handlers.on_event(FLUID, "ADDED", await harness.create(FLUID, "demo", {
            "mounts": [{"mountPoint": files(tmp_path / "data"), "name": "d"}], "accessModes": ["ReadWriteMany"],
            "nodeAffinityIgnored": {"x": 1}}))
        events = {e["reason"]: e for e in harness.server.objects("", "events")
                  if e["involvedObject"]["name"] == "demo" and e["involvedObject"]["kind"] == "Dataset"}
        assert set(events) == {"FieldsIgnored", "WritesNotServed"}, events
        ignored, read_only = events["FieldsIgnored"], events["WritesNotServed"]
        assert ignored["type"] == "Normal" and "nodeAffinityIgnored" in ignored["message"], ignored
        assert "accessModes" not in ignored["message"], ignored
        assert read_only["type"] == "Warning", read_only
        assert read_only["message"] == ("Dataset/spec.accessModes: ReadWriteMany is accepted, but Shoal mounts "
                                        "datasets read-only: a write gets EROFS (read-only file system)")

        def condition() -> dict[str, Any] | None:
            conditions = ((harness.get(FLUID, "demo") or {}).get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c.get("type") == "ReadOnly"), None)

        said = await harness.until(condition, what="the dataset's ReadOnly condition")
        assert (said["status"], said["reason"]) == ("True", read_only["reason"]), said


async def test_an_unanswered_fields_ignored_event_leaves_the_next_objects_to_the_next_pass(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Event listing what Shoal ignores of an object is best effort, but its call waiting out the timeout tells
    the same as any other: the API server is not answering. The next object a watch brings waits for the next pass
    (before: it made calls of its own, each waiting as long)."""
    handlers = harness.handlers
    monkeypatch.setattr(bridge_handlers, "REQUEST_TIMEOUT_SECONDS", 0.5)
    await harness.first_lists()
    harness.server.hang("POST", "/events")
    await handlers.on_event(FLUID, "ADDED", await harness.create(
        FLUID, "noted", {"mounts": [{"mountPoint": "s3://b"}], "nodeAffinityIgnored": {"x": 1}}))
    assert harness.server.recorded("POST", "/events")  # the note's Event was tried, and not answered
    patches = len(harness.server.recorded("PATCH"))
    await handlers.on_event(SHOAL, "ADDED", await harness.create(SHOAL, "next", {"mounts": [{"mountPoint": "s3://c"}]}))
    assert len(harness.server.recorded("PATCH")) == patches and ObjectKey(SHOAL, "default", "next") in handlers.pending


async def test_a_pass_over_an_api_server_that_does_not_answer_ends_at_its_first_call(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server takes connections and answers no patch: the pass waits out the first status write's timeout
    and ends there, saying the API server is not answering, instead of waiting out one timeout per object (before:
    four objects, four timeouts in a row, the handlers' lock held throughout). Until the next pass, an object a
    watch brings waits for it (pending) rather than for a timeout of its own. Once the server answers, everything
    is written."""
    handlers = harness.handlers
    monkeypatch.setattr(bridge_handlers, "REQUEST_TIMEOUT_SECONDS", 0.5)  # the client's limit, not what is tested
    await harness.first_lists()
    names = [f"load{i}" for i in range(4)]
    for name in names:  # invalid in the bridge (no such policy): a status to write, and nothing before it
        await handlers.on_event(DATALOAD, "ADDED", await harness.create(
            DATALOAD, name, {"dataset": {"name": "demo"}, "policy": "Sometimes"}))
    harness.server.hang("PATCH", "")
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(handlers.tick(), 30)
    assert len(harness.server.recorded("PATCH", "/status")) == 1
    assert [e for e in logs if e["event"].startswith("not answering") and "API server" in e["reason"]]
    await handlers.on_event(SHOAL, "ADDED", await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": "s3://b"}]}))
    assert not harness.server.recorded("PATCH", "/datasets/demo") and _key(SHOAL) in handlers.pending

    harness.server.heal()
    await harness.until(lambda: all(((harness.get(DATALOAD, name) or {}).get("status") or {}).get("phase") == "Failed"
                                    for name in names), what="every status written")
    assert kube.FINALIZER in (harness.get(SHOAL, "demo") or {})["metadata"]["finalizers"]


@pytest.mark.parametrize("fault", ["500", "hang"])
async def test_a_dataset_gone_without_the_finalizer_has_its_keys_removed_once_the_api_server_answers(
        harness: Harness, bus: Bus, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """A Dataset's finalizer is removed by hand and the Dataset deleted: the bridge sees it gone (DELETED) and must
    still delete it in Shoal and remove its key from the secret mirror, while the API server answers that Secret's
    read with 500, or not at all. The delete command goes out at once; the key's removal is retried with back-off,
    the reason logged once, and done once the API server answers; other objects are handled meanwhile (before:
    the error was swallowed and the Secret's value stayed in the mirror for ever)."""
    handlers = harness.handlers
    monkeypatch.setattr(bridge_handlers, "REQUEST_TIMEOUT_SECONDS", 0.5)  # the client's limit, not what is tested
    handlers.settings = dataclasses.replace(handlers.settings, kube=dataclasses.replace(
        handlers.settings.kube, secret_mirror=f"{kube.SYSTEM_NAMESPACE}/shoal-dataset-secrets"))
    await handlers.core.create_namespaced_secret("default", client.V1Secret(
        metadata=client.V1ObjectMeta(name="creds"), string_data={"secret": "value"}))
    await handlers.core.create_namespaced_secret(kube.SYSTEM_NAMESPACE, client.V1Secret(
        metadata=client.V1ObjectMeta(name="shoal-dataset-secrets")))
    mirror_path = f"/namespaces/{kube.SYSTEM_NAMESPACE}/secrets/shoal-dataset-secrets"

    def mirror() -> set[str]:
        stored = harness.server.stored("", "secrets", kube.SYSTEM_NAMESPACE, "shoal-dataset-secrets") or {}
        return set(stored.get("data") or {})

    deletes, stop = await collect(bus, subjects.DATASET_DELETE)
    await harness.first_lists()
    created = await harness.create(SHOAL, "gone", {"mounts": [{"mountPoint": "s3://bucket", "encryptOptions": [
        {"name": "aws.secretKey", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}}]}]})
    await handlers.on_event(SHOAL, "ADDED", created)
    assert mirror() == {"default.creds.secret"}
    await handlers.custom.patch_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "gone", {"metadata": {"finalizers": []}},
        _content_type=MERGE)  # type: ignore[call-arg]
    last = harness.get(SHOAL, "gone") or {}
    await handlers.custom.delete_namespaced_custom_object(SHOAL.group, SHOAL.version, "default", SHOAL.plural, "gone")
    assert harness.get(SHOAL, "gone") is None

    if fault == "500":
        harness.server.fail("GET", mirror_path, 500)
    else:
        harness.server.hang("GET", mirror_path)
    with structlog.testing.capture_logs() as logs:
        await handlers.on_event(SHOAL, "DELETED", last)
        await bus.nc.flush()
        assert deletes == [f"k8s.dataset.{created['metadata']['uid']}.delete"]
        await handlers.on_event(SHOAL, "ADDED", await harness.create(SHOAL, "other", {"mounts": [
            {"mountPoint": "s3://other"}]}))
        await harness.until(lambda: kube.FINALIZER in ((harness.get(SHOAL, "other") or {}).get("metadata") or {})
                            .get("finalizers", []), what="another object handled meanwhile")
        await harness.until(lambda: len(harness.server.recorded("GET", mirror_path)) >= 4, what="retries")
        assert mirror() == {"default.creds.secret"}
        harness.server.heal()
        await harness.until(lambda: not mirror(), what="the key removed once the API server answers")
    await stop()
    assert deletes == [f"k8s.dataset.{created['metadata']['uid']}.delete"]  # sent once, not at every retry
    assert handlers.gone == {}
    warned = [e for e in logs if e.get("object") == "Dataset.shoal.io default/gone" and e["log_level"] == "warning"]
    assert len(warned) == 1, warned
    assert ("HTTP 500" if fault == "500" else "TimeoutError") in warned[0]["error"]
    assert [e for e in logs if e.get("object") == "Dataset.shoal.io default/gone" and "after retries" in e["event"]]


async def test_a_relist_answered_404_deletes_nothing_the_bridge_knows(harness: Harness, bus: Bus,
                                                                      tmp_path: Path) -> None:
    """A running bridge re-lists Datasets and the API server answers 404 (the watcher hands over an empty list
    marked not served): before, every Dataset it knew counted as deleted, a delete each. Now nothing is."""
    deletes, stop = await collect(bus, subjects.DATASET_DELETE)
    await harness.first_lists()
    obj = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "a")}]})
    await harness.handlers.on_listing(SHOAL, None, [obj])
    await harness.until(lambda: kube.FINALIZER in (harness.get(SHOAL, "demo") or {})["metadata"].get("finalizers",
                                                                                                    []),
                        what="the Dataset taken in")
    await harness.handlers.on_listing(SHOAL, None, [], served=False)
    await harness.handlers.tick()
    await harness.handlers.on_listing(SHOAL, None, [obj])  # served again: the same object, nothing to do
    await harness.handlers.tick()
    await stop()
    assert deletes == []
    assert any(key.name == "demo" for key in harness.handlers.objects)


async def test_objects_made_refused_and_deleted_again_and_again_leave_nothing_behind(harness: Harness,
                                                                                     tmp_path: Path) -> None:
    """Churn: Datasets made, refused by Shoal (a rejection fact, its Warning Event recorded) and deleted, over and
    over. Before, the rejections by command id and the names of the Events recorded stayed for ever, an entry per
    object that ever lived; a rejection whose fact came after its object's delete stays too. Now none is left."""
    handlers = harness.handlers
    await harness.first_lists()
    mount = files(tmp_path / "a")
    for index in range(CHURN):
        name = f"ds-{index}"
        obj = await harness.create(SHOAL, name, {"mounts": [{"mountPoint": mount}]})
        await handlers.on_event(SHOAL, "ADDED", obj)
        key = ObjectKey(SHOAL, "default", name)

        async def applied(key: ObjectKey = key) -> str | None:
            return handlers.published.get(key)

        command_id = await eventually(applied, what="the apply")
        await handlers.on_rejection(RejectionFact(causation_id=command_id, reason="no"), sequence=index + 1)
        before = len(handlers.recorded_events)

        def recorded(before: int = before) -> bool:
            return len(handlers.recorded_events) > before

        await harness.until(recorded, what="the refusal's Event")
        await handlers.on_event(SHOAL, "DELETED", harness.get(SHOAL, name) or obj)
        if index == CHURN - 1:  # its fact comes after its delete
            await handlers.on_rejection(RejectionFact(causation_id=command_id + ".late", reason="no"),
                                        sequence=index + 2)
    await handlers.tick()
    assert handlers.rejections == {} and handlers.rejection_sequences == {} and handlers.unrecorded == set()
    assert len(handlers.recorded_events) == 0, f"{len(handlers.recorded_events)} Events remembered"
    assert handlers.objects == {}


CHURN = 20


async def deleted_by_hand_and_made_again(harness: Harness, tmp_path: Path) -> ObjectKey:
    """Dataset ``demo`` made and Bound (3 files) while the dataset service runs; then, with the service down, its
    finalizer removed by hand, the Dataset deleted and made again under its name (2 files): the old delete and the
    new apply are published, and Shoal's record is still the old object's."""
    handlers = harness.handlers
    await harness.first_lists()
    async with running(lambda halt: dataset_app.run(handlers.settings, halt)):
        old = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "a")}]})
        await handlers.on_event(SHOAL, "ADDED", old)
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 3,
                            what="the old object's status")
    await handlers.custom.patch_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo", {"metadata": {"finalizers": []}},
        _content_type=MERGE)  # type: ignore[call-arg]
    last = harness.get(SHOAL, "demo") or {}
    await handlers.custom.delete_namespaced_custom_object(SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo")
    await handlers.on_event(SHOAL, "DELETED", last)
    new = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": files(tmp_path / "b", 2)}]})
    await handlers.on_event(SHOAL, "ADDED", new)
    key = ObjectKey(SHOAL, "default", "demo")
    assert key in handlers.published and not handlers.gone  # the old delete and the new apply are out
    return key


async def test_the_deleted_objects_record_is_not_shown_on_the_object_made_again_under_its_name(
        harness: Harness, bus: Bus, tmp_path: Path) -> None:
    """A Dataset's finalizer is removed by hand and the Dataset deleted, then made again under its name (a new uid)
    while the dataset service is down (restarting, or behind): the old object's delete and the new one's apply are
    published, but Shoal's record is still the old object's. Its status (Bound, its files) is not the new object's
    and is not written on it (before, the new object showed the old one's phase and file count, and got a volume
    for it), nor is a volume made; once the service takes in the delete and the apply, the new object shows its
    own status."""
    handlers = harness.handlers
    key = await deleted_by_hand_and_made_again(harness, tmp_path)
    assert handlers.mirrors.status_of(key) is not None  # the old record, not deleted yet

    for _ in range(3):
        await handlers.tick()
    assert "status" not in (harness.get(SHOAL, "demo") or {}), harness.get(SHOAL, "demo")
    assert key not in handlers.volumes

    async with running(lambda halt: dataset_app.run(handlers.settings, halt)):
        await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 2,
                            what="the new object's own status")


async def test_a_restarted_bridge_does_not_show_the_deleted_objects_record_on_the_object_made_again(
        harness: Harness, bus: Bus, tmp_path: Path) -> None:
    """As above, and the bridge restarts after the old object's delete and the new one's apply are out, while the
    dataset service has taken in neither: the new process publishes nothing (the new object's apply is in the
    bridge's bucket) and must still tell that Shoal's record is the deleted object's (before, what said so was in
    the old process's memory only, and the restarted bridge wrote the deleted object's phase and file count on the
    new one, and made its volume)."""
    applied = KvMirror(await bus.kv(subjects.KV_BRIDGE_APPLIED), Applied)
    task = asyncio.create_task(applied.run())
    try:
        await applied.ready.wait()
        handlers = dataclasses.replace(harness.handlers, applied=applied)
        harness = dataclasses.replace(harness, handlers=handlers)
        key = await deleted_by_hand_and_made_again(harness, tmp_path)

        # The restart: a new process, with nothing but the bucket and the API server.
        restarted = BridgeHandlers(bus, handlers.api, handlers.settings, handlers.mirrors, applied=applied)
        harness = dataclasses.replace(harness, handlers=restarted)
        applies, stop = await collect(bus, subjects.DATASET_APPLY)
        for resource in kube.RESOURCES:
            await restarted.on_listing(resource, None, [harness.get(SHOAL, "demo") or {}] if resource == SHOAL else [])
        assert restarted.mirrors.status_of(key) is not None  # the old record, not deleted yet
        for _ in range(3):
            await restarted.tick()
        await stop()
        assert applies == []  # the new object's apply was out before the restart
        assert "status" not in (harness.get(SHOAL, "demo") or {}), harness.get(SHOAL, "demo")
        assert key not in restarted.volumes

        async with running(lambda halt: dataset_app.run(restarted.settings, halt)):
            await harness.until(lambda: ((harness.get(SHOAL, "demo") or {}).get("status") or {}).get("fileNum") == 2,
                                what="the new object's own status")
    finally:
        applied.stop()
        await task


def _encrypted(*refs: tuple[str, str]) -> dict[str, Any]:
    """A Dataset spec whose one mount names these (Secret, key) references."""
    return {"mounts": [{"mountPoint": "s3://bucket", "encryptOptions": [
        {"name": f"aws.secretKey{i}", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
        for i, (name, key) in enumerate(refs)]}]}


def _handed(harness: Harness, mirror: bool, secret: str, key: str) -> str | None:
    """The value of Secret ``default/<secret>``'s ``key`` as the services get it (mirror or files), or None."""
    if mirror:
        stored = harness.server.stored("", "secrets", kube.SYSTEM_NAMESPACE, "shoal-dataset-secrets") or {}
        value = (stored.get("data") or {}).get(f"default.{secret}.{key}")
        return None if value is None else base64.b64decode(value).decode()
    path = Path(harness.handlers.settings.s3.secrets_dir) / f"default.{secret}" / key
    return path.read_text() if path.exists() else None


async def with_secret_mirror(handlers: BridgeHandlers) -> None:
    """The bridge hands Secrets' values over through the mirror Secret (made here), not as files."""
    handlers.settings = dataclasses.replace(handlers.settings, kube=dataclasses.replace(
        handlers.settings.kube, secret_mirror=f"{kube.SYSTEM_NAMESPACE}/shoal-dataset-secrets"))
    await handlers.core.create_namespaced_secret(kube.SYSTEM_NAMESPACE, client.V1Secret(
        metadata=client.V1ObjectMeta(name="shoal-dataset-secrets")))


@pytest.mark.parametrize("mode", ["mirror", "files"])
async def test_a_dataset_edited_to_name_a_missing_secret_keeps_following_its_running_specs_secrets(
        harness: Harness, mode: str) -> None:
    """A Dataset accepted with Secret creds, then edited to name Secret absent too: the edit is Invalid (the reason
    on the object), Shoal keeps running the last valid spec, and that spec's values stay handed over and follow a
    rotation of creds at the next re-list (before, nothing was handed over while the edit was invalid: the running
    dataset kept the old value until the user fixed the edit)."""
    handlers = harness.handlers
    if mode == "mirror":
        await with_secret_mirror(handlers)
    await handlers.core.create_namespaced_secret("default", client.V1Secret(
        metadata=client.V1ObjectMeta(name="creds"), string_data={"secret": "first"}))
    await harness.first_lists()
    await handlers.on_object(SHOAL, await harness.create(SHOAL, "demo", _encrypted(("creds", "secret"))))
    published = handlers.published[_key(SHOAL)]
    assert _handed(harness, mode == "mirror", "creds", "secret") == "first"

    await handlers.custom.patch_namespaced_custom_object(
        SHOAL.group, SHOAL.version, "default", SHOAL.plural, "demo",
        {"spec": _encrypted(("creds", "secret"), ("absent", "id"))}, _content_type=MERGE)  # type: ignore[call-arg]
    await handlers.on_event(SHOAL, "MODIFIED", harness.get(SHOAL, "demo") or {})
    condition = await harness.until(lambda: _accepted(harness.get(SHOAL, "demo")), what="the edit refused")
    assert condition["reason"] == "Invalid" and "Secret default/absent not found" in condition["message"]
    assert handlers.published[_key(SHOAL)] == published  # Shoal runs the last valid spec

    await handlers.core.patch_namespaced_secret(
        "creds", "default", {"data": {"secret": base64.b64encode(b"rotated").decode()}},
        _content_type=MERGE)  # type: ignore[call-arg]
    await handlers.on_listing(SHOAL, None, [harness.get(SHOAL, "demo") or {}])  # a re-list reads Secrets again
    assert _handed(harness, mode == "mirror", "creds", "secret") == "rotated"
    assert _handed(harness, mode == "mirror", "absent", "id") is None
    assert _key(SHOAL) in handlers.invalid


@pytest.mark.parametrize("mode", ["mirror", "files"])
async def test_two_secrets_spelt_alike_once_flattened_are_refused_in_either_mode(harness: Harness, mode: str) -> None:
    """Secret ``a.b`` key ``c`` and Secret ``a`` key ``b.c`` are both handed over as ``default.a.b.c``: the second
    Dataset naming one is Invalid with that reason, with the mirror and without it (before, the files mode took
    both: the key's removal could not tell whose value a file held). Once the first Dataset goes, the name is
    free and the second is taken at its next handling."""
    handlers = harness.handlers
    if mode == "mirror":
        await with_secret_mirror(handlers)
    for name, key in (("a.b", "c"), ("a", "b.c")):
        await handlers.core.create_namespaced_secret("default", client.V1Secret(
            metadata=client.V1ObjectMeta(name=name), string_data={key: name}))
    await harness.first_lists()
    await handlers.on_object(SHOAL, await harness.create(SHOAL, "one", _encrypted(("a.b", "c"))))
    await handlers.on_object(SHOAL, await harness.create(SHOAL, "two", _encrypted(("a", "b.c"))))
    assert ObjectKey(SHOAL, "default", "one") in handlers.published
    reason = handlers.invalid[ObjectKey(SHOAL, "default", "two")]
    assert "default.a.b.c" in reason and "Secret default/a.b key 'c'" in reason
    assert _handed(harness, mode == "mirror", "a.b", "c") == "a.b"  # the mirror's one key holds the first's value
    assert mode == "mirror" or _handed(harness, False, "a", "b.c") is None

    deleted = await harness.delete(SHOAL, "one")
    await handlers.on_event(SHOAL, "MODIFIED", deleted)
    await harness.until(lambda: harness.get(SHOAL, "one") is None, what="the first Dataset released")
    await handlers.on_event(SHOAL, "DELETED", deleted)
    await handlers.on_listing(SHOAL, None, [harness.get(SHOAL, "two") or {}])
    assert ObjectKey(SHOAL, "default", "two") in handlers.published
    assert _handed(harness, mode == "mirror", "a", "b.c") == "a"


async def test_an_event_the_api_server_refuses_is_logged_and_holds_back_no_status(harness: Harness) -> None:
    """Every Event create answered 422 (the API server refuses it: any validation of the Event's fields): an
    Event only informs, so the refusal is logged once with the server's reason, and the pass neither fails nor
    tries the Event again (before, every pass failed on the Event, retried it for ever, and the next pass, with every
    object's status, waited out the back-off meant for an API server that is down)."""
    handlers = harness.handlers
    await harness.first_lists()
    harness.server.fail("POST", "/events", 422)
    with structlog.testing.capture_logs() as logs:
        await handlers.on_event(DATALOAD, "ADDED", await harness.create(
            DATALOAD, "load", {"dataset": {"name": "demo"}, "policy": "Sometimes"}))
        await handlers.tick()
        assert handlers._tick_failures == 0
        assert ((harness.get(DATALOAD, "load") or {}).get("status") or {}).get("phase") == "Failed"
        for _ in range(3):
            await handlers.tick()
    assert handlers._tick_failures == 0
    assert len(harness.server.recorded("POST", "/events")) == 1  # the same Event is refused again: not retried
    [refused] = [e for e in logs if e["event"].startswith("event refused")]
    assert refused["log_level"] == "warning" and "injected failure" in refused["message"]
    assert refused["reason"] == "Invalid" and refused["object"] == "DataLoad.shoal.io default/load"


async def test_an_object_waiting_for_its_family_is_handled_when_a_rival_kind_is_found_not_installed(
        harness: Harness, bus: Bus) -> None:
    """After a start, a Shoal Dataset new to Shoal waits until every Dataset kind was listed (a rival may hold its
    name). Fluid's Dataset CRD is not installed: its list answers 404 after the Shoal list, and counts as listed, so
    the Shoal Dataset is applied then (before, it waited for its next event or its own kind's next list, up to
    SHOAL_KUBE_WATCH_SECONDS: five minutes of a new bridge ignoring its Datasets in a cluster without Fluid)."""
    applies, stop = await collect(bus, subjects.DATASET_APPLY)
    await harness.first_lists(SHOAL, FLUID)
    obj = await harness.create(SHOAL, "demo", {"mounts": [{"mountPoint": "s3://bucket"}]})
    await harness.handlers.on_listing(SHOAL, None, [obj])
    assert _key(SHOAL) in harness.handlers.waiting
    await harness.handlers.on_listing(FLUID, None, [], served=False)
    await bus.nc.flush()
    await stop()
    assert _key(SHOAL) not in harness.handlers.waiting
    assert applies == [harness.handlers.published[_key(SHOAL)]]
