"""The agent's side of peers, on real nats-server, SeaweedFS and FUSE mounts: heartbeats carry the node's labels;
with a peer secret each mount process gets ``--peer-port`` on a port the agent picked, the heartbeat names it as the
Serving mount's ``peerUrl``, and a mount process killed with SIGKILL comes back on the same port (the other nodes
find a restarted owner at the URL they know). Without a secret no mount process gets a peer port."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from libs.bus import Bus
from libs.config import Settings
from libs.events.agent import AgentHeartbeat
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import mount_pids, node_stack, read_file
from tests.integration.test_agent_health import last_beat

LABELS = {"topology.kubernetes.io/zone": "zone-a", "shoal.io/agent-index": "1"}


def peer_secret(folder: Path) -> str:
    """A peer secret file as an operator makes one: random, readable by its owner only."""
    secret = folder / "peer.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    return str(secret)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def peer_port_of(pid: int) -> int | None:
    argv = cmdline(pid)
    return int(argv[argv.index("--peer-port") + 1]) if "--peer-port" in argv else None


async def serving_beat(bus: Bus) -> AgentHeartbeat | None:
    beat = await last_beat(bus)
    return beat if beat and [m.state for m in beat.mount_reports()] == ["Serving"] else None


async def test_a_mount_keeps_its_peer_port_across_restarts_and_heartbeats_carry_labels_and_peer_url(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000})
    async with node_stack(bus, settings, seaweedfs, tmp_path, labels=LABELS,
                          peer_secret_file=peer_secret(tmp_path)) as node:
        await node.apply("peers", bucket)
        mountpoint = await node.wait_mounted("peers", "a.bin")
        [pid] = mount_pids(mountpoint)
        port = peer_port_of(pid)
        assert port is not None and port > 0
        beat = await eventually(lambda: serving_beat(bus), 15, "a heartbeat with the mount serving")
        assert beat.labels == LABELS
        assert beat.mount_reports()[0].peer_url == f"http://127.0.0.1:{port}"

        os.kill(pid, signal.SIGKILL)

        async def restarted() -> int | None:
            pids = [p for p in mount_pids(mountpoint) if p != pid]
            return pids[0] if pids else None

        new_pid = await eventually(restarted, 30, "the mount process restarted")
        assert peer_port_of(new_pid) == port

        async def readable() -> bytes | None:
            try:
                return await read_file(mountpoint / "a.bin")
            except OSError:  # the dead mount (ENOTCONN) until the new process moves in beneath it
                return None

        assert await eventually(readable, 30, "the restarted mount serving") == b"a" * 1000
        beat = await eventually(lambda: serving_beat(bus), 15, "a heartbeat with the mount serving again")
        assert beat.mount_reports()[0].peer_url == f"http://127.0.0.1:{port}"


async def test_without_a_peer_secret_no_mount_gets_a_peer_port(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"a.bin": b"a"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("alone", bucket)
        mountpoint = await node.wait_mounted("alone", "a.bin")
        [pid] = mount_pids(mountpoint)
        assert peer_port_of(pid) is None
        beat = await eventually(lambda: serving_beat(bus), 15, "a heartbeat with the mount serving")
        assert beat.mount_reports()[0].peer_url == "" and beat.labels == {}


async def test_a_peer_port_taken_while_the_mount_was_down_is_replaced_by_another(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The agent keeps a mount's peer port across restarts; if another process bound it meanwhile, the mount process
    # exits with EXIT_PEER_PORT_TAKEN and the agent gives it a new port instead of restarting it into the same wall.
    await put_objects(seaweedfs, bucket, {"a.bin": b"a" * 1000})
    async with node_stack(bus, settings, seaweedfs, tmp_path, peer_secret_file=peer_secret(tmp_path)) as node:
        await node.apply("squatted", bucket)
        mountpoint = await node.wait_mounted("squatted", "a.bin")
        [pid] = mount_pids(mountpoint)
        port = peer_port_of(pid)
        assert port is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: _async(not os.path.exists(f"/proc/{pid}")), 10, "the mount process gone")
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never past a listener
        try:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()

            async def moved() -> AgentHeartbeat | None:
                beat = await serving_beat(bus)
                moved_to = beat.mount_reports()[0].peer_url if beat else ""
                return beat if moved_to not in ("", f"http://127.0.0.1:{port}") else None

            beat = await eventually(moved, 45, "the mount serving again on another peer port")
            [new_pid] = mount_pids(mountpoint)
            assert beat.mount_reports()[0].peer_url == f"http://127.0.0.1:{peer_port_of(new_pid)}"
            assert await read_file(mountpoint / "a.bin") == b"a" * 1000
        finally:
            squatter.close()


async def _async(value: bool) -> bool:
    return value
