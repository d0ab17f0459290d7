"""What a mount process's series look like in the Prometheus ``shoal up`` configures (``libs.cli.stack.prometheus``):
Debian's binary scraping a side server through the file_sd target the agent writes (``write_target``).

The target carries ``node`` and ``dataset`` (so a mount that is down is named by ``up``), and so does every series
the mount process serves. Scraped without ``honor_labels``, Prometheus kept both, the series' own as
``exported_node`` and ``exported_dataset``: every data-path series twice labelled. And the job: the target file's
``job`` label wins over the scrape job's name, so the two must be spelled as one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from libs.cli.stack.prometheus import MOUNTS_JOB, PrometheusConfig, find_tool, start_prometheus
from libs.embedded import LOOPBACK, PORT_TAKEN, free_port
from libs.side_server import Readiness, SideServer
from services.agent.metrics import MountMetrics, write_target
from tests import helpers
from tests.helpers import eventually, start_prometheus_on_a_free_port

pytestmark = [pytest.mark.needs("prometheus"), pytest.mark.timeout(60)]

NODE, NAMESPACE, NAME = "scrape-node", "default", "scraped"
DATASET = f"{NAMESPACE}/{NAME}"


async def series(session: aiohttp.ClientSession, url: str, selector: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/api/v1/series", params={"match[]": selector}) as response:
        body = await response.json()
    assert body.get("status") == "success", body
    found: list[dict[str, Any]] = body["data"]
    return found


async def test_a_mount_processs_series_keep_their_own_node_and_dataset_under_the_mounts_job(tmp_path: Path) -> None:
    binary = find_tool("prometheus")
    assert binary is not None
    metrics = MountMetrics(NODE, DATASET, data_path=True)
    reads = metrics.reads(lambda: None)
    assert reads is not None
    reads.read("store", 4096)
    side = SideServer(Readiness(), LOOPBACK, 0)
    port = await side.start()
    targets = tmp_path / "targets"
    write_target(str(targets), NODE, NAMESPACE, NAME, LOOPBACK, port)
    config, server = await asyncio.to_thread(
        start_prometheus_on_a_free_port, binary,
        lambda port: PrometheusConfig(port, tmp_path / "tsdb", tmp_path / "prometheus.yml", targets,
                                      scrape_interval="1s"),
        {}, tmp_path / "prometheus.log")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            selector = f'shoal_block_reads_total{{source="store", dataset="{DATASET}"}}'
            found = await eventually(lambda: series(session, config.url, selector), 30, "the mount's reads scraped")
            assert len(found) == 1, found
            labels = found[0]
            assert not [name for name in labels if name.startswith("exported_")], labels
            assert labels["node"] == NODE and labels["dataset"] == DATASET, labels
            assert labels["job"] == MOUNTS_JOB, labels
            # ``up`` of the target still names the mount.
            up = await series(session, config.url, f'up{{job="{MOUNTS_JOB}"}}')
            assert [(s["node"], s["dataset"]) for s in up] == [(NODE, DATASET)], up
    finally:
        await asyncio.to_thread(server.stop)
        await side.stop()
        metrics.close()


async def test_a_prometheus_whose_port_another_one_holds_starts_again_on_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port chosen for Prometheus can be bound meanwhile by another worker's Prometheus, which answers
    ``/-/ready`` before this one has exited: ``start_prometheus`` alone then returns with that other one answering.
    ``start_prometheus_on_a_free_port`` sees it is not its own (``config.file``) and starts on another port."""
    binary = find_tool("prometheus")
    assert binary is not None

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def flags(request: web.Request) -> web.Response:
        return web.json_response({"data": {"config.file": "/elsewhere/prometheus.yml"}})

    other = web.Application()  # another worker's Prometheus
    other.router.add_get("/-/ready", ready)
    other.router.add_get("/api/v1/status/flags", flags)
    runner = web.AppRunner(other)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    taken = runner.addresses[0][1]
    offered = iter([taken])
    monkeypatch.setattr(helpers, "free_port", lambda: next(offered, None) or free_port())

    def config_on(port: int) -> PrometheusConfig:
        return PrometheusConfig(port, tmp_path / "tsdb", tmp_path / "prometheus.yml", tmp_path / "targets")

    try:
        fooled = await asyncio.to_thread(start_prometheus, binary, config_on(taken), {}, tmp_path / "fooled.log")
        try:  # it returned, though its Prometheus could not bind: the answer came from the other one
            await asyncio.to_thread(fooled.process.wait, 30)
            assert PORT_TAKEN in (tmp_path / "fooled.log").read_text()
        finally:
            await asyncio.to_thread(fooled.stop)
        config, server = await asyncio.to_thread(start_prometheus_on_a_free_port, binary, config_on, {},
                                                 tmp_path / "prometheus.log")
        try:
            assert config.port != taken
            async with aiohttp.ClientSession() as session, \
                    session.get(f"{config.url}/api/v1/status/flags") as response:
                assert (await response.json())["data"]["config.file"] == str(config.config_path)
        finally:
            await asyncio.to_thread(server.stop)
    finally:
        await runner.cleanup()
