"""Every NATS name Shoal uses, spelled once: subjects, streams, durable consumers, KV buckets, keys.

Services and the CLI import these instead of writing strings, so a rename happens here or nowhere.
Subjects that other systems may use (commands in, facts out) are part of the public contract: the README's
"Publishing events from another system" names them, and docs/schemas/ holds the JSON Schema of every event.
"""

from __future__ import annotations

# --- Streams: one per event family, because retention differs per family. ---
STREAM_COMMANDS = "SHOAL_COMMANDS"
STREAM_FACTS = "SHOAL_FACTS"
STREAM_AGENT = "SHOAL_AGENT"
STREAM_DEAD_LETTERS = "SHOAL_DEAD_LETTERS"
# Agents → loader progress (TaskProgress): kept until done, not an hour. The loader → agents work (NodeTask) is in a
# stream per node, ``task_stream``.
STREAM_TASKS = "SHOAL_TASKS"

# --- Commands: other systems publish these (JSON). ---
DATASET_APPLY = "shoal.cmd.dataset.apply"
DATASET_DELETE = "shoal.cmd.dataset.delete"
DATASET_RESYNC = "shoal.cmd.dataset.resync"
RUNTIME_APPLY = "shoal.cmd.runtime.apply"
RUNTIME_DELETE = "shoal.cmd.runtime.delete"
RUNTIME_SCALE = "shoal.cmd.runtime.scale"
DATALOAD_APPLY = "shoal.cmd.dataload.apply"
DATALOAD_DELETE = "shoal.cmd.dataload.delete"
DATALOAD_RUN = "shoal.cmd.dataload.run"
DATACLEAN_APPLY = "shoal.cmd.dataclean.apply"
DATACLEAN_DELETE = "shoal.cmd.dataclean.delete"
COMMAND_PREFIX = "shoal.cmd."


def command_subject(tag: str) -> str:
    """The subject a command of type ``tag`` is sent on, its type without the version: ``dataload.run.v1`` on
    ``shoal.cmd.dataload.run`` (each constant above is one). Consumers refuse a command on another's subject: NATS
    permissions are per subject, and a user allowed one command must not send another there."""
    return COMMAND_PREFIX + tag.rsplit(".", 1)[0]


DATASET_COMMANDS = "shoal.cmd.dataset.*"
RUNTIME_COMMANDS = "shoal.cmd.runtime.*"
OPERATION_COMMANDS = ["shoal.cmd.dataload.*", "shoal.cmd.dataclean.*"]
ALL_COMMANDS = "shoal.cmd.>"

# --- Facts: services publish these; anyone may subscribe. ---
DATASET_ACCEPTED = "shoal.evt.dataset.accepted"
DATASET_REJECTED = "shoal.evt.dataset.rejected"
DATASET_STATUS = "shoal.evt.dataset.status"
DATASET_DELETED = "shoal.evt.dataset.deleted"
RUNTIME_ACCEPTED = "shoal.evt.runtime.accepted"
RUNTIME_REJECTED = "shoal.evt.runtime.rejected"
RUNTIME_STATUS = "shoal.evt.runtime.status"
RUNTIME_DELETED = "shoal.evt.runtime.deleted"
# The autoscaler's decisions (a change of replicas and its reason).
RUNTIME_AUTOSCALED = "shoal.evt.runtime.autoscaled"
# Operation facts: one event family for DataLoad and DataClean, on a subject per kind.
DATALOAD_ACCEPTED = "shoal.evt.dataload.accepted"
DATALOAD_REJECTED = "shoal.evt.dataload.rejected"
DATALOAD_STATUS = "shoal.evt.dataload.status"
DATALOAD_DELETED = "shoal.evt.dataload.deleted"
DATACLEAN_ACCEPTED = "shoal.evt.dataclean.accepted"
DATACLEAN_REJECTED = "shoal.evt.dataclean.rejected"
DATACLEAN_STATUS = "shoal.evt.dataclean.status"
DATACLEAN_DELETED = "shoal.evt.dataclean.deleted"
DATALOAD_FACTS = "shoal.evt.dataload.>"
DATACLEAN_FACTS = "shoal.evt.dataclean.>"
DATASET_FACTS = "shoal.evt.dataset.>"
# The scheduler's facts, from the block inventory of every node it folds: a dataset's bytes in the cache with each
# block counted once (what the dataset service's ``cachedPercentage`` takes).
SCHEDULER_DATASET_CACHE = "shoal.evt.scheduler.dataset.cache"
SCHEDULER_FACTS = "shoal.evt.scheduler.>"
RUNTIME_FACTS = "shoal.evt.runtime.>"
ALL_FACTS = "shoal.evt.>"
# Every family's rejections (dataset, runtime, dataload, dataclean): the Kubernetes bridge shows them on the CRs.
ALL_REJECTIONS = "shoal.evt.*.rejected"

