"""The bridge's list-and-watch loop (``services/bridge/watch.py``) against the project's kmock subclass
(``tests/kube.py``: there is no kube-apiserver here): over connections that die without closing, a list that never
answers and a watch that goes silent are given up on the client's side and the loop lists again, instead of waiting
for ever while /readyz says ready; and a resource whose CRD is not installed counts as listed (empty), is said once,
and is looked for again at each watch's lifetime until its CRD comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from kmock import Server
from kubernetes_asyncio import client

from libs import kube
from services.bridge import watch
from services.bridge.watch import ResourceWatcher
from tests.helpers import eventually
from tests.kube import FakeApiServer

SHOAL = kube.SHOAL_RESOURCES[0]
FLUID = next(r for r in kube.FLUID_RESOURCES if r.kind == "Dataset")


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, client.ApiClient]]:
    async with FakeApiServer() as server, Server(server) as http, \
            client.ApiClient(client.Configuration(host=str(http.url).rstrip("/"))) as api_client:
        yield server, api_client


async def _nothing(*_: Any) -> None:
    return None


async def _async(value: Any) -> Any:
    return value


async def test_a_silent_watch_and_a_list_without_answer_end_in_a_new_list(
        api: tuple[FakeApiServer, client.ApiClient], monkeypatch: pytest.MonkeyPatch) -> None:
    server, api_client = api
    # Seconds rather than a minute: the limits are what is tested, not their size.
    monkeypatch.setattr(watch, "LIST_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(watch, "WATCH_READ_MARGIN_SECONDS", 0.5)
    watcher = ResourceWatcher(api_client, SHOAL, None, _nothing, _nothing, watch_seconds=1)
    lists = f"/{SHOAL.group}/{SHOAL.version}/{SHOAL.plural}"

    def requests(watching: bool) -> int:
        return len([r for r in server.recorded("GET", lists) if ("watch" in (r.params or {})) == watching])

    server.hang_lists = True
    task = asyncio.create_task(watcher.run())
    try:
        await eventually(lambda: _async(requests(watching=False) >= 2), what="a list given up and asked again")
        assert not watcher.synced.is_set()
        server.hang_lists, server.hang_watches = False, True
        await eventually(lambda: _async(watcher.lists >= 2), what="a re-list after a silent watch")
        assert watcher.synced.is_set() and requests(watching=True) >= 1
    finally:
        watcher.stop()
        await task


async def test_a_watch_answered_with_an_http_error_backs_off_and_one_answered_410_lists_again(
        api: tuple[FakeApiServer, client.ApiClient]) -> None:
    """An apiserver may answer a watch request with an HTTP error and its Status body rather than a stream (503
    overloaded, 429 throttled by priority and fairness, 410 for a version too old where no watch cache serves it).
    kubernetes-asyncio raises nothing for it when the body is not preloaded (a watch's), so the watcher read the
    Status as an empty stream and listed again at once: against a server asking for less, a full list and a new
    watch in a loop, without the back-off a failed list gets. A 503 now waits with back-off (a warning says
    why); a 410 lists again at once, as its ERROR event does."""
    server, api_client = api
    watcher = ResourceWatcher(api_client, SHOAL, None, _nothing, _nothing, watch_seconds=30)

    def said(event: str, reason: str = "") -> bool:
        return any(e["event"] == event and reason in str(e.get("reason", "")) for e in logs)

    server.watch_faults = [503, 410]  # the first watch, then the one after the next list
    watches = f"/{SHOAL.group}/{SHOAL.version}/{SHOAL.plural}"
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(watcher.run())
        try:
            await eventually(lambda: _async(said("API server not answering, retrying", "HTTP 503")),
                             what="a watch answered 503 waited on with back-off")
            await eventually(lambda: _async(said("watch expired, listing again")), what="a watch answered 410")
            await eventually(lambda: _async(len([r for r in server.recorded("GET", watches)
                                                 if "watch" in (r.params or {})]) == 3),
                             what="a third watch, after a third list")
            assert watcher.lists == 3
        finally:
            watcher.stop()
            await task
    assert not said("watch ended, listing again")  # neither answer was taken for a stream that ended


async def test_a_resource_whose_crd_is_not_installed_is_listed_empty_and_looked_for_again(
        api: tuple[FakeApiServer, client.ApiClient]) -> None:
    """A cluster with Shoal's CRDs and not Fluid's: the list answers 404. The watcher hands the handlers an empty
    list (no object of that kind can exist) and counts as synced, so /readyz does not wait for it; it logs that once,
    lists again once per watch lifetime (not in a loop), and bridges the resource's objects once its CRD comes."""
    server, api_client = api
    server.remove_crd(FLUID)
    listings: list[list[dict[str, Any]]] = []
    served_flags: list[bool] = []

    async def on_listing(_resource: kube.Resource, _namespace: str | None, items: list[dict[str, Any]],
                         served: bool) -> None:
        listings.append(items)
        served_flags.append(served)

    watcher = ResourceWatcher(api_client, FLUID, None, on_listing, _nothing, watch_seconds=1)
    lists = f"/{FLUID.group}/{FLUID.version}/{FLUID.plural}"
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(watcher.run())
        try:
            await eventually(lambda: _async(watcher.synced.is_set()), what="the missing resource counted as listed")
            assert listings == [[]]
            # Looked for again, once per watch lifetime (1 s): waited for, then counted against the time it took (a
            # fixed 2.5 s window expected at least one more look within it, which a loaded machine may not give).
            since = time.monotonic()
            await eventually(lambda: _async(len(server.recorded("GET", lists)) >= 3), what="two more looks")
            looks = len(server.recorded("GET", lists))
            assert looks <= 2 + (time.monotonic() - since) / 1, f"{looks} looks: not once per watch lifetime"
            assert all(items == [] for items in listings)
            server.install_crd(FLUID)
            created = await client.CustomObjectsApi(api_client).create_namespaced_custom_object(
                FLUID.group, FLUID.version, "default", FLUID.plural,
                {"apiVersion": FLUID.api_version, "kind": FLUID.kind, "metadata": {"name": "late"}, "spec": {}})
            await eventually(lambda: _async(listings[-1] == [created]), what="the object listed once its CRD came")
            assert not served_flags[0] and served_flags[-1]  # the handlers know a 404 from an empty list
        finally:
            watcher.stop()
            await task
    missing = [e for e in logs if FLUID.crd_name in str(e.get("crd")) and e["log_level"] == "warning"]
    assert len(missing) == 1 and "not installed" in missing[0]["event"]
    assert not [e for e in logs if "not answering" in e["event"]]  # a missing CRD is not an outage
