"""The bridge's list-and-watch loop (``services/bridge/watch.py``) over connections that die without closing,
against the project's kmock subclass (``tests/kube.py``: there is no kube-apiserver here): a list that never answers
and a watch that goes silent are given up on the client's side and the loop lists again, instead of waiting for
ever while /readyz says ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kmock import Server
from kubernetes_asyncio import client

from libs import kube
from services.bridge import watch
from services.bridge.watch import ResourceWatcher
from tests.helpers import eventually
from tests.kube import FakeApiServer

SHOAL = kube.SHOAL_RESOURCES[0]


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
