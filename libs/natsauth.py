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
  Nobody deletes a stream; only the manifests' writers purge (theirs: an object put replaces its chunks), and only
  the dataset service deletes a message (a command that carried a secret in clear).
- Replies go to a per-user inbox, ``_INBOX.<user>.>`` (``inbox_prefix``: ``libs.bus.connect`` sets it from
  ``NATS_USER``), so a user cannot read the replies another user's requests get (KV reads, publish acks).
- The observer subscribes to facts (``shoal.evt.>``) and nothing else; it cannot publish at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from libs import subjects

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
               subjects.KV_NODE_CACHE, subjects.KV_OPERATIONS, subjects.KV_OPERATION_RUNS, subjects.KV_MEMBERS)
_STREAMS = (subjects.STREAM_COMMANDS, subjects.STREAM_FACTS, subjects.STREAM_AGENT, subjects.STREAM_TASKS,
            subjects.STREAM_DEAD_LETTERS)


def stream_api(verb: str, stream: str) -> str:
    """The JetStream API subject of a stream operation: ``$JS.API.STREAM.<verb>.<stream>``."""
    return f"{API}.STREAM.{verb}.{stream}"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


ALL_STREAMS: tuple[str, ...] = (*_STREAMS, *(kv_stream(b) for b in KV_BUCKETS),
                                object_stream(subjects.OBJ_MANIFESTS))


