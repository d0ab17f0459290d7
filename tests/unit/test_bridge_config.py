"""The bridge's Kubernetes client settings: a missing kubeconfig or no pod is a clear error, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.config import KubeSettings
from services.bridge.app import BridgeConfigError, api_client


async def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BridgeConfigError, match="SHOAL_KUBECONFIG="):
        await api_client(KubeSettings(kubeconfig=str(tmp_path / "absent")))
    with pytest.raises(BridgeConfigError, match="in-cluster"):
        await api_client(KubeSettings())
