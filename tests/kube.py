"""A Kubernetes API server for tests: a project-owned subclass of kmock 0.8's scaffold with an object store of its own.

There is no kube-apiserver on these machines (no Docker, kind or k3s). This stands in for one, for what the bridge
(``services/bridge``) and kubernetes-asyncio need, and closes the gaps of kmock 0.8 listed in
``/work/shared/notes/kubernetes.md``:

- ``watch=True`` (kubernetes-asyncio's spelling) starts a watch; a watch streams events after the
  ``resourceVersion`` it names (everything since, from an event log), ends after ``timeoutSeconds``, sends
  BOOKMARKs when asked (``allowWatchBookmarks``), and answers ``410 Gone`` (an ERROR event) for a version older
  than the log keeps;
- create refuses a name that is not a DNS-1123 subdomain of at most 253 characters (upper case, ``_``, a label
  starting or ending with ``-`` or ``.``: 422 Invalid, as the apiserver's validation does; kmock takes any name);
- create answers 201 and fills ``uid``, ``resourceVersion``, ``generation``, ``creationTimestamp`` and
  ``metadata.namespace`` from the URL; an existing name is 409;
- lists carry ``kind`` (``<Kind>List``), ``apiVersion`` and the list's ``resourceVersion``;
- ``status`` is a subresource for the custom resources: a patch of ``/status`` changes only ``status``, a patch
  of the object leaves ``status`` alone; ``generation`` grows when ``spec`` changes;
- a patch is applied by its content type: ``application/merge-patch+json`` (RFC 7386) and
  ``application/json-patch+json`` (RFC 6902, with the ``jsonpatch`` package); strategic merge is treated as a
  merge patch;
- delete with finalizers sets ``deletionTimestamp``; the object goes once its last finalizer is removed; a patch
  that adds a finalizer to an object being deleted answers 422 Invalid, as the apiserver's validation does; a delete
  whose ``preconditions`` (``uid``, ``resourceVersion``) do not match the object answers 409 Conflict;
- a patch whose result names a ``metadata.resourceVersion`` other than the object's (a merge patch that carries
  the version it was made from, when the object changed since) answers 409 Conflict and changes nothing, as the
  apiserver's optimistic concurrency does; a patch without one applies to whatever is stored.

What kmock keeps: discovery (``/api``, ``/apis``) and the log of every request (method, path, headers, body;
``recorded()`` filters it) for assertions. A Secret's ``stringData`` is stored base64-encoded in ``data``.

Faults for tests: ``end_watches()`` closes every open watch (the client sees a closed stream), ``expire()``
makes every version seen so far too old (410 Gone), ``failing = 503`` answers that status to every resource
request until set back to None, ``fail(method, path_suffix, code)`` answers ``code`` (with the apiserver's reason
for it) to the requests of one method whose path ends with ``path_suffix`` only (e.g. one object's ``/status``)
until ``heal()``, ``hang(method, path_suffix)`` makes such requests get no answer at all until the client gives up
(an API server that takes connections and never answers; also until ``heal()``), ``bookmark()`` sends a BOOKMARK
on every watch that asked for them, and
``hang_watches`` / ``hang_lists`` make new watches (after their headers) or lists send nothing until the client
gives up, as over a connection that died half-open; ``watch_faults`` (a list of statuses) answers the next watches
each with the next status as an HTTP answer (its Status body, no stream), as an apiserver does for a watch it
throttles (429), cannot serve (5xx) or whose version is too old where no watch cache answers (410).
``remove_crd(resource)`` makes a custom resource unserved as
in a cluster without its CRD (its URLs answer 404 NotFound, discovery leaves it out) until ``install_crd``. Not
served: label and field selectors, PUT, server-side apply.

Namespaces are not objects here, but their deletion is played as the apiserver and its namespace controller do it
(``delete_namespace``): the namespace is Terminating (a create in it answers 403 Forbidden, with the apiserver's
message), and every object in it is deleted (those with finalizers get a ``deletionTimestamp`` and stay until their
finalizers are removed); ``namespace_empty`` says when the namespace would go.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import jsonpatch
import yarl
from kmock import KubernetesScaffold, ResourceInfo, resource

from libs import kube
from libs.events.common import DNS1123_SUBDOMAIN

Key = tuple[str, str, str | None, str]  # (group, plural, namespace or None, name)
# The longest object name the apiserver takes (a DNS-1123 subdomain).
MAX_NAME = 253
# How often an idle watch checks that its client is still there, so a test's server stops without waiting.
WATCH_CHECK_SECONDS = 0.2
# The apiserver's ``reason`` for the statuses ``fail`` injects.
FAULT_REASONS = {404: "NotFound", 409: "Conflict", 410: "Expired", 422: "Invalid", 429: "TooManyRequests",
                 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


CORE_KINDS = (
    Kind("", "v1", "secrets", "Secret", True, False),
    Kind("", "v1", "events", "Event", True, False),
    Kind("", "v1", "persistentvolumes", "PersistentVolume", False, True),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, True),
)
CUSTOM_KINDS = tuple(Kind(r.group, r.version, r.plural, r.kind, True, True) for r in kube.RESOURCES)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a mapping merges key by key (null removes), anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": self.code,
                "reason": self.reason, "message": self.message}

    def response(self) -> aiohttp.web.Response:
        return aiohttp.web.json_response(self.status(), status=self.code)


class FakeApiServer(KubernetesScaffold):
    """kmock's scaffold (discovery, request log) with the object store and watch semantics described above."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.kinds: dict[tuple[str, str], Kind] = {}
        for k in (*CORE_KINDS, *CUSTOM_KINDS):
            self._serve_kind(k)
        self.removed: dict[tuple[str, str], Kind] = {}  # custom resources whose CRD is "not installed"
        self.store: dict[Key, dict[str, Any]] = {}
        self.version = 0
        # (resourceVersion, (group, plural), event) of every change; watches read it from a version on.
        self.log: list[tuple[int, tuple[str, str], dict[str, Any]]] = []
        self.oldest = 0  # versions below this are "too old" (410)
        self.failing: int | None = None
        self.faults: dict[tuple[str, str], int] = {}  # (method, path suffix) -> status answered (``fail``)
        self.hangs: set[tuple[str, str]] = set()  # (method, path suffix) never answered (``hang``)
        # Held while the store and the log change; ``_wake`` is set (and replaced) at every change. Watches wait on
        # the event outside the lock: a Condition's wait cancelled at teardown may not take its lock back on Python
        # 3.11 (its release then raised "Lock is not acquired" in a CI run).
        self.changed = asyncio.Lock()
        self._wake = asyncio.Event()
        self.watch_generation = 0  # end_watches() bumps it; a watch started under an older one ends
        self.hang_watches = False  # a watch answers 200 and then sends nothing, ever (a half-open stream)
        self.hang_lists = False  # a list never answers
        self.watch_faults: list[int] = []  # statuses the next watches are answered, one each (``watch_faults``)
        self.bookmarks = 0
        self.terminating: set[str] = set()  # namespaces being deleted (``delete_namespace``)

    def _notify(self) -> None:
        """Under ``self.changed``: wake every watch waiting for a change."""
        self._wake.set()
        self._wake = asyncio.Event()

    # --- faults and helpers for tests ---

    async def end_watches(self) -> None:
        async with self.changed:
            self.watch_generation += 1
            self._notify()

    async def expire(self) -> None:
        """Forget the event log: a watch from any version seen so far gets 410 Gone."""
        async with self.changed:
            self.oldest = self.version + 1
            self.log.clear()
            self.watch_generation += 1
            self._notify()

    async def delete_namespace(self, namespace: str) -> None:
        """As ``kubectl delete namespace``: no new object in it from now on (403), and its namespace controller
        deletes every object in it, each as a delete request would (finalizers hold it)."""
        self.terminating.add(namespace)
        for group, plural, where, name in [k for k in self.store if k[2] == namespace]:
            with contextlib.suppress(ApiError):  # gone meanwhile
                await self._delete(self.kinds[(group, plural)], (group, plural, where, name))

    def namespace_empty(self, namespace: str) -> bool:
        """Whether the namespace holds no object any more: its controller would remove it now."""
        return not any(k[2] == namespace for k in self.store)

    def fail(self, method: str, path_suffix: str, code: int) -> None:
        """Answer ``code`` to every ``method`` request whose path ends with ``path_suffix``, until ``heal``."""
        self.faults[(method.upper(), path_suffix)] = code

    def hang(self, method: str, path_suffix: str) -> None:
        """Answer nothing to every ``method`` request whose path ends with ``path_suffix`` (``""``: every one) until
        ``heal``: the client waits until its own timeout, or until it leaves."""
        self.hangs.add((method.upper(), path_suffix))

    def heal(self) -> None:
        self.faults.clear()
        self.hangs.clear()

    def _fault(self, method: str, path: str) -> ApiError | None:
        for (wanted, suffix), code in self.faults.items():
            if method == wanted and path.endswith(suffix):
                return ApiError(code, FAULT_REASONS.get(code, "InternalError"), "injected failure")
        return None

    async def bookmark(self) -> None:
        async with self.changed:
            self.bookmarks += 1
            self._notify()

    def remove_crd(self, custom: kube.Resource) -> None:
        """As a cluster without ``custom``'s CRD: not served (404) and not discovered. Only for a resource without
        objects (the apiserver deletes a CRD's objects before the CRD goes)."""
        assert not self.objects(custom.group, custom.plural), f"{custom.crd_name} has objects"
        self.stop_serving(custom)

    def stop_serving(self, custom: kube.Resource) -> None:
        """As an API server answering 404 for ``custom`` while its objects still exist (one still starting, whose
        CRD handlers are not ready yet): not served and not discovered, its objects kept for ``install_crd``."""
        kind = self.kinds.pop((custom.group, custom.plural))
        del self.resources[resource(kind.group, kind.version, kind.plural)]
        self.removed[(custom.group, custom.plural)] = kind

    def install_crd(self, custom: kube.Resource) -> None:
        """``custom``'s CRD installed (again): served and discovered."""
        self._serve_kind(self.removed.pop((custom.group, custom.plural)))

    def _serve_kind(self, k: Kind) -> None:
        self.kinds[(k.group, k.plural)] = k
        self.resources[resource(k.group, k.version, k.plural)] = ResourceInfo(
            kind=k.kind, namespaced=k.namespaced, verbs={"list", "watch", "get", "create", "patch", "delete"},
            subresources={"status"} if k.status_subresource else set())

    def stored(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        found = self.store.get((group, plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def objects(self, group: str, plural: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj) for (g, p, _, _), obj in self.store.items() if (g, p) == (group, plural)]

    def recorded(self, method: str = "", path_contains: str = "") -> list[Any]:
        """Requests seen so far (kmock's log), by method and a piece of the path."""
        return [r for r in self._requests
                if (not method or r.method.value == method.upper()) and path_contains in r.url.path]

    # --- serving ---

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        path = yarl.URL(str(request.url)).path
        parts = path.strip("/").split("/")
        if (parts[:1] == ["api"] and len(parts) >= 3) or (parts[:1] == ["apis"] and len(parts) >= 4):
            if self.failing is not None:
                return ApiError(self.failing, "ServiceUnavailable", "injected failure").response()
            fault = self._fault(request.method.value, path.rstrip("/"))
            if fault is not None:
                return fault.response()
            if any(request.method.value == m and path.rstrip("/").endswith(suffix) for m, suffix in self.hangs):
                return await self._hang(request, answer=False)
            try:
                return await self._serve(request, parts)
            except ApiError as err:
                return err.response()
        return await super()._handle(request)

    def _parse(self, parts: list[str]) -> tuple[Kind, str | None, str | None, str | None]:
        if parts[0] == "api":
            group, rest = "", parts[2:]
        else:
            group, rest = parts[1], parts[3:]
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        kind = self.kinds.get((group, plural))
        if kind is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural})")
        return kind, namespace if kind.namespaced else None, name, sub

    async def _serve(self, request: Any, parts: list[str]) -> aiohttp.web.StreamResponse:
        kind, namespace, name, sub = self._parse(parts)
        method = request.method.value
        params = {k: str(v) for k, v in request.params.items()} if request.params else {}
        if method == "GET" and name is None:
            if params.get("watch", "").lower() in ("true", "1"):
                if self.hang_watches:
                    return await self._hang(request, answer=True)
                if self.watch_faults:
                    code = self.watch_faults.pop(0)
                    return ApiError(code, FAULT_REASONS.get(code, "InternalError"), "injected failure").response()
                return await self._watch(request, kind, namespace, params)
            if self.hang_lists:
                return await self._hang(request, answer=False)
            return aiohttp.web.json_response(self._list(kind, namespace))
        if method == "POST" and name is None:
            return aiohttp.web.json_response(await self._create(kind, namespace, request.data), status=201)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection is not served")
        key = (kind.group, kind.plural, namespace, name)
        if method == "GET":
            if key not in self.store:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            return aiohttp.web.json_response(self.store[key])
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            return aiohttp.web.json_response(await self._patch(kind, key, sub, content_type, request.data))
        if method == "DELETE":
            return aiohttp.web.json_response(await self._delete(kind, key, request.data))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not served by this test server")

    async def _hang(self, request: Any, answer: bool) -> aiohttp.web.StreamResponse:
        """A dead connection as the client sees it: nothing (after the headers, with ``answer``) until it leaves.
        Ignores ``timeoutSeconds``: a stream that died half-open never ends from the server's side."""
        raw = request._raw_request
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if answer:
            await response.prepare(raw)
        while raw.transport is not None and not raw.transport.is_closing():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_CHECK_SECONDS)
        return response

    def _list(self, kind: Kind, namespace: str | None) -> dict[str, Any]:
        items = [obj for (g, p, ns, _), obj in sorted(self.store.items(), key=lambda item: str(item[0]))
                 if (g, p) == (kind.group, kind.plural) and (namespace is None or ns == namespace)]
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": str(self.version)}, "items": items}

    async def _record(self, kind: Kind, event_type: str, obj: dict[str, Any]) -> None:
        """Under ``self.changed``: a new version for ``obj`` (unless DELETED), logged for the watches."""
        self.version += 1
        if event_type != "DELETED":
            obj["metadata"]["resourceVersion"] = str(self.version)
        self.log.append((self.version, (kind.group, kind.plural),
                         {"type": event_type, "object": copy.deepcopy(obj)}))
        self._notify()

    async def _create(self, kind: Kind, namespace: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict) or not body["metadata"].get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        obj = copy.deepcopy(body)
        meta = obj["metadata"]
        name = meta["name"]
        if not (isinstance(name, str) and len(name) <= MAX_NAME and DNS1123_SUBDOMAIN.fullmatch(name)):
            # The apiserver's name validation of every kind served here (custom resources, Secrets, Events, volumes).
            raise ApiError(422, "Invalid", f'{kind.kind} "{name}" is invalid: metadata.name: Invalid value: '
                                           f'"{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                                           "alphanumeric characters, '-' or '.', and must start and end with an "
                                           "alphanumeric character")
        if namespace is not None:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = (kind.group, kind.plural, namespace, meta["name"])
        if namespace in self.terminating:
            raise ApiError(403, "Forbidden", f'{kind.plural} "{meta["name"]}" is forbidden: unable to create new '
                                             f"content in namespace {namespace} because it is being terminated")
        async with self.changed:
            if key in self.store:
                raise ApiError(409, "AlreadyExists", f'{kind.plural} "{meta["name"]}" already exists')
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.kind)
            meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
            if kind.status_subresource and kind.group:
                obj.pop("status", None)
            if kind.kind == "Secret" and isinstance(obj.get("stringData"), dict):  # the apiserver encodes it
                encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in obj.pop("stringData").items()}
                obj["data"] = {**(obj.get("data") or {}), **encoded}
            self.store[key] = obj
            await self._record(kind, "ADDED", obj)
            return copy.deepcopy(obj)

    async def _patch(self, kind: Kind, key: Key, sub: str | None, content_type: str, body: Any) -> dict[str, Any]:
        if sub not in (None, "status") or (sub == "status" and not kind.status_subresource):
            raise ApiError(404, "NotFound", f"no subresource {sub!r}")
        async with self.changed:
            if key not in self.store:
                raise ApiError(404, "NotFound", f'{kind.plural} "{key[3]}" not found')
            old = self.store[key]
            if content_type == "application/json-patch+json":
                if not isinstance(body, list):
                    raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
                try:
                    patched = jsonpatch.apply_patch(old, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                    raise ApiError(422, "Invalid", str(err)) from err
            elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch is a JSON object")
                patched = merge_patch(old, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of a patch cannot be {content_type!r}")
            version = (patched.get("metadata") or {}).get("resourceVersion") if isinstance(patched, dict) else None
            if version and version != old["metadata"].get("resourceVersion"):
                # The apiserver's words: clients (and the bridge) read it as "read again and retry".
                what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {what} "{key[3]}": the object '
                                                "has been modified; please apply your changes to the latest version "
                                                "and try again")
            new = copy.deepcopy(old)
            if sub == "status":
                new["status"] = patched.get("status")  # the status subresource changes status only
                if new["status"] is None:
                    new.pop("status")
            else:
                for field, value in patched.items():
                    if field not in ("status", "metadata"):
                        new[field] = value
                meta = patched.get("metadata") or {}
                for field in ("labels", "annotations", "finalizers", "ownerReferences"):
                    if field in meta:
                        new["metadata"][field] = meta[field]
                    else:
                        new["metadata"].pop(field, None)
                if new.get("spec") != old.get("spec"):
                    new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            if new == old:
                return copy.deepcopy(old)  # a no-op patch keeps the version, as the apiserver does
            meta = new["metadata"]
            before = old["metadata"].get("finalizers") or []
            added = [f for f in meta.get("finalizers") or [] if f not in before]
            if old["metadata"].get("deletionTimestamp") and added:
                listed = ", ".join(f'"{f}"' for f in added)
                raise ApiError(422, "Invalid", f'{kind.kind}.{kind.group} "{key[3]}" is invalid: metadata.finalizers: '
                                               "Forbidden: no new finalizers can be added if the object is being "
                                               f"deleted, found new finalizers []string{{{listed}}}")
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                del self.store[key]
                await self._record(kind, "DELETED", new)
            else:
                self.store[key] = new
                await self._record(kind, "MODIFIED", new)
            return copy.deepcopy(new)

    async def _delete(self, kind: Kind, key: Key, options: Any = None) -> dict[str, Any]:
        async with self.changed:
            if key not in self.store:
                raise ApiError(404, "NotFound", f'{kind.plural} "{key[3]}" not found')
            obj = self.store[key]
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            for field in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field)
                if wanted and wanted != obj["metadata"].get(field):
                    raise ApiError(409, "Conflict", f"Precondition failed: {field} in precondition: {wanted}, "
                                                    f"{field} in object meta: {obj['metadata'].get(field)}")
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"]["deletionTimestamp"] = _now()
                    await self._record(kind, "MODIFIED", obj)
                return copy.deepcopy(obj)
            del self.store[key]
            await self._record(kind, "DELETED", obj)
            return copy.deepcopy(obj)

    async def _watch(self, request: Any, kind: Kind, namespace: str | None,
                     params: dict[str, str]) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        start = int(params.get("resourceVersion") or 0)
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None

        async def send(event: dict[str, Any]) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        async with self.changed:
            generation, seen_bookmarks = self.watch_generation, self.bookmarks
            if start and start < self.oldest:
                gone = ApiError(410, "Expired", f"too old resource version: {start} ({self.oldest})")
                await send({"type": "ERROR", "object": gone.status()})
                await response.write_eof()
                return response
            position = start
            if not start:  # no version: the current objects as ADDED first, as a real apiserver does
                for obj in self._list(kind, namespace)["items"]:
                    await send({"type": "ADDED", "object": obj})
                position = self.version
        try:
            while True:
                wake: asyncio.Event | None = None
                async with self.changed:
                    pending = [event for version, which, event in self.log
                               if version > position and which == (kind.group, kind.plural)
                               and (namespace is None or event["object"]["metadata"].get("namespace") == namespace)]
                    position = max(position, self.version)
                    if not pending and self.watch_generation == generation and self.bookmarks == seen_bookmarks:
                        remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                        if remaining is not None and remaining <= 0:
                            break
                        # aiohttp does not cancel a handler whose client left: look at the connection now and then.
                        transport = raw.transport
                        if transport is None or transport.is_closing():
                            break
                        step = WATCH_CHECK_SECONDS if remaining is None else min(remaining, WATCH_CHECK_SECONDS)
                        wake = self._wake  # taken under the lock: a change after it sets this one
                    else:
                        ended = self.watch_generation != generation
                        bookmark_due = self.bookmarks != seen_bookmarks
                        seen_bookmarks = self.bookmarks
                if wake is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), step)
                    continue
                for event in pending:
                    await send(event)
                if bookmark_due and bookmarks:
                    await send({"type": "BOOKMARK", "object": {"apiVersion": kind.api_version, "kind": kind.kind,
                                                               "metadata": {"resourceVersion": str(position)}}})
                if ended:
                    break
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response
