"""Who may do what on NATS: one user per process kind, its subject permissions, and the server's auth block.

Pure (no I/O): ``permissions`` derives what each kind of process may publish and subscribe from the names in
``libs.subjects`` (streams, durables, KV buckets, the Object Store) and from the JetStream API subjects the client
library uses for them; ``authorization_block`` writes nats-server's ``authorization { users = [...] }`` from it.
``shoal up --secure``, ``deploy/nats-secure/auth.conf`` (written by ``make nats-auth``) and the tests all take it
from here, so a permission changes in one place.

The rules it encodes:
- A process publishes only the events it produces: the dataset service the dataset facts, an agent its own
  heartbeats, inventory and task progress (with a node: only that node's subjects), never a command. Commands come
  from the CLI user, the bridge (Kubernetes), and the loader's resync of a dataset it loaded.
- KV buckets are written only by their owner (``$KV.<bucket>.>``); reading is allowed to every process kind but the
  observer (records hold no secrets: docs/security.md).
- Streams and buckets are created and updated (``provision``) by the control-plane services and the CLI/admin user,
  never by an agent: an agent that could update a stream could shorten its retention or change its subjects.
  Nobody deletes a stream but the loader a gone node's task stream (never one of Shoal's own); only the manifests'
  writers purge (theirs: an object put replaces its chunks, and old delete markers go: ``libs.markers``), only a
  bucket's owner purges its stream (its old delete markers), and only the dataset service deletes a message (a
  command that carried a secret in clear).
- A service creates, looks up, pulls from, acks and deletes its own durable consumers only (``DURABLES``: every
  JetStream API subject names the durable), never another kind's; an agent (``agent-<node>``) only consumers of its
  node's task stream (``subjects.task_stream``), and no service's. The loader creates and updates the nodes' task
  streams, and publishes into them: where every agent has a user of its own (``shoal up --secure``, and
  ``deploy/nats-secure`` written for the cluster's nodes: ``deploy_authorization``), the nodes are known when the
  users are written (``agent_nodes``) and the loader may make exactly their streams, by name; where agents share
  the ``agent`` user (a config written by hand), any node may connect, and any stream's name is allowed to it, as a
  NATS wildcard is a whole token and ``SHOAL_TASKS_*`` would be one literal name (what a stream captures is in the
  request body, which no permission sees: docs/security.md says what that leaves possible). Ephemeral, ordered
  consumers (KV watches, object gets, ``shoal events``, the bridge's rejections) are created without a name on the
  streams a user reads.
- Replies go to a per-user inbox, ``_INBOX.<user>.>`` (``inbox_prefix``: ``libs.bus.connect`` sets it from
  ``NATS_USER``), so a user cannot read the replies another user's requests get (KV reads, publish acks).
- The observer subscribes to facts (``shoal.evt.>``) and nothing else; it cannot publish at all.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from libs import subjects
from libs.events.common import DNS1123_SUBDOMAIN

# --- The process kinds: one NATS user each. ---
DATASET = "dataset"
RUNTIME = "runtime"
LOADER = "loader"
SCHEDULER = "scheduler"
BRIDGE = "bridge"
# The node agent and its mount processes (children with the agent's environment): one user.
AGENT = "agent"
CLI = "cli"
OBSERVER = "observer"
KINDS: tuple[str, ...] = (DATASET, RUNTIME, LOADER, SCHEDULER, BRIDGE, AGENT, CLI, OBSERVER)

INBOX_ROOT = "_INBOX"
API = "$JS.API"

# Every stream Shoal provisions: its own, and the ones behind the KV buckets and the Object Store.
KV_BUCKETS = (subjects.KV_DATASETS, subjects.KV_RUNTIMES, subjects.KV_AGENTS, subjects.KV_BINDINGS,
               subjects.KV_NODE_CACHE, subjects.KV_LISTINGS, subjects.KV_OPERATIONS, subjects.KV_OPERATION_RUNS,
               subjects.KV_MEMBERS, subjects.KV_BRIDGE_APPLIED)
_STREAMS = (subjects.STREAM_COMMANDS, subjects.STREAM_FACTS, subjects.STREAM_AGENT, subjects.STREAM_TASKS,
            subjects.STREAM_DEAD_LETTERS)


def stream_api(verb: str, stream: str) -> str:
    """The JetStream API subject of a stream operation: ``$JS.API.STREAM.<verb>.<stream>``."""
    return f"{API}.STREAM.{verb}.{stream}"


def consumer_api(verb: str, stream: str, consumer: str) -> str:
    """The JetStream API subject of an operation on one consumer: ``$JS.API.CONSUMER.<verb>.<stream>.<consumer>``
    (``INFO``, ``MSG.NEXT``, ``DELETE``; creating it: ``consumer_create_subject``)."""
    return f"{API}.CONSUMER.{verb}.{stream}.{consumer}"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


ALL_STREAMS: tuple[str, ...] = (*_STREAMS, *(kv_stream(b) for b in KV_BUCKETS),
                                object_stream(subjects.OBJ_MANIFESTS))


@dataclass(frozen=True)
class Permissions:
    """What one user may publish and subscribe (nats-server's ``permissions``); ``responses``: it may answer
    requests it received (``allow_responses``), whatever their reply subject. ``deny``: subjects refused to it
    although ``publish`` matches them (nats-server's publish ``deny``, which wins over ``allow``)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class User:
    name: str
    password: str
    permissions: Permissions = field(default_factory=Permissions)


def user_name(kind: str, node: str = "") -> str:
    """The NATS user of a kind; an agent with a node gets its own (``agent-<node>``), limited to that node."""
    if kind not in KINDS:
        raise ValueError(f"unknown process kind {kind!r}: one of {', '.join(KINDS)}")
    return f"{kind}-{node}" if node else kind


def agent_nodes(user_names: Iterable[str]) -> tuple[str, ...] | None:
    """The nodes whose agents may connect as one of ``user_names``: each ``agent-<node>`` user's node, or None (any
    node) when the shared ``agent`` user is among them, as any node's agent may connect as that one."""
    nodes: list[str] = []
    for name in user_names:
        kind, node = parse_user(name)
        if kind == AGENT and not node:
            return None
        if node:
            nodes.append(node)
    return tuple(dict.fromkeys(nodes))


def _task_streams(nodes: Iterable[str] | None) -> list[str]:
    """The nodes' task streams by name; ``*`` (any stream: a stream name is one token) when the nodes are not known."""
    return ["*"] if nodes is None else [subjects.task_stream(node) for node in nodes]


def _node_tasks(nodes: Iterable[str] | None) -> list[str]:
    """The nodes' task subjects (what their streams capture); every node's when the nodes are not known."""
    return [f"{subjects.TASK_PREFIX}.>"] if nodes is None else [subjects.node_tasks(node) for node in nodes]


def inbox_prefix(user: str) -> str:
    """The inbox every reply to ``user`` arrives on (nats-py's ``inbox_prefix``)."""
    return f"{INBOX_ROOT}.{user}"


# --- Every durable consumer of the services, by kind: the names their processes attach to (``services/*/app.py``
# through ``libs.bus.Consumer``). A kind may create, look up, pull from, ack and delete these and no other durable.
# The agents' durables are named per mount (``subjects.task_durable``): ``_agent``.
DURABLES: dict[str, tuple[tuple[str, str], ...]] = {
    DATASET: ((subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS),
              (subjects.STREAM_FACTS, subjects.DURABLE_DATASET_RUNTIME_STATUS),
              (subjects.STREAM_AGENT, subjects.DURABLE_DATASET_INVENTORY),
              (subjects.STREAM_FACTS, subjects.DURABLE_DATASET_SCHEDULER_CACHE)),
    RUNTIME: ((subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS),
              (subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS)),
    LOADER: ((subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS),
             (subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS)),
    # None: every replica follows the inventory whole, with an ordered consumer of its own (``_ephemeral``).
    SCHEDULER: (),
}


# --- JetStream API subjects, by what the process does with a stream. ---


def _read_stream(stream: str) -> list[str]:
    """Look a stream up and get single messages (KV get: direct or not)."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}.>"]


def _durable(stream: str, durable: str) -> list[str]:
    """Create, update, look up, pull from, ack and delete one durable consumer of a stream, and no other consumer.

    nats-py (2.x, against nats-server 2.9 or later) creates a consumer that has a name on
    ``CONSUMER.CREATE.<stream>.<name>``, followed by its filter subject when it has exactly one
    (``consumer_create_subject``); ``DURABLE.CREATE`` is the older form, for a durable without a name. The server
    takes the name from the subject and refuses a request whose durable name or filter differs from it, so a
    user allowed these subjects creates or changes only this durable. Acks carry stream and consumer:
    ``$JS.ACK.<stream>.<consumer>.<...>`` (and ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<...>`` on a
    server with the v2 ack format turned on).
    """
    create = consumer_create_subject(stream, durable)
    return [create, f"{create}.>", consumer_api("DURABLE.CREATE", stream, durable),
            *(consumer_api(verb, stream, durable) for verb in ("INFO", "MSG.NEXT", "DELETE")),
            f"$JS.ACK.{stream}.{durable}.>", f"$JS.ACK.*.*.{stream}.{durable}.>"]


def _ephemeral(stream: str) -> list[str]:
    """Ordered (ephemeral, push) consumers of a stream: a KV watch, an object get, ``shoal events --all``, the
    bridge's rejections. nats-py creates them without a name on ``CONSUMER.CREATE.<stream>`` (the server names
    them, and refuses a durable there); they ack nothing and only answer flow control. No look-up, pull, ack or
    delete of any named consumer comes with it."""
    return [f"{API}.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>", f"$JS.FC.*.*.{stream}.>"]


def consumer_create_subject(stream: str, name: str, filter_subject: str | None = None) -> str:
    """The subject nats-py (2.x, nats-server 2.9 or later) creates or updates the named consumer ``name`` on:
    with exactly one filter subject (not ``>``) it follows the name, with none or several it does not."""
    subject = f"{API}.CONSUMER.CREATE.{stream}.{name}"
    return f"{subject}.{filter_subject}" if filter_subject and filter_subject != ">" else subject


def _read_kv(bucket: str) -> list[str]:
    """Get a bucket's keys and watch it: a watch looks its own ordered consumer up (nats-py, for the number of
    initial values), under the name the server gave it, so looking up any consumer of a bucket's stream is allowed;
    those streams hold no durable."""
    stream = kv_stream(bucket)
    return [*_read_stream(stream), *_ephemeral(stream), consumer_api("INFO", stream, "*")]


def _write_kv(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _sweep_kv(buckets: Iterable[str]) -> list[str]:
    """Purge the old delete markers of its own buckets (``libs.markers``: a filtered purge of the bucket's stream)."""
    return [stream_api("PURGE", kv_stream(bucket)) for bucket in buckets]


def _read_objects(bucket: str) -> list[str]:
    # nats-py's object get subscribes by subject without naming the stream, so it looks the stream up first.
    return [f"{API}.STREAM.NAMES", *_read_stream(object_stream(bucket)), *_ephemeral(object_stream(bucket))]


def _write_objects(bucket: str) -> list[str]:
    # A put replaces an object's earlier chunks with a filtered purge of the bucket's stream. Its old delete markers
    # are purged too (``libs.markers``), found with a watch of the meta subjects, which looks its own ordered consumer
    # up as a KV watch does (the stream holds no durable).
    stream = object_stream(bucket)
    return [f"$O.{bucket}.>", f"{API}.STREAM.PURGE.{stream}", consumer_api("INFO", stream, "*")]


def _provision() -> list[str]:
    """Create and update Shoal's streams and buckets (``Bus.provision``), and nothing else's."""
    return [stream_api(verb, stream) for stream in ALL_STREAMS for verb in ("CREATE", "UPDATE", "INFO")]


def _info_all() -> list[str]:
    """Look up any of Shoal's streams: what ``Bus.provision`` does first (it updates only a stream that differs)."""
    return [stream_api("INFO", stream) for stream in ALL_STREAMS]


def _read_all_kv() -> list[str]:
    return [subject for bucket in KV_BUCKETS for subject in _read_kv(bucket)]


def _dead_letters(*consumers: tuple[str, str]) -> list[str]:
    """Where a service's consumers put what they gave up on (``subjects.dead_letter``)."""
    return [subjects.dead_letter(stream, durable) for stream, durable in consumers]


def _service(consumers: Iterable[tuple[str, str]], publish: Iterable[str], kv_writes: Iterable[str] = (),
             objects: Literal["", "read", "write"] = "", subscribe: Iterable[str] = (),
             responses: bool = False, sweeps: Iterable[str] = (), members: str = "") -> Permissions:
    """A control-plane service: provisions, reads every bucket, runs its durable consumers, writes its buckets;
    ``objects``: "read" or "write" the Object Store (manifests, the loader's plans), "" neither."""
    consumers = list(consumers)
    allowed = [*publish, *_provision(), *_read_all_kv(), *_dead_letters(*consumers)]
    for stream, durable in consumers:
        allowed += _durable(stream, durable)
    for bucket in kv_writes:
        allowed += _write_kv(bucket)
    allowed += _sweep_kv(sweeps)
    if members:  # its replicas' beats (``libs.members``), under their own keys only
        allowed.append(f"$KV.{subjects.KV_MEMBERS}.{members}.*")
    if objects:
        allowed += _read_objects(subjects.OBJ_MANIFESTS)
    if objects == "write":
        allowed += _write_objects(subjects.OBJ_MANIFESTS)
    return Permissions(publish=_unique(allowed), subscribe=tuple(subscribe), responses=responses)


def permissions(kind: str, node: str = "", nodes: Iterable[str] | None = None) -> Permissions:
    """Everything ``kind`` may publish and subscribe, besides its own inbox (``authorization_block`` adds that).

    ``node`` (agents only) limits an agent to that node's heartbeat, inventory and progress subjects. ``nodes``: the
    nodes whose agents may connect (``agent_nodes``), whose task streams are the only ones the loader makes and
    sends parts into and the CLI reads; None when they are not known (any node's, any stream's name).
    """
    nodes = None if nodes is None else tuple(nodes)
    if kind == DATASET:
        return _service(
            consumers=DURABLES[DATASET],
            # It erases an apply that carried a secret in clear from the command stream (docs/security.md).
            publish=[subjects.DATASET_FACTS, subjects.INVENTORY_REQUEST,
                     stream_api("MSG.DELETE", subjects.STREAM_COMMANDS)],
            kv_writes=[subjects.KV_DATASETS, subjects.KV_BINDINGS, subjects.KV_NODE_CACHE, subjects.KV_LISTINGS],
            objects="write", sweeps=subjects.SWEPT_BY_DATASET,
            # Its replicas beat in shoal_members under their own keys only: the other services' beats there carry
            # their event limits, which the CLI and the bridge trust.
            members=subjects.MEMBERS_DATASET)
    if kind == RUNTIME:
        return _service(
            consumers=DURABLES[RUNTIME],
            # Its autoscaler changes replicas the way `shoal scale` does: a scale command, which changes replicas
            # only (never an apply: it has no spec of its own to send).
            publish=[subjects.RUNTIME_FACTS, subjects.RUNTIME_SCALE],
            kv_writes=[subjects.KV_RUNTIMES, subjects.KV_AGENTS], sweeps=subjects.SWEPT_BY_RUNTIME,
            # Its replicas beat in shoal_members, under their own keys only (their event limit, for the CLI).
            members=subjects.MEMBERS_RUNTIME)
    if kind == LOADER:
        perms = _service(
            consumers=DURABLES[LOADER],
            # A DataLoad with loadMetadata lists the dataset again (a resync command); tasks go to the agents, each
            # node's into a stream the loader makes before the node's first part (``Bus.provision_node_tasks``: it
            # looks the stream up, creates it, and updates it when its settings differ). A stream's name is one
            # token and a wildcard a whole one ("SHOAL_TASKS_*" is a literal name to the server), so with the
            # nodes not known "SHOAL_TASKS_<any node>" can only be said as any stream. It deletes the stream of a
            # node gone with no part waiting (``LoaderHandlers.prune_task_streams``), and lists the streams' names
            # once at start for those an earlier loader made (STREAM.NAMES, as reading the manifests needs).
            publish=[subjects.DATALOAD_FACTS, subjects.DATACLEAN_FACTS, subjects.DATASET_RESYNC,
                     *_node_tasks(nodes), subjects.TASK_CANCEL,
                     *(stream_api(verb, stream) for stream in _task_streams(nodes)
                       for verb in ("CREATE", "UPDATE", "INFO", "DELETE"))],
            kv_writes=[subjects.KV_OPERATIONS, subjects.KV_OPERATION_RUNS], objects="write",
            sweeps=subjects.SWEPT_BY_LOADER, members=subjects.MEMBERS_LOADER)
        # Any stream's delete, with the nodes not known: never one of Shoal's own.
        return replace(perms, deny=tuple(stream_api("DELETE", stream) for stream in ALL_STREAMS))
    if kind == SCHEDULER:
        return _service(
            consumers=DURABLES[SCHEDULER],
            # It loads manifests and writes none: no object put, no purge of the manifests' stream. Its facts: a
            # dataset's cached bytes, each block once (the dataset service's cachedPercentage).
            # The inventory: every replica follows it whole with an ordered consumer of its own (ephemeral: it reads
            # and acks nothing else). Its replicas beat in shoal_members, under their own keys only (which one
            # publishes a dataset's facts).
            publish=[subjects.INVENTORY_REQUEST, subjects.SCHEDULER_FACTS, *_ephemeral(subjects.STREAM_AGENT),
                     f"$KV.{subjects.KV_MEMBERS}.{subjects.MEMBERS_SCHEDULER}.*"], objects="read",
            subscribe=[subjects.SCHED_SCORE], responses=True)
    if kind == BRIDGE:
        # Kubernetes is where the bridge's commands come from; it shows rejections on the custom resources.
        # Its one bucket: the apply it last published per object, so a restart republishes nothing unchanged.
        perms = _service(consumers=[], publish=[subjects.ALL_COMMANDS], kv_writes=[subjects.KV_BRIDGE_APPLIED],
                         sweeps=subjects.SWEPT_BY_BRIDGE)
        # Its subscription names no stream: nats-py looks the stream up by subject (STREAM.NAMES).
        return Permissions(publish=_unique([*perms.publish, f"{API}.STREAM.NAMES",
                                            *_read_stream(subjects.STREAM_FACTS), *_ephemeral(subjects.STREAM_FACTS)]))
    if kind == AGENT:
        return _agent(node)
    if kind == CLI:
        # The nodes' task streams too (``subjects.task_stream``): any stream when the nodes are not known.
        return Permissions(publish=_unique([
            subjects.ALL_COMMANDS, subjects.SCHED_SCORE, *_provision(), f"{API}.INFO", f"{API}.STREAM.NAMES",
            f"{API}.STREAM.LIST",
            *(s for stream in (*ALL_STREAMS, *_task_streams(nodes)) for s in _read_stream(stream) + _ephemeral(stream)),
            *_read_all_kv(),
        ]), subscribe=("shoal.>",))
    if kind == OBSERVER:
        return Permissions(subscribe=(subjects.ALL_FACTS,))
    raise ValueError(f"unknown process kind {kind!r}: one of {', '.join(KINDS)}")


def _agent(node: str) -> Permissions:
    """The agent and its mount processes: their node's events out; tasks, cancels, snapshot requests in; reads."""
    node_token = subjects.node_token(node) if node else "*"
    publish = [
        subjects.agent_heartbeat(node_token), subjects.agent_inventory(node_token),
        subjects.task_progress(node_token), *_info_all(),
        *_read_kv(subjects.KV_DATASETS), *_read_kv(subjects.KV_RUNTIMES), *_read_kv(subjects.KV_OPERATIONS),
        *_read_objects(subjects.OBJ_MANIFESTS), *_task_consumers(node),
    ]
    # The DaemonSet's one agent user (no node) may use the consumers of any node's task stream, whose names it
    # cannot spell: its wildcards match Shoal's own streams too, where it gets nothing but what reading the buckets
    # and manifests above needs (no service's durable, nor any other consumer of theirs).
    deny = [] if node else _not_task_streams()
    # The server's advisory that the node's task stream was made (the shared user: any stream's, names only).
    made = subjects.task_stream_made(node) if node else f"{subjects.STREAM_MADE_PREFIX}.*"
    return Permissions(publish=_unique(publish), subscribe=(subjects.INVENTORY_REQUEST, subjects.TASK_CANCEL, made),
                       deny=_unique(deny))


def _task_consumers(node: str) -> list[str]:
    """The mount processes' task durables (``subjects.task_durable``: one per node and dataset, made by nats-py's
    ``pull_subscribe`` with the mount's task subject as its one filter) on the node's task stream
    (``subjects.task_stream``), and on no other stream.

    Looking up, pulling from, acking and deleting a consumer name the stream and the consumer only; the stream is the
    node's, so ``agent-<node>`` can do these to its own node's consumers and to no other node's. Creating or changing
    one is allowed only with a filter within the node's tasks (``CONSUMER.CREATE.<stream>.<name>.shoal.task.node.
    <node>.>``), none unnamed or in the legacy (``DURABLE.CREATE``) form, nor single messages of the stream. Without
    a node (the DaemonSet's shared user) the stream is any stream (``_agent`` denies Shoal's own).
    """
    stream = subjects.task_stream(node) if node else "*"
    node_token = subjects.node_token(node) if node else "*"
    return [f"{API}.CONSUMER.CREATE.{stream}.*.{subjects.TASK_PREFIX}.{node_token}.>",
            f"{API}.CONSUMER.INFO.{stream}.*", f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{API}.CONSUMER.DELETE.{stream}.*", f"$JS.ACK.{stream}.*.>", f"$JS.ACK.*.*.{stream}.*.>"]


def _not_task_streams() -> list[str]:
    """What the shared agent user's task-consumer wildcards must not reach: any named consumer of Shoal's streams
    (creating one there is refused by the server anyway: a filter within the tasks is not within those streams), but
    looking up the ordered consumers of the buckets' streams, which a KV watch does (``_read_kv``)."""
    denied: list[str] = []
    for stream in ALL_STREAMS:
        denied += [consumer_api("MSG.NEXT", stream, "*"), consumer_api("DELETE", stream, "*"),
                   consumer_api("DURABLE.CREATE", stream, "*"), f"{consumer_create_subject(stream, '*')}.>",
                   f"$JS.ACK.{stream}.>", f"$JS.ACK.*.*.{stream}.>"]
        if stream not in {kv_stream(bucket) for bucket in KV_BUCKETS}:
            denied.append(consumer_api("INFO", stream, "*"))
    return denied


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_user(name: str) -> tuple[str, str]:
    """The kind and node of a user name: a kind, or ``agent-<node>``."""
    if name in KINDS:
        return name, ""
    prefix = f"{AGENT}-"
    if name.startswith(prefix) and len(name) > len(prefix):
        return AGENT, name[len(prefix):]
    raise ValueError(f"unknown NATS user {name!r}: a process kind ({', '.join(KINDS)}) or {AGENT}-<node>")


def users(passwords: Mapping[str, str]) -> list[User]:
    """One user per entry of ``passwords`` (user name → password), with its kind's permissions; the nodes whose task
    streams the loader makes are those of the agent users among them (``agent_nodes``)."""
    nodes = agent_nodes(passwords)
    return [User(name, password, permissions(*parse_user(name), nodes=nodes)) for name, password in passwords.items()]


def authorization_block(users_: Iterable[User]) -> str:
    """nats-server's ``authorization { users = [...] }`` for ``users_``; every user may also subscribe to its
    inbox. Passwords that start with ``$`` are written bare: nats-server reads them from its environment
    (``deploy/nats``: each from a Secret), so the file holds no secret."""
    lines = ["authorization {", "  users = ["]
    for user in users_:
        perms = user.permissions
        subscribe = [*perms.subscribe, f"{inbox_prefix(user.name)}.>"]
        password = user.password if user.password.startswith("$") else json.dumps(user.password)
        lines.append(f"    {{user: {json.dumps(user.name)}, password: {password}, permissions: {{")
        # An empty allow list would allow everything: a user that publishes nothing is denied everything instead.
        if not perms.publish:
            publish = '{deny: [">"]}'
        elif perms.deny:
            publish = f"{{allow: {_list(perms.publish)}, deny: {_list(perms.deny)}}}"
        else:
            publish = f"{{allow: {_list(perms.publish)}}}"
        lines.append(f"      publish: {publish}")
        lines.append(f"      subscribe: {{allow: {_list(subscribe)}}}")
        if perms.responses:
            lines.append("      allow_responses: true")
        lines.append("    }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more at the end."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def may_publish(kind: str, subject: str, node: str = "", nodes: Iterable[str] | None = None) -> bool:
    """Whether nats-server lets ``kind`` (an agent: of ``node``; ``nodes``: as ``permissions``) publish ``subject``:
    an allow matches, no deny does."""
    perms = permissions(kind, node, nodes)
    return (any(matches(pattern, subject) for pattern in perms.publish)
            and not any(matches(pattern, subject) for pattern in perms.deny))


def password_variable(kind: str, node: str = "") -> str:
    """The environment variable nats-server reads a user's password from in ``deploy/``: a kind's from Secret
    ``shoal-nats-users``, key ``<kind>``; a node's agent's (``agent-<node>``) from Secret ``shoal-nats-agents``,
    whose keys are these names: ``SHOAL_NATS_PASSWORD_AGENT``, ``_`` and the node's name upper-cased, each ``-``
    and ``.`` an ``_`` (a variable's name holds neither)."""
    suffix = kind.upper() + (f"_{re.sub(r'[^A-Z0-9]', '_', node.upper())}" if node else "")
    return f"SHOAL_NATS_PASSWORD_{suffix}"


def node_errors(nodes: Sequence[str]) -> list[str]:
    """Why ``nodes`` cannot each get an agent user in ``deploy/``: a name that is no Kubernetes node's (a DNS
    subdomain), or two whose password variables would be one (``node-a`` and ``node.a``)."""
    errors = [f"{node!r} is not a node name (a DNS subdomain: lower-case letters, digits, '-' and '.')"
              for node in nodes if not DNS1123_SUBDOMAIN.fullmatch(node) or len(node) > 253]
    seen: dict[str, str] = {}
    for node in dict.fromkeys(nodes):
        variable = password_variable(AGENT, node)
        if variable in seen:
            errors.append(f"nodes {seen[variable]!r} and {node!r} would share the password variable {variable}")
        seen.setdefault(variable, node)
    return errors


def deploy_authorization(nodes: Sequence[str] = ()) -> str:
    """``deploy/nats-secure/auth.conf``: every service kind's user, the CLI's and the observer's, and one agent
    user per node of ``nodes`` (``agent-<node>``: its node's subjects only, as ``shoal up --secure`` gives), no
    shared ``agent`` user; passwords from the environment (``password_variable``). ValueError for bad node names
    (``node_errors``). Without nodes no agent may connect, and the loader makes no node's task stream: written
    so in the repository (a test checks it is current), an operator writes it for the cluster's nodes
    (``python -m libs.natsauth NODE...``, docs/kubernetes.md)."""
    nodes = tuple(dict.fromkeys(nodes))
    errors = node_errors(nodes)
    if errors:
        raise ValueError("; ".join(errors))
    passwords = {kind: f"${password_variable(kind)}" for kind in KINDS if kind != AGENT}
    passwords |= {user_name(AGENT, node): f"${password_variable(AGENT, node)}" for node in nodes}
    header = ("# Generated by `python -m libs.natsauth [NODE...]` from libs/natsauth.py: one NATS user per Shoal\n"
              "# process kind with its permissions, and one per node's agent (agent-<node>: its node's subjects\n"
              "# only); each password comes from the nats container's environment.\n")
    if nodes:
        header += f"# Agents' nodes: {', '.join(nodes)}.\n"
    else:
        header += ("# No node is named, so no agent may connect: write this file for your cluster's nodes\n"
                   "# (docs/kubernetes.md, \"NATS with TLS and a user per process\").\n")
    return header + authorization_block(users(passwords))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libs.natsauth", description=(
        "Print deploy/nats-secure/auth.conf: a NATS user per Shoal process kind, and one per node's agent."))
    parser.add_argument("nodes", nargs="*", metavar="NODE", help="a node whose agent may connect (agent-NODE)")
    parser.add_argument("--nodes-file", metavar="FILE",
                        help="more nodes, one per line or separated by spaces ('-': standard input)")
    args = parser.parse_args(argv)
    nodes = list(args.nodes)
    if args.nodes_file:
        try:
            text = sys.stdin.read() if args.nodes_file == "-" else open(args.nodes_file).read()  # noqa: SIM115
        except OSError as err:
            print(f"error: --nodes-file {args.nodes_file}: {err.strerror or err}", file=sys.stderr)
            return 1
        nodes += text.split()
    try:
        print(deploy_authorization(nodes), end="")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
