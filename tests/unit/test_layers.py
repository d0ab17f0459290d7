"""The layers are executable: the import-linter contracts in pyproject.toml hold for this checkout.

Services never import each other, domain modules stay off NATS, HTTP, asyncio, the bus and the object stores
(also through another module), libs never import services, and only the CLI imports ``libs.cli``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ("Services never import each other", "Domain modules are pure", "libs never import services",
             "Only the CLI imports libs.cli")


def test_import_contracts_hold() -> None:
    # This checkout's packages, not whatever the virtualenv has installed in editable mode.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in CONTRACTS:
        assert contract in result.stdout, f"contract {contract!r} is not checked any more"
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout
