"""The NATS users and permissions (``libs.natsauth``): what each process kind may and may not do, that every
stream, bucket and durable consumer Shoal has is covered, and that nats-server accepts the generated block."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from libs import bus, natsauth, subjects
from libs.embedded import find_binary
from libs.natsauth import AGENT, BRIDGE, CLI, DATASET, KINDS, LOADER, OBSERVER, RUNTIME, SCHEDULER, may_publish


def test_matching_follows_nats_wildcards() -> None:
    assert natsauth.matches("shoal.cmd.>", "shoal.cmd.dataset.apply")
    assert not natsauth.matches("shoal.cmd.>", "shoal.cmd")
    assert natsauth.matches("shoal.agent.heartbeat.*", "shoal.agent.heartbeat.n1")
    assert not natsauth.matches("shoal.agent.heartbeat.*", "shoal.agent.heartbeat.n1.x")
    assert not natsauth.matches("shoal.agent.heartbeat.n1", "shoal.agent.heartbeat.n2")


def test_an_agent_publishes_its_own_events_and_no_command() -> None:
    for subject in (subjects.agent_heartbeat("n1"), subjects.agent_inventory("n1"), subjects.task_progress("n1")):
        assert may_publish(AGENT, subject, node="n1")
        assert not may_publish(AGENT, subject.replace("n1", "n2"), node="n1")  # another node's
        assert may_publish(AGENT, subject)  # the shared agent user of a DaemonSet: any node
    for subject in (subjects.DATASET_APPLY, subjects.DATASET_DELETE, subjects.RUNTIME_APPLY, subjects.DATALOAD_APPLY,
                    subjects.DATASET_STATUS, subjects.node_task("n1", "default", "d"),
                    f"$KV.{subjects.KV_DATASETS}.default.d", f"$KV.{subjects.KV_AGENTS}.n1",
                    natsauth.stream_api("UPDATE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("CREATE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("PURGE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("DELETE", subjects.STREAM_FACTS)):
        assert not may_publish(AGENT, subject), subject


def test_the_observer_subscribes_to_facts_and_nothing_else() -> None:
    observer = natsauth.permissions(OBSERVER)
    assert observer.publish == ()
    assert observer.subscribe == (subjects.ALL_FACTS,)
    block = natsauth.authorization_block(natsauth.users({OBSERVER: "pw"}))
    assert 'publish: {deny: [">"]}' in block  # an empty allow list would allow everything


def test_commands_come_from_the_cli_the_bridge_and_the_loaders_resync_only() -> None:
    senders = {kind for kind in KINDS if may_publish(kind, subjects.DATASET_APPLY)}
    assert senders == {CLI, BRIDGE}
    assert {kind for kind in KINDS if may_publish(kind, subjects.DATASET_RESYNC)} == {CLI, BRIDGE, LOADER}


def test_each_bucket_is_written_by_its_owner_only() -> None:
    owners = {bucket: {kind for kind in KINDS if may_publish(kind, f"$KV.{bucket}.k")}
              for bucket in natsauth.KV_BUCKETS}
    assert owners == {
        subjects.KV_DATASETS: {DATASET}, subjects.KV_BINDINGS: {DATASET}, subjects.KV_NODE_CACHE: {DATASET},
        subjects.KV_RUNTIMES: {RUNTIME}, subjects.KV_AGENTS: {RUNTIME},
        subjects.KV_OPERATIONS: {LOADER}, subjects.KV_OPERATION_RUNS: {LOADER}, subjects.KV_MEMBERS: {DATASET},
    }


def test_nobody_but_the_provisioners_changes_a_stream_and_nobody_deletes_one() -> None:
    for stream in natsauth.ALL_STREAMS:
        updaters = {kind for kind in KINDS if may_publish(kind, natsauth.stream_api("UPDATE", stream))}
        assert updaters == {DATASET, RUNTIME, LOADER, SCHEDULER, BRIDGE, CLI}
        assert not any(may_publish(kind, natsauth.stream_api("DELETE", stream)) for kind in KINDS)


def test_every_stream_bucket_and_durable_of_shoal_is_covered() -> None:
    """A stream, bucket or durable consumer added to libs.bus or libs.subjects without a permission fails here."""
    assert {spec.name for spec in bus.STREAMS} | {natsauth.kv_stream(b.name) for b in bus.KV_BUCKETS} | {
        natsauth.object_stream(subjects.OBJ_MANIFESTS)} == set(natsauth.ALL_STREAMS)
    durables = [value for name, value in vars(subjects).items() if name.startswith("DURABLE_")]
    for durable in durables:
        consumers = [kind for kind in KINDS if any(
            may_publish(kind, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}") for stream in natsauth.ALL_STREAMS)]
        assert consumers, f"no process kind may consume as {durable}"


def test_user_names() -> None:
    assert natsauth.parse_user("agent-node-a") == (AGENT, "node-a")
    assert natsauth.parse_user(DATASET) == (DATASET, "")
    with pytest.raises(ValueError, match="unknown NATS user"):
        natsauth.parse_user("root")
    assert natsauth.inbox_prefix("agent-node-a") == "_INBOX.agent-node-a"


def test_nats_server_accepts_the_generated_block(tmp_path: Path) -> None:
    passwords = {kind: f"pw-{kind}" for kind in KINDS} | {"agent-n1": "pw-n1"} | {OBSERVER: "$OBSERVER_PASSWORD"}
    conf = tmp_path / "nats.conf"
    conf.write_text("listen: 127.0.0.1:4222\n" + natsauth.authorization_block(natsauth.users(passwords)))
    checked = subprocess.run([find_binary("nats-server"), "-t", "-c", str(conf)], capture_output=True, text=True,
                             env={"OBSERVER_PASSWORD": "from-the-environment"}, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr + checked.stdout


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_deploy_users_are_current() -> None:
    """deploy/nats-secure/auth.conf is what libs.natsauth makes (`make nats-auth` writes it)."""
    assert (DEPLOY / "nats-secure" / "auth.conf").read_text() == natsauth.deploy_authorization()


def test_the_secure_nats_config_is_the_base_one_plus_tls_and_users() -> None:
    """The component replaces deploy/nats/nats.yaml's server config: a change there must be made here too."""
    def server_config(path: Path) -> str:
        return path.read_text().split("  nats.conf: |\n", 1)[1].split("\n---", 1)[0]

    base = server_config(DEPLOY / "nats" / "nats.yaml").rstrip("\n")
    secure = server_config(DEPLOY / "nats-secure" / "nats-config.yaml")
    assert secure.startswith(base + "\n")
    assert "tls {" in secure[len(base):] and "include ../nats-auth/auth.conf" in secure[len(base):]
    statefulset = (DEPLOY / "nats-secure" / "nats-statefulset.yaml").read_text()
    for kind in KINDS:
        assert natsauth.password_variable(kind) in statefulset


def test_shoal_up_secure_gives_each_service_its_kinds_user_and_each_agent_its_nodes(tmp_path: Path) -> None:
    from libs.cli.stack.supervision import agent_plans, service_users, stack_services

    assert service_users(stack_services(1), [], "box") == {
        "dataset": DATASET, "runtime": RUNTIME, "loader": LOADER, "scheduler": SCHEDULER, "agent": "agent-box"}
    users = service_users(stack_services(2), agent_plans(2, "box", {}, tmp_path), "box")
    assert users["agent-1"] == "agent-box-1" and users["agent-2"] == "agent-box-2"
    assert natsauth.parse_user(users["agent-2"]) == (AGENT, "box-2")
