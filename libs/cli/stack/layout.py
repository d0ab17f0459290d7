"""The state directory of ``shoal up``: every path below it (logs, JetStream store, SeaweedFS data, Prometheus,
pid files, mounts), named once."""

from __future__ import annotations

import contextlib
import shlex
from dataclasses import dataclass
from pathlib import Path

# The demo manifest writes cache paths under the default state directory; they are moved under --state-dir.
DEFAULT_STATE_DIR = ".shoal"


@dataclass(frozen=True)
class StateLayout:
    """Every path below the state directory, named once."""

    root: Path

    @property
    def down_command(self) -> str:
        """``shoal down`` as it has to be typed (from the current folder) to stop the ``shoal up`` of this state
        directory: a bare ``shoal down`` looks in ``.shoal`` and says "not running" of any other."""
        if self.root.resolve() == Path(DEFAULT_STATE_DIR).resolve():
            return "shoal down"
        return f"shoal down --state-dir {shlex.quote(str(self.root))}"

    def missing_folders(self) -> list[Path]:
        """The state directory and the folders above it that do not exist yet, deepest first: what a refused
        start removes again (``remove_empty``)."""
        missing = []
        folder = self.root
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        return missing

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nats_store(self) -> Path:
        return self.root / "nats"

    @property
    def nats_cluster_stores(self) -> Path:
        """``--nats-cluster N``: one JetStream store per server below it (nats-1 ..), apart from the single server's,
        whose streams a cluster could not take over."""
        return self.root / "nats-cluster"

    @property
    def seaweedfs(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def pidfile(self) -> Path:
        return self.root / "up.pid"

    @property
    def mounts(self) -> Path:
        """Where the agent mounts datasets: <state>/mnt/<namespace>/<name>; with several agents each has its own
        folder, <state>/mnt/<node>/<namespace>/<name>."""
        return self.root.resolve() / "mnt"

    @property
    def peer_secret(self) -> Path:
        """The cluster's peer secret (``shoal up --agents N``): random, 0600, made once and kept."""
        return self.root.resolve() / "peer.secret"

    @property
    def secrets(self) -> Path:
        """The folder of secrets the services read for ``encryptOptions`` (SHOAL_SECRETS_DIR unless the caller set
        one): ``<namespace>/<secret name>/<key>`` files, as a mounted Secret gives; 0700, made once and kept."""
        return self.root.resolve() / "secrets"

    @property
    def nats_secure(self) -> Path:
        """``shoal up --secure``: the NATS server's CA and certificate, every user's password, ``cli.env``."""
        return self.root.resolve() / "nats-secure"

    @property
    def prometheus(self) -> Path:
        """Prometheus's data (its TSDB), kept across runs like the JetStream store."""
        return self.root / "prometheus"

    @property
    def prometheus_config(self) -> Path:
        """Written by every ``shoal up`` that starts Prometheus: the services' ports change with the options."""
        return self.root / "prometheus.yml"

    @property
    def prometheus_targets(self) -> Path:
        """One file_sd JSON per mount process, written by the agents (``SHOAL_PROMETHEUS_TARGETS_DIR``)."""
        return self.root.resolve() / "prometheus-targets"

    @property
    def pids(self) -> Path:
        """PIDs of every child, so ``shoal down``, tests and a later ``shoal up`` can find them."""
        return self.root / "pids.json"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) where they are empty. One that holds anything stays: another
    ``shoal up`` given the same new state directory at the same moment made it too, and owns it now."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