# --- Agents: per-node traffic. ---
AGENT_HEARTBEAT_PREFIX = "shoal.agent.heartbeat"
AGENT_HEARTBEATS = "shoal.agent.heartbeat.*"
ALL_AGENT = "shoal.agent.>"


def node_token(node: str) -> str:
    """A node's name as one subject token (and part of a durable name): Kubernetes node names are DNS subdomains,
    dotted on EKS and wherever nodes are named by their FQDN (``ip-10-0-1-23.ec2.internal``), and a dot splits a
    subject. A node name never holds ``_``, so no two nodes share a token. Events carry the name as it is."""
    return node.replace(".", "_")


def agent_heartbeat(node: str) -> str:
    """Heartbeats are per node so a stream can keep only the last one of each (max_msgs_per_subject)."""
    return f"{AGENT_HEARTBEAT_PREFIX}.{node_token(node)}"


AGENT_INVENTORY_PREFIX = "shoal.agent.inventory"
AGENT_INVENTORY = "shoal.agent.inventory.*"
# Core NATS (not stored): a consumer that saw a gap asks for a snapshot.
INVENTORY_REQUEST = "shoal.ctl.inventory.request"


def agent_inventory(node: str) -> str:
    return f"{AGENT_INVENTORY_PREFIX}.{node_token(node)}"


# --- Loader ↔ agents. A task goes to the mount process of one dataset on one node (its node's stream,
# ``task_stream``); progress comes back on stream SHOAL_TASKS. ---
TASK_PREFIX = "shoal.task.node"
TASK_STREAM_PREFIX = "SHOAL_TASKS_"
TASK_PROGRESS_PREFIX = "shoal.task.progress"
TASK_PROGRESS = "shoal.task.progress.*"
# Core NATS (not stored): every mount process hears it and stops the parts of that run.
TASK_CANCEL = "shoal.ctl.task.cancel"


def node_task(node: str, namespace: str, name: str, incarnation: str) -> str:
    """The parts for one life (``DatasetRecord.incarnation``) of a dataset on one node. One subject per life: a mount's
    new durable (``task_durable``, of that life too) delivers every part still in the node's stream for its life,
    those published before the mount started included, and none of an earlier life of the name, which the stream
    keeps for a day (a durable of the dataset's one subject replayed each, skipped only after a KV read). A dataset
    record from before incarnations ("") has the dataset's subject alone."""
    subject = f"{TASK_PREFIX}.{node_token(node)}.{namespace}.{name}"
    return f"{subject}.{incarnation}" if incarnation else subject


def node_tasks(node: str) -> str:
    """Every task subject of one node: what its stream (``task_stream``) captures."""
    return f"{TASK_PREFIX}.{node_token(node)}.>"


def task_stream(node: str) -> str:
    """The stream of one node's tasks, ``SHOAL_TASKS_<node token>``. A stream per node because every JetStream request
    about a consumer (pull, ack, look-up, delete) names only the stream and the consumer: a NATS permission can
    name this stream for the node's agent, never "the consumers whose name starts with the node" (docs/security.md).
    The loader makes it before it publishes the node's first part (``libs.bus.Bus.provision_node_tasks``)."""
    return f"{TASK_STREAM_PREFIX}{node_token(node)}"


def task_stream_node(stream: str) -> str:
    """The node whose task stream ``stream`` is (``task_stream`` read back: a node name never holds ``_``)."""
    return stream.removeprefix(TASK_STREAM_PREFIX).replace("_", ".")


# The server's advisories (core NATS) that a stream was made, one subject per stream name.
STREAM_MADE_PREFIX = "$JS.EVENT.ADVISORY.STREAM.CREATED"


def task_stream_made(node: str) -> str:
    """The advisory that ``node``'s task stream was made: a mount waiting for it looks again at once rather than at
    its next poll."""
    return f"{STREAM_MADE_PREFIX}.{task_stream(node)}"


def task_progress(node: str) -> str:
    return f"{TASK_PROGRESS_PREFIX}.{node_token(node)}"


