"""Watching one custom resource with kubernetes-asyncio: list, then watch from the list's resourceVersion.

A watch that ends (the server's timeout, a closed stream) or answers 410 Gone starts over with a list, which
hands every object to the handlers again (they are idempotent) and tells them which ones went away meanwhile.
BOOKMARKs are asked for (``allowWatchBookmarks``) and skipped: since every end of a watch lists again, the version
they carry is never needed. An unreachable API server or a 5xx answer is retried with ``libs.backoff``, and so is a
list that takes too long or a watch silent for longer than its lifetime (a dead connection). A watch request answered
with an HTTP error (not a stream) is that error, not a watch that ended: kubernetes-asyncio raises nothing for it.

A resource the API server does not serve (the list answers 404: its CRD is not installed, e.g. Fluid's in a cluster
with Shoal's only) has no objects: the handlers get an empty list marked not served, so it holds back neither
readiness nor the objects of its family, it deletes nothing (a 404 may also come from an API server still starting,
while the objects exist; a CRD really removed has its objects deleted first, each through Shoal's finalizer), and it
is said once. It is listed again after a watch's lifetime, as a watch would end, so a
CRD installed later is picked up without asking the API server in a loop. "Said once" is per CRD, not per watcher:
the watchers of one CRD in several namespaces (``SHOAL_KUBE_NAMESPACES``) share one ``CrdNotices``, so a missing CRD
is one warning, and its coming one info line, whatever the number of namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from libs import kube
from libs.backoff import Backoff
from libs.telemetry import get_logger

log = get_logger(__name__)

# An API server that is down or restarting: retry soon, but never hammer it; 30 s caps how long a bridge takes to
# notice that it is back.
API_RETRY = Backoff(first=0.5, cap=30.0)
# Client-side limits: without them kubernetes-asyncio waits without end, and a connection that died without a FIN
# or RST (a half-open stream: a node or NAT gone) would stop the bridge for good while /readyz says ready.
# A list is one answer: a minute is far above any apiserver's and ends a dead one.
LIST_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
# A watch may be silent while nothing changes, but the server ends it after ``timeoutSeconds`` (the watch's
# lifetime); silence this much longer than that means the connection is dead, and the bridge lists again.
WATCH_READ_MARGIN_SECONDS = 30.0

# (resource, namespace, items, served): ``served`` is False for a resource the API server answered 404 for.
OnListing = Callable[[kube.Resource, str | None, list[dict[str, Any]], bool], Awaitable[None]]
OnEvent = Callable[[kube.Resource, str, dict[str, Any]], Awaitable[None]]


class CrdNotices:
    """Whether each CRD was last found served, as said in the log: shared by the watchers of one bridge, so that a
    CRD missing in every namespace watched is said once, not once per namespace (and its coming once too)."""

    def __init__(self) -> None:
        self._served: dict[str, bool] = {}

    def note(self, resource: kube.Resource, served: bool, every_seconds: int) -> None:
        """Say when ``resource`` is found missing, and when it comes (again); not at every look, nor per watcher
        (a CRD is cluster-wide: no namespace is named)."""
        crd = resource.crd_name
        before = self._served.get(crd)
        if served == before:
            return
        if not served:
            log.warning("custom resource not installed: its objects are not bridged until its CRD is; looking "
                        "again at every watch lifetime", crd=crd, every_seconds=every_seconds)
        elif before is False:
            log.info("custom resource installed: bridging its objects", crd=crd)
        self._served[crd] = served


class ResourceWatcher:
    """The list-and-watch loop of one resource (in one namespace, or all); a Loop of ``libs.service``. Watchers
    of one bridge share ``notices`` (one per watcher when not given)."""

    def __init__(self, api: client.ApiClient, resource: kube.Resource, namespace: str | None,
                 on_listing: OnListing, on_event: OnEvent, watch_seconds: int,
                 notices: CrdNotices | None = None) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.on_listing = on_listing
        self.on_event = on_event
        self.watch_seconds = watch_seconds
        self.name = f"watch {resource.crd_name}" + (f" in {namespace}" if namespace else "")
        self.lists = 0  # how many lists were made: the first, then one per re-list
        self.synced = asyncio.Event()  # set once the first list has been handled
        self.served: bool | None = None  # whether the last list found the resource served (None: not listed yet)
        self.notices = notices if notices is not None else CrdNotices()
        self._stopping = asyncio.Event()

    def watch_timeouts(self) -> tuple[float, float]:
        """(connect, read) for a watch: a read limit per chunk, never a total, which would cut a working stream."""
        return CONNECT_TIMEOUT_SECONDS, self.watch_seconds + WATCH_READ_MARGIN_SECONDS

    def _list_call(self) -> Callable[..., Awaitable[Any]]:
        custom = client.CustomObjectsApi(self.api)
        r = self.resource
        namespace = self.namespace
        if namespace is None:
            return lambda **kw: custom.list_cluster_custom_object(r.group, r.version, r.plural, **kw)
        return lambda **kw: custom.list_namespaced_custom_object(r.group, r.version, namespace, r.plural, **kw)

    async def run(self) -> None:
        body = asyncio.create_task(self._run())
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([body, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body

    def stop(self) -> None:
        self._stopping.set()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                version = await self._list()
                failures = 0
                if version is None:  # not served: nothing to watch; look again when a watch would have ended
                    await self._wait(self.watch_seconds)
                    continue
                await self._watch(version)
            except ApiException as err:
                if err.status == 410:
                    log.info("watch expired, listing again", resource=self.resource.crd_name)
                    continue
                failures += 1
                await self._pause(failures, f"HTTP {err.status} {err.reason}")
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                failures += 1
                await self._pause(failures, f"{type(err).__name__}: {err}")
            except Exception as err:  # a malformed answer, a bug: logged, and the loop lives on
                log.exception("watch failed", resource=self.resource.crd_name)
                failures += 1
                await self._pause(failures, f"{type(err).__name__}")

    async def _pause(self, failures: int, reason: str) -> None:
        delay = API_RETRY.delay(failures)
        log.warning("API server not answering, retrying", resource=self.resource.crd_name, reason=reason,
                    delay=delay)
        await self._wait(delay)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _list(self) -> str | None:
        """Hand the handlers a fresh list; the version to watch from, or None when the resource is not served."""
        try:
            listing = await self._list_call()(_request_timeout=LIST_TIMEOUT_SECONDS)
        except ApiException as err:
            if err.status != 404:
                raise
            listing = None  # not served: no objects to hand over, and none to count as gone (the handlers are told)
        self._note_served(listing is not None)
        self.lists += 1
        items = [dict(item) for item in (listing or {}).get("items") or []]
        await self.on_listing(self.resource, self.namespace, items, listing is not None)
        self.synced.set()
        if listing is None:
            return None
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _note_served(self, served: bool) -> None:
        self.notices.note(self.resource, served, self.watch_seconds)
        self.served = served

    async def _watch(self, version: str) -> None:
        """Events from ``version`` on until the stream ends (then the caller lists again).

        The stream is read here rather than through ``kubernetes_asyncio.watch.Watch``, which builds a new API client
        (and TLS context, ~0.1 s of CPU) for every watch it starts.
        """
        response = await self._list_call()(watch=True, _preload_content=False, resource_version=version,
                                           allow_watch_bookmarks=True, timeout_seconds=self.watch_seconds,
                                           _request_timeout=self.watch_timeouts())
        if not 200 <= response.status <= 299:
            # An HTTP error (503, 429, a 410 where no watch cache serves the version) with its Status as the body:
            # kubernetes-asyncio raises only for a preloaded body, and read as a stream it would look like a watch
            # that ended, listed again at once, in a loop, with none of a failed call's back-off.
            try:
                status = await _status_of(response)
            finally:
                response.release()
            raise ApiException(status=response.status, reason=f"{response.reason}: {status.get('message')}")
        try:
            while True:
                line = await response.content.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("undecodable watch event ignored", resource=self.resource.crd_name)
                    continue
                kind, obj = event.get("type", ""), event.get("object")
                if kind == "ERROR":
                    status = obj if isinstance(obj, dict) else {}
                    raise ApiException(status=int(status.get("code") or 500),
                                       reason=f"{status.get('reason')}: {status.get('message')}")
                if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                    await self.on_event(self.resource, kind, obj)
                # BOOKMARK: the next list starts from scratch anyway; nothing to keep.
        finally:
            response.release()
        log.info("watch ended, listing again", resource=self.resource.crd_name)


async def _status_of(response: Any) -> dict[str, Any]:
    """The Kubernetes Status an error answer carries (empty when it carries none)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        status = json.loads(await response.read())
        if isinstance(status, dict):
            return status
    return {}
