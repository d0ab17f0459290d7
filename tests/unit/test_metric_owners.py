"""Which process serves which of Shoal's series: a metric without labels shows a sample from the moment it is
registered, so registered in every process (as every instrument of ``libs.metrics`` was, at import) the scheduler's
fold lag and snapshot requests read 0 on the dataset, runtime, loader and agent processes and on every mount
process. A dashboard's ``max`` of the fold lag then said 0 s (a current fold) while the scheduler was down or not
deployed at all. Each process is imported in a fresh interpreter, as it starts, and its registry read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from libs import metrics

SCHEDULER_ONLY = {metrics.FOLD_LAG_SECONDS._name, metrics.SNAPSHOT_REQUESTS._name}
# What each process's __main__ imports (the agent's mount processes run services.agent.mountd).
OTHERS = ("services.dataset.app", "services.runtime.app", "services.loader.app", "services.agent.app",
          "services.agent.mountd", "services.bridge.app")

READ_REGISTRY = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
from prometheus_client import REGISTRY
print(json.dumps(sorted({metric.name for metric in REGISTRY.collect() if metric.samples})))
"""


def served(module: str) -> set[str]:
    """The metrics ``module``'s process serves a sample of as soon as it has started."""
    out = subprocess.run([sys.executable, "-c", READ_REGISTRY, module], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", OTHERS)
def test_a_process_other_than_the_scheduler_serves_none_of_the_schedulers_series(module: str) -> None:
    assert not served(module) & SCHEDULER_ONLY


def test_the_scheduler_serves_its_series() -> None:
    assert served("services.scheduler.app") >= SCHEDULER_ONLY
