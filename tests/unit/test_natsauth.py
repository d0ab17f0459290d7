"""The NATS users and permissions (``libs.natsauth``): what each process kind may and may not do, that every
stream, bucket and durable consumer Shoal has is covered, and that nats-server accepts the generated block."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from libs import bus, natsauth, subjects
from libs.embedded import find_binary
from libs.natsauth import AGENT, BRIDGE, CLI, DATASET, KINDS, LOADER, OBSERVER, RUNTIME, SCHEDULER, may_publish

# A life of a dataset (``DatasetRecord.incarnation``): its parts' subject and durable name it.
LIFE = "4f9c2a7e1b3d5c6a"


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
                    subjects.DATASET_STATUS, subjects.node_task("n1", "default", "d", LIFE),
                    f"$KV.{subjects.KV_DATASETS}.default.d", f"$KV.{subjects.KV_AGENTS}.n1",
                    natsauth.stream_api("UPDATE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("CREATE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("PURGE", subjects.STREAM_COMMANDS),
                    natsauth.stream_api("DELETE", subjects.STREAM_FACTS)):
        assert not may_publish(AGENT, subject), subject


def test_a_node_named_with_dots_is_one_token_of_its_subjects() -> None:
    node = "ip-10-0-1-23.ec2.internal"  # EKS
    for subject in (subjects.agent_heartbeat(node), subjects.agent_inventory(node), subjects.task_progress(node)):
        assert subject.count(".") == 3, subject
        assert may_publish(AGENT, subject, node=node)
        assert not may_publish(AGENT, subject, node="ip-10-0-1-24.ec2.internal")
    assert natsauth.matches(subjects.AGENT_HEARTBEATS, subjects.agent_heartbeat(node))
    task = subjects.node_task(node, "default", "d", LIFE)
    assert natsauth.matches(f"{subjects.TASK_PREFIX}.*.default.d.*", task)
    durable = subjects.task_durable(node, "default", "d", LIFE)
    assert "." not in durable
    stream = subjects.task_stream(node)
    assert "." not in stream
    assert may_publish(AGENT, natsauth.consumer_create_subject(stream, durable, task), node=node)
    assert may_publish(AGENT, natsauth.consumer_api("MSG.NEXT", stream, durable), node=node)
    assert not may_publish(AGENT, natsauth.consumer_api("MSG.NEXT", stream, durable), node="ip-10-0-1-24.ec2.internal")


def test_the_observer_subscribes_to_facts_and_nothing_else() -> None:
    observer = natsauth.permissions(OBSERVER)
    assert observer.publish == ()
    assert observer.subscribe == (subjects.ALL_FACTS,)
    block = natsauth.authorization_block(natsauth.users({OBSERVER: "pw"}))
    assert 'publish: {deny: [">"]}' in block  # an empty allow list would allow everything


def test_commands_come_from_the_cli_the_bridge_the_loaders_resync_and_the_autoscalers_scale_only() -> None:
    for command in (subjects.DATASET_APPLY, subjects.RUNTIME_APPLY):
        assert {kind for kind in KINDS if may_publish(kind, command)} == {CLI, BRIDGE}, command
    assert {kind for kind in KINDS if may_publish(kind, subjects.DATASET_RESYNC)} == {CLI, BRIDGE, LOADER}
    # The autoscaler changes replicas only: it may not apply a runtime's spec.
    assert {kind for kind in KINDS if may_publish(kind, subjects.RUNTIME_SCALE)} == {CLI, BRIDGE, RUNTIME}


def test_the_schedulers_cache_facts_come_from_the_scheduler_and_go_to_the_dataset_service() -> None:
    """Only the scheduler folds every node's blocks: a dataset's bytes cached, each block once, are its word alone
    (the dataset service's cachedPercentage takes them), and the dataset service consumes them by its durable."""
    assert {kind for kind in KINDS if may_publish(kind, subjects.SCHEDULER_DATASET_CACHE)} == {SCHEDULER}
    durable = subjects.DURABLE_DATASET_SCHEDULER_CACHE
    assert {kind for kind in KINDS
            if may_publish(kind, natsauth.consumer_api("MSG.NEXT", subjects.STREAM_FACTS, durable))} == {DATASET}
    assert may_publish(DATASET, natsauth.consumer_create_subject(subjects.STREAM_FACTS, durable,
                                                                  subjects.SCHEDULER_DATASET_CACHE))
    assert not may_publish(SCHEDULER, subjects.DATASET_STATUS)  # the fact only: the status stays the dataset's


def test_each_bucket_is_written_by_its_owner_only() -> None:
    owners = {bucket: {kind for kind in KINDS if may_publish(kind, f"$KV.{bucket}.k")}
              for bucket in natsauth.KV_BUCKETS}
    assert owners == {
        subjects.KV_DATASETS: {DATASET}, subjects.KV_BINDINGS: {DATASET}, subjects.KV_NODE_CACHE: {DATASET},
        subjects.KV_LISTINGS: {DATASET},
        subjects.KV_RUNTIMES: {RUNTIME}, subjects.KV_AGENTS: {RUNTIME},
        subjects.KV_OPERATIONS: {LOADER}, subjects.KV_OPERATION_RUNS: {LOADER},
        subjects.KV_MEMBERS: set(),  # each service under its own keys only (below)
        subjects.KV_BRIDGE_APPLIED: {BRIDGE},
    }


def test_each_service_beats_in_the_members_bucket_under_its_own_keys_only() -> None:
    """The beats carry each service's event limit, which the CLI and the bridge trust: the dataset service wrote the
    whole bucket, so it could have stated the runtime service's limit."""
    own = {DATASET: subjects.MEMBERS_DATASET, RUNTIME: subjects.MEMBERS_RUNTIME, LOADER: subjects.MEMBERS_LOADER,
           SCHEDULER: subjects.MEMBERS_SCHEDULER}
    for kind, prefix in own.items():
        writable = {other for other in own.values()
                    if may_publish(kind, f"$KV.{subjects.KV_MEMBERS}.{other}.replica-1")}
        assert writable == {prefix}, kind


def test_the_scheduler_beats_under_its_own_member_keys_and_follows_the_inventory_without_a_durable() -> None:
    """Its replicas (libs.members, the publisher of each dataset's cache facts) write their own keys only; each one
    follows the inventory with an ordered consumer and may pull from, ack or delete no consumer of the stream."""
    members = subjects.KV_MEMBERS
    assert may_publish(SCHEDULER, f"$KV.{members}.{subjects.MEMBERS_SCHEDULER}.sched-1")
    assert not may_publish(SCHEDULER, f"$KV.{members}.dataset.sched-1")
    agent = subjects.STREAM_AGENT
    assert may_publish(SCHEDULER, f"{natsauth.API}.CONSUMER.CREATE.{agent}")
    for verb in ("MSG.NEXT", "DELETE", "INFO"):
        assert not may_publish(SCHEDULER, natsauth.consumer_api(verb, agent, subjects.DURABLE_DATASET_INVENTORY))
    assert not may_publish(SCHEDULER, f"$JS.ACK.{agent}.{subjects.DURABLE_DATASET_INVENTORY}.1.2.3.4.5")


def test_the_object_store_is_written_and_purged_by_its_writers_only() -> None:
    """The dataset service's manifests and the loader's plans: the scheduler and the agents only load them."""
    bucket, stream = subjects.OBJ_MANIFESTS, natsauth.object_stream(subjects.OBJ_MANIFESTS)
    for subject in (f"$O.{bucket}.M.x", f"$O.{bucket}.C.x", natsauth.stream_api("PURGE", stream)):
        assert {kind for kind in KINDS if may_publish(kind, subject)} == {DATASET, LOADER}, subject
    for kind in (DATASET, LOADER, SCHEDULER, AGENT, CLI):
        assert may_publish(kind, f"{natsauth.API}.DIRECT.GET.{stream}.$O.{bucket}.M.x"), kind


def test_nobody_but_the_provisioners_changes_a_stream_and_nobody_deletes_one_of_shoals_own() -> None:
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
        assert (f"- name: {natsauth.password_variable(kind)}\n" in statefulset) is (kind != AGENT)
    # Each node's agent's password: every key of Secret shoal-nats-agents, a variable name each.
    assert "name: shoal-nats-agents" in statefulset.split("envFrom:", 1)[1].split("env:", 1)[0]


def test_the_deploy_users_give_each_listed_node_its_own_agent_and_none_shared() -> None:
    """deploy/ gave every node's agent one "agent" user, which could speak for any node: now one per node listed,
    with its node's subjects only, as `shoal up --secure` gives; the loader makes those nodes' task streams."""
    written = natsauth.deploy_authorization(["node-a", "ip-10-0-1-23.ec2.internal", "node-a"])
    assert '{user: "agent-node-a", password: $SHOAL_NATS_PASSWORD_AGENT_NODE_A,' in written
    assert ('{user: "agent-ip-10-0-1-23.ec2.internal", password: '
            "$SHOAL_NATS_PASSWORD_AGENT_IP_10_0_1_23_EC2_INTERNAL,") in written
    assert written.count('{user: "agent-node-a"') == 1 and '{user: "agent",' not in written
    assert natsauth.may_publish(AGENT, subjects.agent_heartbeat("node-a"), node="node-a")
    assert not natsauth.may_publish(AGENT, subjects.agent_heartbeat("node-b"), node="node-a")
    assert f'"{natsauth.stream_api("CREATE", subjects.task_stream("node-a"))}"' in written
    assert f'"{natsauth.stream_api("CREATE", "*")}"' not in written
    # None listed (as committed): no agent may connect, and no task stream is the loader's.
    assert "agent" not in {natsauth.parse_user(line.split('"')[1])[0] for line in
                           natsauth.deploy_authorization().splitlines() if line.strip().startswith("{user:")}


def test_node_names_that_cannot_get_an_agent_user_are_refused_with_the_reason() -> None:
    assert natsauth.node_errors(["node-a", "node.a", "Node_B"]) == [
        "'Node_B' is not a node name (a DNS subdomain: lower-case letters, digits, '-' and '.')",
        "nodes 'node-a' and 'node.a' would share the password variable SHOAL_NATS_PASSWORD_AGENT_NODE_A"]
    with pytest.raises(ValueError, match="would share"):
        natsauth.deploy_authorization(["node-a", "node.a"])


def test_shoal_up_secure_gives_each_service_its_kinds_user_and_each_agent_its_nodes(tmp_path: Path) -> None:
    from libs.cli.stack.supervision import agent_plans, service_users, stack_services

    assert service_users(stack_services(1), [], "box") == {
        "dataset": DATASET, "runtime": RUNTIME, "loader": LOADER, "scheduler": SCHEDULER, "agent": "agent-box"}
    users = service_users(stack_services(2), agent_plans(2, "box", {}, tmp_path), "box")
    assert users["agent-1"] == "agent-box-1" and users["agent-2"] == "agent-box-2"
    assert natsauth.parse_user(users["agent-2"]) == (AGENT, "box-2")


# --- Consumers: each kind its own durables, an agent its node's tasks, ephemeral consumers where it reads. ---

CONSUMER_VERBS = ("INFO", "MSG.NEXT", "DELETE", "DURABLE.CREATE")


def durable_subjects(stream: str, durable: str, filter_subject: str = "shoal.x") -> list[str]:
    """Every subject that creates, changes, looks up, pulls from, acks or deletes ``durable``."""
    return [natsauth.consumer_create_subject(stream, durable), natsauth.consumer_create_subject(
        stream, durable, filter_subject), *(natsauth.consumer_api(verb, stream, durable) for verb in CONSUMER_VERBS),
        f"$JS.ACK.{stream}.{durable}.1.7.7.1700000000000000000.0"]


def test_each_services_durables_are_its_own_and_no_other_kinds() -> None:
    for owner, durables in natsauth.DURABLES.items():
        for stream, durable in durables:
            for subject in durable_subjects(stream, durable):
                users = {kind for kind in KINDS if may_publish(kind, subject)}
                users |= {AGENT for node in ("", "n1") if may_publish(AGENT, subject, node=node)}
                assert users == {owner}, (subject, users)


def test_the_reviewers_cases_are_refused() -> None:
    api = "$JS.API.CONSUMER"
    assert not may_publish(RUNTIME, f"{api}.MSG.NEXT.{subjects.STREAM_COMMANDS}.{subjects.DURABLE_DATASET_COMMANDS}")
    assert not may_publish(RUNTIME, f"{api}.DELETE.{subjects.STREAM_COMMANDS}.{subjects.DURABLE_DATASET_COMMANDS}")
    assert not may_publish(LOADER, natsauth.consumer_create_subject(
        subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS, subjects.RUNTIME_COMMANDS))
    assert not may_publish(BRIDGE, f"{api}.DELETE.{subjects.STREAM_FACTS}.{subjects.DURABLE_DATASET_RUNTIME_STATUS}")
    assert not may_publish(SCHEDULER, f"{api}.DELETE.{subjects.STREAM_AGENT}.{subjects.DURABLE_RUNTIME_HEARTBEATS}")
    for node in ("n1", ""):
        assert not may_publish(AGENT, f"{api}.DELETE.{subjects.STREAM_TASKS}.{subjects.DURABLE_LOADER_PROGRESS}",
                               node=node)
        assert not may_publish(AGENT, f"{api}.MSG.NEXT.{subjects.STREAM_TASKS}.{subjects.DURABLE_LOADER_PROGRESS}",
                               node=node)
    # An agent pulls from, acks, looks up and deletes another node's task durable no more (docs/security.md).
    theirs = f"{subjects.task_stream('n2')}.{subjects.task_durable('n2', 'default', 'd', LIFE)}"
    for verb in ("MSG.NEXT", "INFO", "DELETE"):
        assert not may_publish(AGENT, f"{api}.{verb}.{theirs}", node="n1")


def test_every_durable_a_service_attaches_to_is_its_kinds() -> None:
    """The durables named in services/<kind>/app.py are the ones ``natsauth.DURABLES`` gives that kind."""
    services = Path(__file__).resolve().parents[2] / "services"
    for kind in (DATASET, RUNTIME, LOADER, SCHEDULER, BRIDGE):
        named = set(re.findall(r"subjects\.(DURABLE_\w+)", (services / kind / "app.py").read_text()))
        assert {getattr(subjects, name) for name in named} == {
            durable for _, durable in natsauth.DURABLES.get(kind, ())}, kind
    every = {value for name, value in vars(subjects).items() if name.startswith("DURABLE_")}
    assert every == {durable for durables in natsauth.DURABLES.values() for _, durable in durables}


def test_an_agent_makes_consumers_of_its_nodes_tasks_only() -> None:
    stream = subjects.task_stream("n1")
    mine = subjects.task_durable("n1", "default", "d", LIFE)
    create_mine = natsauth.consumer_create_subject(stream, mine, subjects.node_task("n1", "default", "d", LIFE))
    assert may_publish(AGENT, create_mine, node="n1")
    assert may_publish(AGENT, create_mine)  # the DaemonSet's agent user: any node
    for subject in (natsauth.consumer_api("INFO", stream, mine), natsauth.consumer_api("MSG.NEXT", stream, mine),
                    natsauth.consumer_api("DELETE", stream, mine), f"$JS.ACK.{stream}.{mine}.1.7.7.1.0"):
        assert may_publish(AGENT, subject, node="n1"), subject
        assert may_publish(AGENT, subject), subject
    refused = [
        # a consumer over another node's tasks, or over the progress, under any name
        natsauth.consumer_create_subject(stream, mine, subjects.node_task("n2", "default", "d", LIFE)),
        natsauth.consumer_create_subject(stream, "mine", subjects.TASK_PROGRESS),
        natsauth.consumer_create_subject(stream, "mine"), natsauth.consumer_create_subject(stream, "mine", ">"),
        # ephemeral (no filter in the subject), the legacy durable form, single messages of the stream
        f"$JS.API.CONSUMER.CREATE.{stream}", natsauth.consumer_api("DURABLE.CREATE", stream, mine),
        natsauth.stream_api("MSG.GET", stream), f"$JS.API.DIRECT.GET.{stream}",
        # its own task stream's settings: the loader makes it, with the node's subjects
        *(natsauth.stream_api(verb, stream) for verb in ("CREATE", "UPDATE", "DELETE", "PURGE")),
        # the loader's durable on the progress stream, in any way
        *durable_subjects(subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS,
                          subjects.node_task("n1", "default", "d", LIFE)),
        # any other stream's durables
        *durable_subjects(subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS),
    ]
    for subject in refused:
        assert not may_publish(AGENT, subject, node="n1"), subject


def test_an_agent_gets_nothing_of_another_nodes_task_consumers() -> None:
    """Every request about a consumer names its stream; a node's consumers are on the node's stream only."""
    theirs_stream = subjects.task_stream("n2")
    theirs = subjects.task_durable("n2", "default", "d", LIFE)
    tasks_of = {node: subjects.node_task(node, "default", "d", LIFE) for node in ("n1", "n2")}
    for subject in (natsauth.consumer_api("INFO", theirs_stream, theirs),
                    natsauth.consumer_api("MSG.NEXT", theirs_stream, theirs),
                    natsauth.consumer_api("DELETE", theirs_stream, theirs),
                    natsauth.consumer_create_subject(theirs_stream, theirs, tasks_of["n2"]),
                    natsauth.consumer_create_subject(theirs_stream, theirs, tasks_of["n1"]),
                    f"$JS.ACK.{theirs_stream}.{theirs}.1.7.7.1.0",
                    f"$JS.ACK.dom.acc.{theirs_stream}.{theirs}.1.7.7.1.0",
                    natsauth.stream_api("INFO", theirs_stream)):
        assert not may_publish(AGENT, subject, node="n1"), subject
        assert may_publish(LOADER, subjects.node_task("n2", "default", "d", LIFE))
    # Node tokens never make one node's stream another's: a dotted name becomes underscores, never a prefix.
    assert subjects.task_stream("a.b") != subjects.task_stream("a")


def test_the_shared_agent_user_reaches_no_consumer_of_shoals_own_streams() -> None:
    """The DaemonSet's agent user may use any node's task consumers (their streams' names are not known), and no
    named consumer of any stream Shoal provisions, but what a KV watch looks up."""
    for stream in natsauth.ALL_STREAMS:
        for subject in (natsauth.consumer_api("MSG.NEXT", stream, "x"), natsauth.consumer_api("DELETE", stream, "x"),
                        f"$JS.ACK.{stream}.x.1.7.7.1.0", f"$JS.ACK.d.a.{stream}.x.1.7.7.1.0",
                        natsauth.consumer_create_subject(stream, "x", subjects.node_task("n1", "default", "d", LIFE))):
            assert not may_publish(AGENT, subject), subject
    assert may_publish(AGENT, natsauth.consumer_api("INFO", natsauth.kv_stream(subjects.KV_DATASETS), "watch"))
    assert not may_publish(AGENT, natsauth.consumer_api("INFO", subjects.STREAM_COMMANDS, "x"))


def test_the_loader_makes_the_nodes_task_streams() -> None:
    for nodes in (None, ("n1", "a.b")):  # nodes not known (deploy/), or known (shoal up)
        for verb in ("CREATE", "UPDATE", "INFO"):
            assert may_publish(LOADER, natsauth.stream_api(verb, subjects.task_stream("n1")), nodes=nodes)
            assert may_publish(LOADER, natsauth.stream_api(verb, subjects.task_stream("a.b")), nodes=nodes)
            for kind in (DATASET, RUNTIME, SCHEDULER, BRIDGE, OBSERVER):
                assert not may_publish(kind, natsauth.stream_api(verb, subjects.task_stream("n1")), nodes=nodes), kind
        # It deletes a gone node's stream (``LoaderHandlers.prune_task_streams``), and purges none.
        assert may_publish(LOADER, natsauth.stream_api("DELETE", subjects.task_stream("n1")), nodes=nodes)
        assert not may_publish(LOADER, natsauth.stream_api("PURGE", subjects.task_stream("n1")), nodes=nodes)
        for stream in natsauth.ALL_STREAMS:  # whatever the nodes: none of Shoal's own streams
            assert not may_publish(LOADER, natsauth.stream_api("DELETE", stream), nodes=nodes), stream
        assert may_publish(LOADER, subjects.node_task("a.b", "default", "d", LIFE), nodes=nodes)


def test_with_the_nodes_known_the_loader_makes_their_task_streams_and_no_other_stream() -> None:
    """``shoal up --secure``: every agent has its user, so the loader's streams are named, one per node."""
    nodes = ("n1", "n2")
    for verb in ("CREATE", "UPDATE"):
        for stream in (subjects.task_stream("n3"), "ANY", subjects.TASK_STREAM_PREFIX, f"{subjects.STREAM_TASKS}_x"):
            assert not may_publish(LOADER, natsauth.stream_api(verb, stream), nodes=nodes), stream
        # Shoal's own streams it provisions, as every control-plane service does.
        assert may_publish(LOADER, natsauth.stream_api(verb, subjects.STREAM_COMMANDS), nodes=nodes)
    assert not may_publish(LOADER, subjects.node_task("n3", "default", "d", LIFE), nodes=nodes)
    # The CLI reads the nodes' task streams, and no other stream outside Shoal's.
    assert may_publish(CLI, f"$JS.API.CONSUMER.CREATE.{subjects.task_stream('n2')}", nodes=nodes)
    assert not may_publish(CLI, f"$JS.API.CONSUMER.CREATE.{subjects.task_stream('n3')}", nodes=nodes)
    assert not may_publish(CLI, natsauth.stream_api("INFO", "ANY"), nodes=nodes)


def test_the_nodes_are_known_when_every_agent_has_its_own_user() -> None:
    assert natsauth.agent_nodes([LOADER, "agent-n1", CLI, "agent-a.b"]) == ("n1", "a.b")
    assert natsauth.agent_nodes([LOADER, CLI]) == ()
    assert natsauth.agent_nodes([LOADER, "agent-n1", AGENT]) is None  # the shared user: any node connects
    shoal_up = natsauth.authorization_block(natsauth.users({LOADER: "pw", "agent-n1": "pw", "agent-n2": "pw"}))
    deploy = natsauth.authorization_block(natsauth.users({LOADER: "pw", AGENT: "pw"}))
    assert '"$JS.API.STREAM.CREATE.*"' in deploy and '"shoal.task.node.>"' in deploy
    assert '"$JS.API.STREAM.CREATE.*"' not in shoal_up and '"shoal.task.node.>"' not in shoal_up
    for node in ("n1", "n2"):
        assert f'"$JS.API.STREAM.CREATE.{subjects.task_stream(node)}"' in shoal_up
        assert f'"{subjects.node_tasks(node)}"' in shoal_up


def test_ephemeral_consumers_where_a_kind_reads_and_no_named_one() -> None:
    """KV watches and object gets (ordered consumers, created unnamed on ``CONSUMER.CREATE.<stream>``)."""
    for kind in (DATASET, RUNTIME, LOADER, SCHEDULER, BRIDGE, AGENT, CLI):
        assert may_publish(kind, f"$JS.API.CONSUMER.CREATE.{natsauth.kv_stream(subjects.KV_DATASETS)}"), kind
        reads_objects = kind not in (RUNTIME, BRIDGE)  # the two that read no manifest
        assert may_publish(kind, f"$JS.API.CONSUMER.CREATE.{natsauth.object_stream(subjects.OBJ_MANIFESTS)}") == (
            reads_objects), kind
        assert not may_publish(kind, f"$JS.API.CONSUMER.CREATE.{natsauth.kv_stream(subjects.KV_DATASETS)}.w.x")
        assert not may_publish(kind, f"$JS.API.CONSUMER.MSG.NEXT.{natsauth.kv_stream(subjects.KV_DATASETS)}.w")
    # The bridge's rejections and `shoal events --all`: ordered consumers of the facts (the CLI: of any stream).
    assert may_publish(BRIDGE, f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_FACTS}")
    for stream in natsauth.ALL_STREAMS:
        assert may_publish(CLI, f"$JS.API.CONSUMER.CREATE.{stream}")
    # The CLI reads what is stored; it pulls from, acks or deletes nobody's durable.
    for durables in natsauth.DURABLES.values():
        for stream, durable in durables:
            assert not any(may_publish(CLI, subject) for subject in durable_subjects(stream, durable))


def test_the_create_subject_is_the_one_nats_py_sends() -> None:
    """``consumer_create_subject`` (the durables' permissions) against nats-py's own ``add_consumer``."""
    from nats.js import api as js_api
    from nats.js.manager import JetStreamManager

    sent: list[str] = []

    class Stub:
        connected_server_version = type("V", (), {"major": 2, "minor": 15})()

    class Recording(JetStreamManager):
        async def _api_request(self, req_subject: str, req: bytes = b"", timeout: float = 5) -> dict[str, Any]:
            sent.append(req_subject)
            raise RuntimeError("recorded")

    manager = Recording(Stub())  # type: ignore[arg-type]
    stream, durable = subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS
    for filter_subject, filter_subjects in ((subjects.DATASET_COMMANDS, None), (None, subjects.OPERATION_COMMANDS),
                                            (None, None)):
        config = js_api.ConsumerConfig(name=durable, durable_name=durable, filter_subject=filter_subject,
                                       filter_subjects=filter_subjects)
        with pytest.raises(RuntimeError, match="recorded"):
            asyncio.run(manager.add_consumer(stream, config=config))
        assert sent[-1] == natsauth.consumer_create_subject(stream, durable, filter_subject)
        assert may_publish(LOADER, sent[-1])
    with pytest.raises(RuntimeError, match="recorded"):  # an ordered consumer: no name
        asyncio.run(manager.add_consumer(stream, config=js_api.ConsumerConfig(filter_subject=subjects.ALL_FACTS)))
    assert sent[-1] == f"$JS.API.CONSUMER.CREATE.{stream}"


def test_the_agents_deny_list_reaches_the_server_block() -> None:
    block = natsauth.authorization_block(natsauth.users({"agent": "pw", "agent-n1": "pw", LOADER: "pw"}))
    shared, own, _ = (line for line in block.splitlines() if "publish:" in line)
    assert "deny: [" in shared and f"{subjects.STREAM_TASKS}.*" in shared
    assert "deny: [" not in own and f"{subjects.task_stream('n1')}.*" in own
