"""The bridge's writes to the secret mirror against a stub API (the full path runs against the test API server in
tests/integration/test_kube_bridge.py): created when absent, a clear reason when RBAC forbids, one merge patch of
what changed and none when nothing did, and never a value in a reason."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from kubernetes_asyncio.client import V1Secret
from kubernetes_asyncio.client.exceptions import ApiException

from libs import kube
from libs.config import KubeSettings, Settings
from services.bridge.domain import ObjectKey
from services.bridge.handlers import BridgeHandlers

MIRROR = ("shoal-system", "shoal-dataset-secrets")


class StubCore:
    def __init__(self, data: dict[str, str] | None, create_status: int | None = None) -> None:
        self.data = data
        self.create_status = create_status
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    async def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> V1Secret:
        self.calls.append(("read", (namespace, name), kwargs))
        if namespace == "locked":
            raise ApiException(status=403, reason="Forbidden")
        if self.data is None:
            raise ApiException(status=404, reason="Not Found")
        return V1Secret(data=dict(self.data))

    async def patch_namespaced_secret(self, name: str, namespace: str, body: Any, **kwargs: Any) -> None:
        self.calls.append(("patch", body, kwargs))

    async def create_namespaced_secret(self, namespace: str, body: Any, **kwargs: Any) -> None:
        self.calls.append(("create", body, kwargs))
        if self.create_status is not None:
            raise ApiException(status=self.create_status, reason="Forbidden")


class Stubbed(BridgeHandlers):
    @property
    def core(self) -> Any:
        return self._core  # type: ignore[attr-defined]


def stubbed(core: StubCore) -> Stubbed:
    settings = dataclasses.replace(Settings(), kube=KubeSettings(secret_mirror="/".join(MIRROR)))
    bridge = Stubbed(bus=None, api=None, settings=settings, mirrors=None)  # type: ignore[arg-type]
    bridge._core = core  # type: ignore[attr-defined]
    return bridge


async def test_an_absent_mirror_is_created_or_the_reason_given() -> None:
    core = StubCore(None)
    assert await stubbed(core)._mirror(MIRROR, {"team.creds.secret": b"S3CR3T"}) == []
    (_, body, _) = core.calls[-1]
    assert core.calls[-1][0] == "create" and body["data"] == {"team.creds.secret": base64.b64encode(b"S3CR3T").decode()}

    forbidden = StubCore(None, create_status=403)
    (reason,) = await stubbed(forbidden)._mirror(MIRROR, {"team.creds.secret": b"S3CR3T"})
    assert "shoal-system/shoal-dataset-secrets" in reason and "may not create" in reason and "S3CR3T" not in reason


async def test_only_changed_keys_are_patched_as_a_merge_patch() -> None:
    current = {"team.creds.id": base64.b64encode(b"AKID").decode()}
    core = StubCore(current)
    assert await stubbed(core)._mirror(MIRROR, {"team.creds.id": b"AKID"}) == []
    assert [call[0] for call in core.calls] == ["read"]  # nothing changed: no patch
    await stubbed(core)._mirror(MIRROR, {"team.creds.id": b"AKID", "team.creds.secret": b"new"})
    (kind, body, kwargs) = core.calls[-1]
    assert kind == "patch" and body == {"data": {"team.creds.secret": base64.b64encode(b"new").decode()}}
    assert kwargs["_content_type"] == "application/merge-patch+json"


async def test_a_users_secret_the_bridge_may_not_read_is_a_reason_on_the_dataset() -> None:
    key = ObjectKey(kube.SHOAL_RESOURCES[0], "locked", "demo")
    (reason,) = await stubbed(StubCore({}))._store_secrets(key, [("creds", "secret")])
    assert "may not read Secret locked/creds" in reason and "shoal-bridge-secrets" in reason
