"""Every process's side server, on real processes: ``/healthz``, ``/readyz`` and ``/metrics`` of the dataset,
runtime and agent services started as ``python -m services.<name>`` on a real nats-server, and readiness that
follows the NATS connection (false while nats-server is stopped, true again once it is back).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from libs.config import Settings
from libs.embedded import LOOPBACK, ServerProcess, spawn, wait_until
from tests.conftest import NatsServer, SeaweedServer
from tests.helpers import eventually, json_lines

SERVICES = ("dataset", "runtime", "agent")


@pytest.fixture
def services(nats_server: NatsServer, seaweedfs: SeaweedServer, tmp_path: Path) -> Iterator[dict[str, int]]:
    """The three services as child processes, each with its side server on its own port: name → port.

    Each binds port 0 and logs the port it got: a port found free here and let go of could be taken by another
    worker's server before the service bound it (and that server would answer the test)."""
    started: list[ServerProcess] = []
    ports: dict[str, int] = {}
    try:
        for name in SERVICES:
            env = {**os.environ, "NATS_URL": nats_server.url, "SHOAL_S3_ENDPOINT": seaweedfs.endpoint,
                   "SHOAL_HTTP_PORT": "0", "SHOAL_LOG_FORMAT": "json",
                   "SHOAL_MOUNT_ROOT": str(tmp_path / "mnt"), "SHOAL_NODE_NAME": "side-node"}
            started.append(spawn(name, [sys.executable, "-m", f"services.{name}"], tmp_path / f"{name}.log", env=env))
        for name, process in zip(SERVICES, started, strict=True):
            wait_until(functools.partial(listening, process), 60, f"{name}'s side server", process.process,
                       process.log_path, process.log_start)
            ports[name] = side_port(process) or 0
        yield ports
    finally:
        for process in started:
            process.stop()


def side_port(process: ServerProcess) -> int | None:
    """The port of the side server ``process`` logged it listens on, once it has."""
    for line in json_lines(process.log_path.read_bytes()[process.log_start:].decode(errors="replace")):
        if line.get("event") == "side server listening":
            return urlsplit(str(line["url"])).port
    return None


def listening(process: ServerProcess) -> bool:
    return side_port(process) is not None


async def get(session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    try:
        async with session.get(f"http://{LOOPBACK}:{port}{path}") as response:
            return response.status, await response.text()
    except aiohttp.ClientConnectionError:
        return 0, ""


@pytest.mark.timeout(120)
async def test_side_servers_answer_health_readiness_and_metrics_and_readiness_follows_nats(
        services: dict[str, int], nats_server: NatsServer, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        waiting: dict[str, str] = {}  # the services not ready at the last look, and their /readyz bodies

        async def all_ready() -> bool:
            waiting.clear()
            for name, port in services.items():
                status, body = await get(session, port, "/readyz")
                if status != 200:
                    waiting[name] = body or "no answer"
            return not waiting

        async def until_all_ready(what: str) -> None:
            try:
                await eventually(all_ready, 60, what)
            except AssertionError as err:
                logs = {name: (tmp_path / f"{name}.log").read_text()[-3000:] for name in waiting}
                raise AssertionError(f"{err}; not ready: {waiting}; their logs' ends: {logs}") from None

        await until_all_ready("every service ready")
        for name, port in services.items():
            assert await get(session, port, "/healthz") == (200, "ok\n")
            status, body = await get(session, port, "/readyz")
            checks = json.loads(body)["checks"]
            assert status == 200 and set(checks.values()) == {"ok"}, (name, checks)
            assert {"nats", "loops"} <= set(checks), (name, checks)
            status, metrics = await get(session, port, "/metrics")
            assert status == 200
            assert "process_resident_memory_bytes" in metrics and "process_cpu_seconds_total" in metrics
        # The services' own metrics, as Prometheus text: their consumers' outcomes from the start, and the gauges
        # of what their buckets hold (nothing yet).
        expected = {"dataset": ['shoal_messages_handled_total{consumer="dataset-commands",outcome="rejected"} 0.0',
                                'shoal_datasets{phase="NotBound"} 0.0'],
                    "runtime": ['shoal_messages_handled_total{consumer="runtime-heartbeats",outcome="ok"}',
                                'shoal_runtimes{phase="Ready"} 0.0']}
        for name, lines in expected.items():
            async def exported(port: int = services[name], lines: list[str] = lines) -> bool:
                text = (await get(session, port, "/metrics"))[1]
                return all(line in text for line in lines)

            await eventually(exported, 15, f"{name}'s own metrics on /metrics")
        agent_checks = json.loads((await get(session, services["agent"], "/readyz"))[1])["checks"]
        assert {"mount root", "cache", "watches"} <= set(agent_checks)

        nats_server.stop()  # NATS goes away: alive still, but no longer ready

        async def none_ready() -> bool:
            return all([(await get(session, port, "/readyz"))[0] == 503 for port in services.values()])

        await eventually(none_ready, 30, "every service not ready without NATS")
        for port in services.values():
            assert await get(session, port, "/healthz") == (200, "ok\n")
            assert json.loads((await get(session, port, "/readyz"))[1])["checks"]["nats"] == "not connected to NATS"

        nats_server.start()
        await until_all_ready("every service ready again once NATS is back")


def test_the_side_server_port_setting_takes_a_port_zero_or_off() -> None:
    from libs.config import SettingsError, load_settings

    assert load_settings({"SHOAL_HTTP_PORT": "9464"}).service.http_port == 9464
    assert load_settings({"SHOAL_HTTP_PORT": "0"}).service.http_port == 0
    assert load_settings({"SHOAL_HTTP_PORT": "off"}).service.http_port is None
    assert load_settings({}).service.http_port == 0
    with pytest.raises(SettingsError, match="SHOAL_HTTP_PORT"):
        load_settings({"SHOAL_HTTP_PORT": "70000"})
    assert isinstance(Settings().service.http_host, str)


