"""A password typed into a ``dataset://`` mountPoint is rejected without being echoed (real nats-server): not in
the rejection fact's reason, not in the service's log."""

from __future__ import annotations

import pytest

from libs import subjects
from libs.bus import Bus, Delivery
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetApply, DatasetSpec, Mount
from services.dataset.handlers import DatasetHandlers
from tests.conftest import NatsServer
from tests.helpers import FactCollector, json_logs, make_settings

PASSWORD = "hunter2-Secret"


@pytest.mark.parametrize("mount_point", [
    f"dataset://admin:{PASSWORD}@team-a/src",
    f"dataset://team-a/src?token=admin:{PASSWORD}@x",
    f"dataset://admin:{PASSWORD}@",
    f"dataset://team-a/src/admin:{PASSWORD}@x/../..",
], ids=["userinfo", "query", "nothing-else", "folder"])
async def test_a_password_in_a_reference_mount_point_is_not_echoed(
        bus: Bus, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, mount_point: str) -> None:
    handlers = DatasetHandlers(bus, make_settings(nats_server.url))
    facts = FactCollector()
    await facts.start(bus, subjects.DATASET_REJECTED)
    dataset = Dataset(metadata=ObjectMeta(name="ref"), spec=DatasetSpec(mounts=[Mount(mount_point=mount_point)]))
    with json_logs(monkeypatch) as logs:
        await handlers.apply(DatasetApply(id="ref.apply", dataset=dataset),
                             Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1, stream_sequence=1))
    rejected = await facts.wait_for("dataset.rejected.v1", causationId="ref.apply")
    assert "spec.mounts[0].mountPoint" in rejected["reason"], rejected  # still says which field and why
    assert PASSWORD not in rejected["reason"], rejected["reason"]
    assert "rejected" in logs.getvalue() and PASSWORD not in logs.getvalue()