def task_durable(node: str, namespace: str, name: str, incarnation: str) -> str:
    """The durable consumer of one mount process's tasks (kept across its restarts, so a part resumes), for one life
    of the dataset (``node_task``'s): a dataset deleted and applied again is another durable, with its own filter.

    Namespace, name and incarnation are joined with '_', which no DNS label nor incarnation holds, so no two datasets
    share a durable: joined with '-', ``ml``/``prod-x`` and ``ml-prod``/``x`` were both ``...-ml-prod-x``, and the
    second mount process bound to the first one's durable (with its filter), dropped that dataset's parts as another
    mount's and never got its own."""
    durable = f"tasks-{node_token(node)}_{namespace}_{name}"
    return f"{durable}_{incarnation}" if incarnation else durable


# --- Scheduler: core NATS request/reply (ScoreRequest → ScoreReply). ---
SCHED_SCORE = "shoal.sched.score"

# --- Dead letters: one subject per consumer that gave up on a message. ---
DEAD_LETTER_PREFIX = "shoal.dlq"
ALL_DEAD_LETTERS = "shoal.dlq.>"


def dead_letter(stream: str, durable: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{stream}.{durable}"


# --- Families: what a span is named by. ---
# Subjects with a tail per node, dataset or consumer, by their common prefix. A span named after the whole subject
# would be one operation per node and dataset in a tracing backend (Jaeger's operation list, Tempo's span metrics);
# the subject itself goes in the span's ``messaging.destination.name``.
_FAMILIES = (TASK_PREFIX, TASK_PROGRESS_PREFIX, AGENT_HEARTBEAT_PREFIX, AGENT_INVENTORY_PREFIX, DEAD_LETTER_PREFIX)


def family(subject: str) -> str:
    """The name of ``subject``'s kind, without its per-node tail: ``shoal.task.node`` for every
    ``shoal.task.node.<node>.<ns>.<name>``; a subject spelled whole above (a command, a fact) is its own."""
    for prefix in _FAMILIES:
        if subject.startswith(prefix + "."):
            return prefix
    return subject


# --- Durable consumers. ---
DURABLE_DATASET_COMMANDS = "dataset-commands"
DURABLE_DATASET_RUNTIME_STATUS = "dataset-runtime-status"
DURABLE_RUNTIME_COMMANDS = "runtime-commands"
DURABLE_RUNTIME_HEARTBEATS = "runtime-heartbeats"
DURABLE_DATASET_INVENTORY = "dataset-inventory"
DURABLE_DATASET_SCHEDULER_CACHE = "dataset-scheduler-cache"
DURABLE_LOADER_COMMANDS = "loader-commands"
DURABLE_LOADER_PROGRESS = "loader-progress"

# --- KV buckets and the Object Store. ---
KV_DATASETS = "shoal_datasets"
KV_RUNTIMES = "shoal_runtimes"
KV_AGENTS = "shoal_agents"
KV_BINDINGS = "shoal_dataset_bindings"
# Per dataset, every node's inventory position and cache totals (libs.inventory); keys "<namespace>.<name>".
KV_NODE_CACHE = "shoal_dataset_node_cache"
# Per dataset, when an autoSync listing last found nothing new (such a listing writes nothing to the record), keys
# "<namespace>.<name>": the next listing counts from it after a restart or a hand-over, not from lastSyncTime.
KV_LISTINGS = "shoal_dataset_listings"
OBJ_MANIFESTS = "shoal_manifests"
# DataLoads and DataCleans (OperationRecord), keys ``operation_key``; the loader's run state, same keys.
KV_OPERATIONS = "shoal_operations"
KV_OPERATION_RUNS = "shoal_operation_runs"
# Each service replica's beat (libs.members), keys "<service>.<replica>": which replicas split a reconciler's keys.
KV_MEMBERS = "shoal_members"
# The scheduler's replicas' keys there ("scheduler.<replica>"): which replica publishes a dataset's cache facts.
MEMBERS_SCHEDULER = "scheduler"
# The replicas of the services that take commands ("<service>.<replica>"); each beat carries the replica's
# SHOAL_MAX_EVENT_BYTES, so a publisher (the CLI) sizes a command by what the service that handles it takes.
MEMBERS_DATASET = "dataset"
MEMBERS_RUNTIME = "runtime"
MEMBERS_LOADER = "loader"
# Which service's replicas take each kind of command (``libs.documents.Kind``).
MEMBERS_OF_KIND = {"dataset": MEMBERS_DATASET, "runtime": MEMBERS_RUNTIME, "dataload": MEMBERS_LOADER,
                   "dataclean": MEMBERS_LOADER}
# The bridge's own: the apply command it last published for each custom resource, keyed by the object's uid (so a
# restart sends only what changed, and finds what was deleted while it was down: services/bridge/README.md).
KV_BRIDGE_APPLIED = "shoal_bridge_applied"

# The buckets whose old delete markers each service purges (``libs.markers``): those it owns, which it alone writes.
# Not the agents' and the members' buckets: their TTL removes their markers.
SWEPT_BY_DATASET = (KV_DATASETS, KV_BINDINGS, KV_NODE_CACHE, KV_LISTINGS)
SWEPT_BY_RUNTIME = (KV_RUNTIMES,)
SWEPT_BY_LOADER = (KV_OPERATIONS, KV_OPERATION_RUNS)
SWEPT_BY_BRIDGE = (KV_BRIDGE_APPLIED,)


def resource_key(namespace: str, name: str) -> str:
    """KV key of a namespaced object. Both parts are DNS labels, so they never contain a dot."""
    return f"{namespace}.{name}"


def object_name(namespace: str, name: str) -> str:
    """How a log line, error or status message names a namespaced object: ``<namespace>/<name>``, as kubectl does.
    Only for people: on the wire (KV keys, subject tokens, ids, file names) the object is ``resource_key``'s dotted
    form, which a reader of logs should not have to tell from a name holding a dot."""
    return f"{namespace}/{name}"


def key_name(key: str) -> str:
    """The object a ``resource_key`` or ``operation_key`` stands for, spelled for people as ``object_name`` spells it
    (``default.demo``: ``default/demo``; ``dataload.default.warm``: ``dataload default/warm``), for a message that has
    only the key; any other key as it is."""
    parts = key.split(".")
    if len(parts) == 2:
        return object_name(*parts)
    if len(parts) == 3:
        return f"{parts[0]} {object_name(parts[1], parts[2])}"
    return key


def operation_key(kind: str, namespace: str, name: str) -> str:
    """KV key of a DataLoad or DataClean: ``dataload.<namespace>.<name>`` (the kind in lower case)."""
    return f"{kind.lower()}.{namespace}.{name}"


def key_object(key: str, operation_kind: str | None = None) -> tuple[str, str] | None:
    """The (namespace, name) a ``resource_key`` names, or with ``operation_kind`` that kind's ``operation_key``; None
    when ``key`` is not such a key."""
    parts = key.split(".")
    if operation_kind is None:
        return (parts[0], parts[1]) if len(parts) == 2 else None
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == operation_kind.lower() else None


def manifest_name(namespace: str, name: str, incarnation: str = "", generation: int = 0, requests: int = 0) -> str:
    """A dataset's manifest in the Object Store: ``<ns>.<name>.<incarnation>-<generation>-<requests>``, the
    listing of one spec (``DatasetRecord.generation``) at one resync (``sync_requests``) of one life of the name
    (``DatasetRecord.incarnation``). A sync still running for an older spec, an older resync or a dataset deleted
    and made again never writes over the manifest the record names; ``<ns>.<name>`` for a record made before
    incarnations. Readers follow ``status.manifest``."""
    return f"{namespace}.{name}.{incarnation}-{generation}-{requests}" if incarnation else f"{namespace}.{name}"


# The loader's objects in the same Object Store: the current run's plan (its parts, republished after a restart),
# the manifest the last Complete OnEvent run planned against (the baseline of the next run's diff), and the one the
# current OnEvent run plans against (the baseline once that run completes). Five dot-separated parts, so never a
# dataset's ``<ns>.<name>[.<incarnation>]``.
def loader_plan(operation: str) -> str:
    return f"loader.{operation}.plan"


def loader_manifest(operation: str) -> str:
    return f"loader.{operation}.manifest"


def loader_planned_manifest(operation: str) -> str:
    return f"loader.{operation}.planned"


def loader_cleaned(operation: str) -> str:
    """What a DataClean's last run was given to evict, with its earlier runs' a load still executing then had not
    started before (``services.loader.domain.CleanGiven``)."""
    return f"loader.{operation}.cleaned"


LOADER_OBJECT_KINDS = ("plan", "manifest", "planned", "cleaned")


def loader_object(name: str) -> tuple[str, str] | None:
    """(operation key, kind) of one of the loader's objects (``loader_plan`` and the others), None for any other
    name (a dataset's manifest): what a restarted loader reads to remove the objects of operations gone."""
    prefix, dot, rest = name.partition(".")
    key, _, kind = rest.rpartition(".")
    if prefix != "loader" or not dot or kind not in LOADER_OBJECT_KINDS or key.count(".") != 2:
        return None
    return key, kind
