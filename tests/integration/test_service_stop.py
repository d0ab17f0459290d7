"""A service process told to stop before NATS ever answered ends at once: ``python -m services.loader`` started
with no nats-server running (the README's settings, a wrong ``NATS_URL``, a Deployment whose NATS is not up yet)
kept trying to connect and heard neither Ctrl-C nor SIGTERM, until SIGKILL."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


async def logged(log: Path, event: str, prefix: bool = False) -> bool:
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        said = entry.get("event") if isinstance(entry, dict) else None
        if isinstance(said, str) and (said.startswith(event) if prefix else said == event):
            return True
    return False


def start_loader(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": url, "SHOAL_HTTP_PORT": "off", "SHOAL_LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.loader"], env=env, stdout=out, stderr=out, cwd=ROOT)


async def test_a_service_that_never_reached_nats_stops_on_sigterm_and_on_ctrl_c(tmp_path: Path,
                                                                               refused_port: int) -> None:
    url = f"nats://127.0.0.1:{refused_port}"  # nothing listens there
    for signum in (signal.SIGTERM, signal.SIGINT):
        log = tmp_path / f"loader-{signum}.log"
        process = start_loader(url, log)
        try:
            # Once nats-py has failed a first time, the process is in its connect loop.
            await eventually(functools.partial(logged, log, "nats: encountered error", prefix=True), 30,
                             "a first failed connect")
            process.send_signal(signum)
            code = process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert code == 0, log.read_text()[-2000:]
        assert await logged(log, "stopped before connecting"), log.read_text()[-2000:]
        assert await logged(log, "stopped"), log.read_text()[-2000:]
