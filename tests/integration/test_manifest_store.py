"""ManifestStore over a real nats-server's Object Store: a manifest replaced while it is read is read again."""

from __future__ import annotations

from typing import Any

import pytest

from libs import manifest as manifest_module
from libs.bus import Bus
from libs.events.dataset import ManifestEntry
from libs.manifest import ManifestStore, ManifestWriter


def written(count: int, etag: str) -> ManifestWriter:
    writer = ManifestWriter()
    for index in range(count):
        writer.add(ManifestEntry(path=f"/f{index}", mount=0, key=f"f{index}", size=index, etag=etag, mtime=1.0))
    return writer


async def test_a_manifest_replaced_while_it_is_read_is_read_again_not_waited_for_for_ever(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    # nats-py's get looks the object up, then follows its chunks: a sync replacing the manifest in between purges
    # them, and the reader would wait for them with no end.
    monkeypatch.setattr(manifest_module, "LOAD_SECONDS", 1.0)
    store = ManifestStore(await bus.manifests())
    await store.save("default.swap", written(10, "old"), first=True)
    real_get_info = store.objects.get_info
    looked: list[str] = []

    async def get_info_then_replace(name: str, *args: Any, **kwargs: Any) -> Any:
        info = await real_get_info(name, *args, **kwargs)
        looked.append(name)
        if len(looked) == 2:  # the first look inside nats-py's get: the sync replaces it right then
            await store.save("default.swap", written(20, "new"))
        return info

    monkeypatch.setattr(store.objects, "get_info", get_info_then_replace)
    entries = await store.load("default.swap")
    assert len(entries) == 20 and {entry.etag for entry in entries} == {"new"}
    assert len(looked) >= 3  # read again after the first read gave up
