"""Start-up stays light: a process imports at start only what every run of it needs.

A mount process is started per mounted dataset and every service per pod, and their Python imports are most of
the time a mount takes to appear. Libraries needed on some paths only are imported where they are used (see the
agent README, "Start-up cost"); this checks, in a fresh interpreter, that no module-level import brings them back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("services.agent.mountd", "services.agent.app", "services.dataset.app", "services.runtime.app",
             "services.loader.app", "services.scheduler.app")
# Needed on some paths only: the S3 client (with the first S3 request), rich (the CLI's output; structlog is
# loaded without it), the OTLP exporter (only with OTEL_* variables), the Kubernetes client (the bridge), and
# test-only packages, which must never be needed at run time.
NOT_AT_START = ("aiobotocore", "botocore.client", "rich", "yaml", "click", "opentelemetry.exporter",
                "kubernetes_asyncio", "hypothesis", "jsonschema", "pytest")
# The CLI has tables (rich) and documents (yaml) to show, but neither traces to record nor S3 or Kubernetes to
# call: the OpenTelemetry SDK is loaded only by the processes that install a TracerProvider.
NOT_IN_CLI = ("aiobotocore", "botocore.client", "opentelemetry.sdk", "kubernetes_asyncio", "hypothesis", "pytest")

SCRIPT = f"""
import importlib, json, sys
def loaded(names):
    return sorted(name for name in names if name in sys.modules)
for module in {PROCESSES!r}:
    importlib.import_module(module)
processes = loaded({NOT_AT_START!r})
importlib.import_module("libs.cli.main")
print(json.dumps({{"processes": processes, "cli": loaded({NOT_IN_CLI!r})}}))
"""


def test_processes_and_cli_import_no_optional_library_at_start() -> None:
    # This checkout's packages, in an interpreter of their own (the test process has imported everything).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["processes"] == [], f"imported at the start of a process: {loaded['processes']}"
    assert loaded["cli"] == [], f"imported at the start of the CLI: {loaded['cli']}"