@dataclass(frozen=True)
class Permissions:
    """What one user may publish and subscribe (nats-server's ``permissions``); ``responses``: it may answer
    requests it received (``allow_responses``), whatever their reply subject."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False


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


def inbox_prefix(user: str) -> str:
    """The inbox every reply to ``user`` arrives on (nats-py's ``inbox_prefix``)."""
    return f"{INBOX_ROOT}.{user}"


# --- JetStream API subjects, by what the process does with a stream. ---


def _read_stream(stream: str) -> list[str]:
    """Look a stream up and get single messages (KV get: direct or not)."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}.>"]


def _consume(stream: str) -> list[str]:
    """Create, look up, pull from, ack and delete consumers of a stream (durable, ephemeral, ordered; a KV watch)."""
    return [f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.>", f"{API}.CONSUMER.INFO.{stream}.>",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.>", f"{API}.CONSUMER.DELETE.{stream}.>",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def _read_kv(bucket: str) -> list[str]:
    return _read_stream(kv_stream(bucket)) + _consume(kv_stream(bucket))


def _write_kv(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _read_objects(bucket: str) -> list[str]:
    # nats-py's object get subscribes by subject without naming the stream, so it looks the stream up first.
    return [f"{API}.STREAM.NAMES", *_read_stream(object_stream(bucket)), *_consume(object_stream(bucket))]


def _write_objects(bucket: str) -> list[str]:
    # A put replaces an object's earlier chunks with a filtered purge of the bucket's stream.
    return [f"$O.{bucket}.>", f"{API}.STREAM.PURGE.{object_stream(bucket)}"]


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
             objects: bool = False, subscribe: Iterable[str] = (), responses: bool = False) -> Permissions:
    """A control-plane service: provisions, reads every bucket, runs its durable consumers, writes its buckets."""
    consumers = list(consumers)
    allowed = [*publish, *_provision(), *_read_all_kv(), *_dead_letters(*consumers)]
    for stream in sorted({stream for stream, _ in consumers}):
        allowed += _consume(stream)
    for bucket in kv_writes:
        allowed += _write_kv(bucket)
    if objects:
        allowed += _read_objects(subjects.OBJ_MANIFESTS) + _write_objects(subjects.OBJ_MANIFESTS)
    return Permissions(publish=_unique(allowed), subscribe=tuple(subscribe), responses=responses)


def permissions(kind: str, node: str = "") -> Permissions:
    """Everything ``kind`` may publish and subscribe, besides its own inbox (``authorization_block`` adds that).

    ``node`` (agents only) limits an agent to that node's heartbeat, inventory and progress subjects.
    """
    if kind == DATASET:
        return _service(
            consumers=[(subjects.STREAM_COMMANDS, subjects.DURABLE_DATASET_COMMANDS),
                       (subjects.STREAM_FACTS, subjects.DURABLE_DATASET_RUNTIME_STATUS),
                       (subjects.STREAM_AGENT, subjects.DURABLE_DATASET_INVENTORY)],
            # It erases an apply that carried a secret in clear from the command stream (docs/security.md).
            publish=[subjects.DATASET_FACTS, subjects.INVENTORY_REQUEST,
                     stream_api("MSG.DELETE", subjects.STREAM_COMMANDS)],
            kv_writes=[subjects.KV_DATASETS, subjects.KV_BINDINGS, subjects.KV_NODE_CACHE, subjects.KV_MEMBERS],
            objects=True)
    if kind == RUNTIME:
        return _service(
            consumers=[(subjects.STREAM_COMMANDS, subjects.DURABLE_RUNTIME_COMMANDS),
                       (subjects.STREAM_AGENT, subjects.DURABLE_RUNTIME_HEARTBEATS)],
            # Its autoscaler changes replicas the way `shoal scale` does: by applying the runtime again.
            publish=[subjects.RUNTIME_FACTS, subjects.RUNTIME_APPLY],
            kv_writes=[subjects.KV_RUNTIMES, subjects.KV_AGENTS])
    if kind == LOADER:
        return _service(
            consumers=[(subjects.STREAM_COMMANDS, subjects.DURABLE_LOADER_COMMANDS),
                       (subjects.STREAM_TASKS, subjects.DURABLE_LOADER_PROGRESS)],
            # A DataLoad with loadMetadata lists the dataset again (a resync command); tasks go to the agents.
            publish=[subjects.DATALOAD_FACTS, subjects.DATACLEAN_FACTS, subjects.DATASET_RESYNC,
                     f"{subjects.TASK_PREFIX}.>", subjects.TASK_CANCEL],
            kv_writes=[subjects.KV_OPERATIONS, subjects.KV_OPERATION_RUNS], objects=True)
    if kind == SCHEDULER:
        return _service(
            consumers=[(subjects.STREAM_AGENT, subjects.DURABLE_SCHEDULER_INVENTORY)],
            publish=[subjects.INVENTORY_REQUEST], objects=True,
            subscribe=[subjects.SCHED_SCORE], responses=True)
    if kind == BRIDGE:
        # Kubernetes is where the bridge's commands come from; it shows rejections on the custom resources.
        perms = _service(consumers=[], publish=[subjects.ALL_COMMANDS])
        # Its subscription names no stream: nats-py looks the stream up by subject (STREAM.NAMES).
        return Permissions(publish=_unique([*perms.publish, f"{API}.STREAM.NAMES",
                                            *_read_stream(subjects.STREAM_FACTS), *_consume(subjects.STREAM_FACTS)]))
    if kind == AGENT:
        return _agent(node)
    if kind == CLI:
        return Permissions(publish=_unique([
            subjects.ALL_COMMANDS, subjects.SCHED_SCORE, *_provision(), f"{API}.INFO", f"{API}.STREAM.NAMES",
            f"{API}.STREAM.LIST", *(s for stream in ALL_STREAMS for s in _read_stream(stream) + _consume(stream)),
        ]), subscribe=("shoal.>",))
    if kind == OBSERVER:
        return Permissions(subscribe=(subjects.ALL_FACTS,))
    raise ValueError(f"unknown process kind {kind!r}: one of {', '.join(KINDS)}")


def _agent(node: str) -> Permissions:
    """The agent and its mount processes: their node's events out; tasks, cancels, snapshot requests in; reads."""
    node_token = node or "*"
    publish = [
        subjects.agent_heartbeat(node_token), subjects.agent_inventory(node_token),
        subjects.task_progress(node_token), *_info_all(),
        *_read_kv(subjects.KV_DATASETS), *_read_kv(subjects.KV_RUNTIMES), *_read_kv(subjects.KV_OPERATIONS),
        *_read_objects(subjects.OBJ_MANIFESTS),
        # Its mount processes' task consumers (durables named after node and dataset: ``subjects.task_durable``).
        *_read_stream(subjects.STREAM_TASKS), *_consume(subjects.STREAM_TASKS),
    ]
    return Permissions(publish=_unique(publish),
                       subscribe=(subjects.INVENTORY_REQUEST, subjects.TASK_CANCEL))


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
    """One user per entry of ``passwords`` (user name → password), with its kind's permissions."""
    return [User(name, password, permissions(*parse_user(name))) for name, password in passwords.items()]


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
        publish = f"{{allow: {_list(perms.publish)}}}" if perms.publish else '{deny: [">"]}'
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


def may_publish(kind: str, subject: str, node: str = "") -> bool:
    return any(matches(pattern, subject) for pattern in permissions(kind, node).publish)


def password_variable(kind: str) -> str:
    """The environment variable nats-server reads a kind's password from in ``deploy/`` (from Secret
    ``shoal-nats-users``, key ``<kind>``)."""
    return f"SHOAL_NATS_PASSWORD_{kind.upper()}"


def deploy_authorization() -> str:
    """``deploy/nats-secure/auth.conf``: every kind's user (one ``agent`` for the DaemonSet), passwords from the
    environment. ``make nats-auth`` writes it; a test checks it is current."""
    header = ("# Generated by `make nats-auth` from libs/natsauth.py (a test checks it is current): one NATS user per\n"
              "# Shoal process kind with its permissions; each password comes from the nats container's environment.\n")
    return header + authorization_block(users({kind: f"${password_variable(kind)}" for kind in KINDS}))


if __name__ == "__main__":
    print(deploy_authorization(), end="")
