"""The HTTP side server of every Shoal process: ``/healthz``, ``/readyz`` and ``/metrics`` on its own port.

- ``/healthz`` answers 200 as long as the process's event loop does: "alive", for a liveness probe.
- ``/readyz`` answers 200 when every readiness check passes and 503 otherwise, with a JSON body naming each
  check and why it fails (``{"ready": false, "checks": {"nats": "not connected to NATS", "loops": "ok"}}``).
  Checks are registered by the process's wiring: connected to NATS, its consumers and watches running, and for
  the agent its own directories and cache. A process may add ``notes`` as well: what is wrong without making it
  unready (the agent's mounts that fail, one each), shown under ``"notes"`` when there are any.
- ``/metrics`` is Prometheus text from prometheus-client's global registry, which serves process metrics (CPU,
  memory, open files) and the GC and platform collectors from the start; other metrics register there too.

The port comes from ``SHOAL_HTTP_PORT`` (0: any free port, logged; ``off``: no side server) on
``SHOAL_HTTP_HOST``. At most ``MAX_CONNECTIONS`` connections are open at once (``libs.listener``): one more gets
503 with the reason and is closed, so whoever reaches the port cannot use up the process's file descriptors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from libs.listener import CappedListener, app_runner

# Kubelet probes (a connection each, closed after), Prometheus (one kept alive per scraper) and a person's curl use a
# handful; every connection costs a file descriptor, which a mount process's cache files need too. Before, any
# number were kept (in a pod the port listens on every address).
MAX_CONNECTIONS = 64

# A check answers None when all is well, else the reason a person reads in /readyz.
Check = Callable[[], str | None]


@dataclass
class Readiness:
    """Named readiness checks of one process; ready when every one passes (and there is at least one). Notes are
    checks that are shown and never judged: what is wrong with a part of the process's work, not with the process."""

    checks: dict[str, Check] = field(default_factory=dict)
    notes: dict[str, Check] = field(default_factory=dict)

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def note(self, name: str, check: Check) -> None:
        self.notes[name] = check

    def report(self) -> tuple[bool, dict[str, str]]:
        results = _run(self.checks)
        return bool(results) and all(value == "ok" for value in results.values()), results

    def noted(self) -> dict[str, str]:
        """The notes that say something (``ok`` ones left out)."""
        return {name: text for name, text in _run(self.notes).items() if text != "ok"}


def _run(checks: dict[str, Check]) -> dict[str, str]:
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            problem = check()
        except Exception as err:  # a broken check must not take the endpoint down
            problem = f"check failed: {type(err).__name__}: {err}"
        results[name] = problem or "ok"
    return results


class SideServer:
    """One aiohttp server on ``host:port`` (port 0: a free one, see ``port`` once started)."""

    def __init__(self, readiness: Readiness, host: str, port: int,
                 registry: CollectorRegistry = REGISTRY, max_connections: int = MAX_CONNECTIONS) -> None:
        self.readiness = readiness
        self.host = host
        self.requested_port = port
        self.port = 0
        self.registry = registry
        self.max_connections = max_connections
        self.listener: CappedListener | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # No access log: probes every few seconds would drown the process's own log lines.
        self._runner = app_runner(app)
        await self._runner.setup()
        self.listener = CappedListener(self._runner, self.max_connections, "side server")
        self.port = await self.listener.start(self.host, self.requested_port)
        return self.port

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = self.readiness.report()
        notes = self.readiness.noted()
        body = json.dumps({"ready": ready, "checks": checks, **({"notes": notes} if notes else {})}, indent=2) + "\n"
        return web.Response(text=body, status=200 if ready else 503, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
