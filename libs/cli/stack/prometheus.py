"""Prometheus for ``shoal up``: finding the binary, its scrape configuration, and running it on loopback.

The binary is Debian's ``prometheus`` package, unpacked (not installed: installing starts a system service) by
``make system-deps`` into ``.shoal/tools/prometheus/`` of the checkout (``TOOLS_BIN``), or one on PATH. With
``PROMETHEUS_URL`` set, ``shoal up`` starts none and only prints that address. Debian's binary looks for its web
UI's files where the package would install them, so unpacked it serves the API (and Grafana) but no UI pages.

What is scraped: every service's side server (``shoal up`` knows their ports: static targets, job ``shoal``, label
``service``), and the agents' mount processes, which pick their side-server ports at start: the agent writes one
file_sd JSON per mount process (``[{"targets": ["127.0.0.1:PORT"], "labels": {...}}]``) into the folder named by
``SHOAL_PROMETHEUS_TARGETS_DIR``, which Prometheus watches (job ``shoal-mount``, the label the agent writes in them).

Pure: ``find_tool``'s search order, ``scrape_config`` and ``argv``. I/O: ``start_prometheus`` and ``ready``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.embedded import LOOPBACK, ServerProcess, spawn, wait_until
from libs.metrics import MOUNT_JOB

# Where ``make system-deps`` unpacks Debian's package: below the checkout, whatever the state directory.
TOOLS_DIR = Path(__file__).resolve().parents[3] / ".shoal" / "tools" / "prometheus"
TOOLS_BIN = TOOLS_DIR / "usr" / "bin"
# Names the agent reads to know where to write its mount processes' scrape targets.
TARGETS_DIR_VARIABLE = "SHOAL_PROMETHEUS_TARGETS_DIR"
URL_VARIABLE = "PROMETHEUS_URL"
# Job names, as the dashboards' users see them in Prometheus. The mounts' is the one the agent writes into each
# target file, which would win over another name given here.
SERVICES_JOB = "shoal"
MOUNTS_JOB = MOUNT_JOB
# Prometheus's own default port; ``--prometheus-port`` moves it.
DEFAULT_PORT = 9090
# A demo wants graphs that move within seconds; Grafana's $__rate_interval is four of these.
SCRAPE_INTERVAL = "5s"
# Metrics of a demo are not worth keeping for long; a laptop's disk is.
RETENTION = "2d"
# Prometheus is ready in well under a second; a busy two-core machine may need more.
READY_TIMEOUT_SECONDS = 30.0
HOW_TO_GET = ("no Prometheus: `make system-deps` unpacks Debian's prometheus package into .shoal/tools/prometheus/ "
              "(or put prometheus on PATH, or set PROMETHEUS_URL to an existing server)")


def find_tool(name: str, path: str | None = None) -> str | None:
    """``prometheus`` or ``promtool``: the one ``make system-deps`` unpacked, else one on PATH, else None."""
    unpacked = TOOLS_BIN / name
    if unpacked.is_file() and os.access(unpacked, os.X_OK):
        return str(unpacked)
    return shutil.which(name, path=path)


@dataclass(frozen=True)
class PrometheusConfig:
    port: int
    data_dir: Path
    config_path: Path
    targets_dir: Path
    scrape_interval: str = SCRAPE_INTERVAL

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def scrape_config(services: Mapping[str, int], targets_dir: Path, scrape_interval: str = SCRAPE_INTERVAL) -> str:
    """Prometheus's configuration (JSON, which is YAML too): each service's side server as a static target labelled
    with its name, and the file_sd folder of the mount processes, re-read as often as it scrapes. A mount's target
    and its series both carry ``node`` and ``dataset`` (the same values): ``honor_labels`` keeps the series' own,
    where Prometheus would otherwise keep both, the series' renamed ``exported_node`` and ``exported_dataset``."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": SERVICES_JOB,
                "static_configs": [{"targets": [f"{LOOPBACK}:{port}"], "labels": {"service": name}}
                                   for name, port in services.items()],
            },
            {
                "job_name": MOUNTS_JOB,
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": scrape_interval}],
            },
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def argv(binary: str, config: PrometheusConfig) -> list[str]:
    return [binary, f"--config.file={config.config_path}", f"--storage.tsdb.path={config.data_dir}",
            f"--storage.tsdb.retention.time={RETENTION}", f"--web.listen-address={LOOPBACK}:{config.port}"]


# --- I/O ---


def ready(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=0.5)
        try:
            connection.request("GET", "/-/ready")
            return connection.getresponse().status == 200
        finally:
            connection.close()
    except OSError:
        return False


def start_prometheus(binary: str, config: PrometheusConfig, services: Mapping[str, int],
                     log_path: Path) -> ServerProcess:
    """Write the configuration and start Prometheus; returns once it answers ``/-/ready`` (a Prometheus that never
    gets ready is stopped, not left running)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.targets_dir.mkdir(parents=True, exist_ok=True)
    config.config_path.write_text(scrape_config(services, config.targets_dir, config.scrape_interval))
    server = spawn("prometheus", argv(binary, config), log_path, grace=10.0)
    try:
        wait_until(lambda: ready(config.port), READY_TIMEOUT_SECONDS, "prometheus", server.process, log_path,
                   server.log_start)
    except BaseException:
        server.stop()
        raise
    return server
