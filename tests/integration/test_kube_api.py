"""The test API server (``tests/kube.py``) through kubernetes-asyncio: the gaps of kmock 0.8 it closes stay closed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from kmock import Server
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from libs import kube
from tests.kube import FakeApiServer

DATASETS = kube.SHOAL_RESOURCES[0]
MERGE = "application/merge-patch+json"


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, client.CustomObjectsApi]]:
    async with FakeApiServer() as server, Server(server) as http, \
            client.ApiClient(client.Configuration(host=str(http.url).rstrip("/"))) as api_client:
        yield server, client.CustomObjectsApi(api_client)


def dataset(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": DATASETS.api_version, "kind": DATASETS.kind, "metadata": {"name": name}, "spec": spec}


async def create(custom: client.CustomObjectsApi, body: dict[str, Any], namespace: str = "default") -> Any:
    r = DATASETS
    return await custom.create_namespaced_custom_object(r.group, r.version, namespace, r.plural, body)


async def patch(custom: client.CustomObjectsApi, name: str, body: Any, status: bool = False,
                content_type: str = MERGE) -> Any:
    r = DATASETS
    call = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    return await call(r.group, r.version, "default", r.plural, name, body,
                      _content_type=content_type)  # type: ignore[call-arg]


async def events(custom: client.CustomObjectsApi, version: str, count: int = 1) -> list[dict[str, Any]]:
    """The first ``count`` events of a watch from ``version``."""
    r = DATASETS
    seen = []
    stream = watch.Watch()
    async for event in stream.stream(custom.list_cluster_custom_object, r.group, r.version, r.plural,
                                     resource_version=version, allow_watch_bookmarks=True, timeout_seconds=30):
        seen.append(event)
        if len(seen) == count:
            break
    await stream.close()
    return seen


async def test_create_fills_metadata_and_lists_carry_kind(api: tuple[FakeApiServer, Any]) -> None:
    _, custom = api
    created = await create(custom, dataset("a", x=1), namespace="team")
    meta = created["metadata"]
    assert meta["namespace"] == "team" and meta["uid"] and meta["generation"] == 1
    assert meta["resourceVersion"] and meta["creationTimestamp"]
    listing = await custom.list_cluster_custom_object(DATASETS.group, DATASETS.version, DATASETS.plural)
    assert listing["kind"] == "DatasetList" and listing["apiVersion"] == DATASETS.api_version
    assert listing["metadata"]["resourceVersion"] == meta["resourceVersion"]
    with pytest.raises(ApiException) as conflict:
        await create(custom, dataset("a"), namespace="team")
    assert conflict.value.status == 409


async def test_a_name_the_api_server_refuses_is_refused(api: tuple[FakeApiServer, Any]) -> None:
    """kmock takes any name; the apiserver takes DNS-1123 subdomains of at most 253 characters only (422)."""
    server, custom = api
    for name in ("Upper", "under_score", "a..b", "-a", "a" * 254):
        with pytest.raises(ApiException) as refused:
            await create(custom, dataset(name))
        assert refused.value.status == 422 and "RFC 1123 subdomain" in str(refused.value.body)
    for name in ("a" * 63, "a.b", "a" * 253):
        await create(custom, dataset(name))
    assert len(server.objects(DATASETS.group, DATASETS.plural)) == 3


async def test_watch_resumes_from_a_version_and_expires(api: tuple[FakeApiServer, Any]) -> None:
    server, custom = api
    first = await create(custom, dataset("a"))
    await create(custom, dataset("b"))
    seen = await events(custom, first["metadata"]["resourceVersion"])
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in seen] == [("ADDED", "b")]
    await server.expire()
    with pytest.raises(ApiException) as gone:
        await events(custom, first["metadata"]["resourceVersion"])
    assert gone.value.status == 410


async def test_status_is_a_subresource_and_generation_follows_spec(api: tuple[FakeApiServer, Any]) -> None:
    server, custom = api
    await create(custom, dataset("a", x=1))
    after = await patch(custom, "a", {"spec": {"x": 2}, "status": {"phase": "Bound"}}, status=True)
    assert after["spec"] == {"x": 1} and after["status"] == {"phase": "Bound"}
    after = await patch(custom, "a", {"spec": {"x": 2}, "status": {"phase": "Failed"}})
    assert after["spec"] == {"x": 2} and after["status"] == {"phase": "Bound"}
    assert after["metadata"]["generation"] == 2
    after = await patch(custom, "a", {"metadata": {"labels": {"k": "v"}}})
    assert after["metadata"]["generation"] == 2  # metadata is not the spec
    after = await patch(custom, "a", [{"op": "replace", "path": "/spec/x", "value": 3}],
                        content_type="application/json-patch+json")
    assert after["spec"] == {"x": 3}
    assert [r.headers["Content-Type"] for r in server.recorded("PATCH")].count(MERGE) == 3


async def test_finalizers_hold_a_delete(api: tuple[FakeApiServer, Any]) -> None:
    server, custom = api
    r = DATASETS
    await create(custom, {**dataset("a"), "metadata": {"name": "a", "finalizers": ["x/y"]}})
    await custom.delete_namespaced_custom_object(r.group, r.version, "default", r.plural, "a")
    held = server.stored(r.group, r.plural, "default", "a")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    version = held["metadata"]["resourceVersion"]
    await patch(custom, "a", {"metadata": {"finalizers": []}})
    assert server.stored(r.group, r.plural, "default", "a") is None
    assert [e["type"] for e in await events(custom, version)] == ["DELETED"]


async def test_a_delete_with_a_uid_precondition_spares_another_object(api: tuple[FakeApiServer, Any]) -> None:
    """As the apiserver: a delete whose precondition names another uid is 409 Conflict and deletes nothing."""
    server, custom = api
    r = DATASETS
    created = await create(custom, dataset("a"))
    with pytest.raises(ApiException) as refused:
        await custom.delete_namespaced_custom_object(r.group, r.version, "default", r.plural, "a",
                                                     body={"preconditions": {"uid": "someone-else"}})
    assert refused.value.status == 409 and server.stored(r.group, r.plural, "default", "a") is not None
    await custom.delete_namespaced_custom_object(r.group, r.version, "default", r.plural, "a",
                                                 body={"preconditions": {"uid": created["metadata"]["uid"]}})
    assert server.stored(r.group, r.plural, "default", "a") is None


async def test_a_deleted_namespace_deletes_its_objects_and_refuses_new_ones(
        api: tuple[FakeApiServer, Any]) -> None:
    server, custom = api
    r = DATASETS
    await create(custom, {**dataset("held"), "metadata": {"name": "held", "finalizers": ["x/y"]}}, namespace="team")
    await create(custom, dataset("free"), namespace="team")
    await create(custom, dataset("elsewhere"))
    await server.delete_namespace("team")
    assert server.stored(r.group, r.plural, "team", "free") is None
    held = server.stored(r.group, r.plural, "team", "held")
    assert held is not None and held["metadata"]["deletionTimestamp"] and not server.namespace_empty("team")
    assert server.stored(r.group, r.plural, "default", "elsewhere") is not None
    with pytest.raises(ApiException) as refused:
        await create(custom, dataset("late"), namespace="team")
    assert refused.value.status == 403 and "being terminated" in str(refused.value.body)
    await custom.patch_namespaced_custom_object(r.group, r.version, "team", r.plural, "held",
                                                {"metadata": {"finalizers": []}},
                                                _content_type=MERGE)
    assert server.namespace_empty("team")


async def test_faults_end_watches_and_fail_requests(api: tuple[FakeApiServer, Any]) -> None:
    server, custom = api
    created = await create(custom, dataset("a"))
    await server.bookmark()  # before the watch: not seen by it
    server.failing = 503
    with pytest.raises(ApiException) as failed:
        await create(custom, dataset("b"))
    assert failed.value.status == 503
    server.failing = None
    await create(custom, dataset("c"))
    stream = watch.Watch()
    seen = []
    async for event in stream.stream(custom.list_cluster_custom_object, DATASETS.group, DATASETS.version,
                                     DATASETS.plural, resource_version=created["metadata"]["resourceVersion"],
                                     allow_watch_bookmarks=True, timeout_seconds=30):
        seen.append(event["type"])
        if len(seen) == 1:
            await server.bookmark()
        elif len(seen) == 2:
            await server.end_watches()
            await create(custom, dataset("d"))  # after the end: a watch still open would deliver it
    await stream.close()
    assert seen == ["ADDED", "BOOKMARK"]


async def test_fail_answers_one_path_only_until_healed(api: tuple[FakeApiServer, Any]) -> None:
    """``fail``: the chosen status for one method and path suffix (one object's status), the rest served."""
    server, custom = api
    await create(custom, dataset("a"))
    await create(custom, dataset("b"))
    server.fail("PATCH", "/datasets/a/status", 422)
    with pytest.raises(ApiException) as refused:
        await patch(custom, "a", {"status": {"phase": "X"}}, status=True)
    assert refused.value.status == 422 and "Invalid" in str(refused.value.body)
    await patch(custom, "a", {"metadata": {"labels": {"x": "y"}}})  # the object itself: served
    await patch(custom, "b", {"status": {"phase": "X"}}, status=True)
    server.heal()
    assert (await patch(custom, "a", {"status": {"phase": "X"}}, status=True))["status"] == {"phase": "X"}


async def test_hang_answers_nothing_to_one_path_until_healed(api: tuple[FakeApiServer, Any]) -> None:
    """``hang``: requests of one method and path suffix get no answer (the client gives up on its own timeout), the
    rest are served; ``heal`` serves them again."""
    server, custom = api
    await create(custom, dataset("a"))
    server.hang("PATCH", "/status")
    with pytest.raises(TimeoutError):
        await custom.patch_namespaced_custom_object_status(
            DATASETS.group, DATASETS.version, "default", DATASETS.plural, "a", {"status": {"phase": "X"}},
            _content_type=MERGE, _request_timeout=0.5)
    assert len(server.recorded("PATCH", "/datasets/a/status")) == 1  # it came, and was never answered
    await patch(custom, "a", {"metadata": {"labels": {"x": "y"}}})  # the object itself: served
    server.heal()
    assert (await patch(custom, "a", {"status": {"phase": "X"}}, status=True))["status"] == {"phase": "X"}


async def test_a_patch_from_an_older_resource_version_is_a_conflict(api: tuple[FakeApiServer, Any]) -> None:
    """As the apiserver: a patch carrying ``metadata.resourceVersion`` applies only to that version (409 Conflict
    and no change otherwise); a patch without one applies to what is stored."""
    server, custom = api
    r = DATASETS
    created = await create(custom, {**dataset("a"), "metadata": {"name": "a", "finalizers": ["x/y"]}})
    read = created["metadata"]["resourceVersion"]
    await patch(custom, "a", {"metadata": {"finalizers": ["x/y", "other/z"]}})  # another writer, unconditional
    with pytest.raises(ApiException) as stale:
        await patch(custom, "a", {"metadata": {"finalizers": ["x/y", "mine/w"], "resourceVersion": read}})
    assert stale.value.status == 409 and "has been modified" in str(stale.value.body)
    assert (server.stored(r.group, r.plural, "default", "a") or {})["metadata"]["finalizers"] == ["x/y", "other/z"]
    current = (server.stored(r.group, r.plural, "default", "a") or {})["metadata"]["resourceVersion"]
    after = await patch(custom, "a", {"metadata": {"finalizers": ["x/y", "other/z", "mine/w"],
                                                   "resourceVersion": current}})
    assert after["metadata"]["finalizers"] == ["x/y", "other/z", "mine/w"]
    assert after["metadata"]["resourceVersion"] != current  # a new version, as any change


async def test_a_resource_whose_crd_is_not_installed_is_not_served(api: tuple[FakeApiServer, Any]) -> None:
    """``remove_crd``: the resource answers 404 NotFound, as an apiserver without the CRD does, until
    ``install_crd``."""
    server, custom = api
    fluid = next(r for r in kube.FLUID_RESOURCES if r.kind == "Dataset")
    server.remove_crd(fluid)
    with pytest.raises(ApiException) as missing:
        await custom.list_cluster_custom_object(fluid.group, fluid.version, fluid.plural)
    assert missing.value.status == 404
    assert (await create(custom, dataset("a")))["metadata"]["uid"]  # the other group's Dataset is served
    server.install_crd(fluid)
    listing = await custom.list_cluster_custom_object(fluid.group, fluid.version, fluid.plural)
    assert listing["items"] == []
