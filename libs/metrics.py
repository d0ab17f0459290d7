"""Every Prometheus metric of every Shoal process, spelled once: names, help, label keys, units and buckets.

Exposition is prometheus-client's: each instrument here registers in its global registry, which the side server
(``libs.side_server``) serves on ``/metrics`` next to the process collector. A process only moves the instruments
it owns; the others stay absent from its output (a labelled metric shows no series until a label set is used, and
one without labels is registered only by its owner, ``register``).

Naming follows Prometheus: counters end in ``_total`` (prometheus-client adds it to the name given here), units are
base units in the name (``_seconds``, ``_bytes``), gauges have no suffix. Labels stay bounded: consumer durables,
outcomes, tiers, sources, FUSE operations, dataset and node names, never an object key or a block id, and a path
in one place only: ``shoal_cache_dir_healthy``'s ``dir``, a cache directory of the tiered stores of the Runtimes
the node serves (written one way, ``libs.hostpaths.normal_path``). Those are a few per node, set by whoever writes
Runtimes, never by what a read or a dataset names, and a directory's series goes when no running mount uses it.

Label values used by more than one module are constants below, so dashboards and code agree on the spelling.

``SHOAL_METRICS=off`` turns the data-path instruments (the ``DATA_PATH`` group: per-read and per-block counters and
histograms of the agent) into no-ops, for the bench that measures what metrics cost on reads; the control-plane
instruments stay on either way (they are a few increments per command).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

from libs import subjects

# --- label values ----------------------------------------------------------------------------------------------

# Outcome of one message handed to a bus consumer's handler (libs.bus.Consumer).
OK, REJECTED, RETRIED, DEAD_LETTERED, CONFLICT = "ok", "rejected", "retried", "dead_lettered", "conflict"
# Where a block's bytes came from on a read: memory and disk are cache hits, peer and store are misses.
MEMORY, DISK, PEER, STORE = "memory", "disk", "peer", "store"
HIT_SOURCES = (MEMORY, DISK)
MISS_SOURCES = (PEER, STORE)
# Whom an agent's store fetch was for: this node's readers, another node's (through the peer server: that node
# counts the block as a peer read), a DataLoad. Only the first are reads of this node's (``source="store"``).
FOR_READ, FOR_PEER, FOR_LOAD = "read", "peer", "load"
FETCH_PURPOSES = (FOR_READ, FOR_PEER, FOR_LOAD)
# Cache tiers with a size and a capacity.
TIERS = (MEMORY, DISK)
# How a scheduling question arrived: the NATS API, the admission webhook, the extender's two verbs.
WAY_NATS, WAY_WEBHOOK, WAY_FILTER, WAY_PRIORITIZE = "nats", "webhook", "filter", "prioritize"

# --- buckets ---------------------------------------------------------------------------------------------------

# Handlers, syncs and store requests: a millisecond to a minute.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Scheduling decisions: tens of microseconds (an answer kept) to a few seconds (well past the webhook's timeout).
FAST_SECONDS_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                        0.5, 1.0, 2.5)
# FUSE requests: as fast as a decision (a cached getattr), and as slow as the store GET or peer request a cold read
# waits for (the S3 client's 30 s read timeout, a peer's 60 s in all). Ending at 2.5 s, a p99 of every read
# stalled on a hung store showed 2.5 s: histogram_quantile gives a quantile above the last bound as that bound.
FUSE_SECONDS_BUCKETS = (*FAST_SECONDS_BUCKETS, 5.0, 10.0, 30.0, 60.0)
# Metadata syncs: a small folder in milliseconds, a listing of millions of objects in minutes (docs/benchmarks.md
# measured ~4,000 objects/s: ImageNet's 1.28 million take ~5 minutes). Ending at 60 s, every sync of more than
# ~250,000 objects fell past the last bound, and the dashboard's p95 read 60 s however long they took.
SYNC_SECONDS_BUCKETS = (*SECONDS_BUCKETS, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def register(*instruments: Counter | Gauge | Histogram) -> None:
    """Serve ``instruments`` (made with ``registry=None``: only the process that owns them serves them) on this
    process's ``/metrics``; once, however often it is called (the services of a test share one process)."""
    for instrument in instruments:
        with contextlib.suppress(ValueError):  # registered already: prometheus-client refuses a second time
            REGISTRY.register(instrument)


def data_path_enabled() -> bool:
    """False when ``SHOAL_METRICS=off``: the agent's per-read instruments are skipped (see module docstring)."""
    return os.environ.get("SHOAL_METRICS", "on").strip().lower() not in ("off", "0", "false", "no")


# --- moving instruments on hot paths ----------------------------------------------------------------------------
# The library's own ``inc``/``observe``/``set`` take a lock and check their arguments on every call (a histogram
# observation costs about 4x a timing wrapper around a FUSE handler, and as much as folding a small inventory
# event). Instruments moved only from one thread, the process's event loop (which also serves /metrics), can be
# moved by plain additions to the same values. Each falls back to the library's method where the values are not
# the in-process kind (multiprocess mode).


def adder(child: Counter) -> Callable[[float], None]:
    """``child.inc`` for a counter moved only from the event loop: a plain addition to its value (the library's
    lock guards against other threads, which never move it). The library's ``inc`` where its values are not the
    in-process kind (multiprocess mode)."""
    value = getattr(child, "_value", None)
    if type(value) is not MutexValue:
        return child.inc

    def add(amount: float = 1.0) -> None:
        value._value += amount

    return add


def observer(child: Histogram) -> Callable[[float], None]:
    """``child.observe`` for a histogram observed only from the event loop: the sum and the one bucket that counts
    the amount (the first upper bound at or above it, as the library does) grow by plain additions."""
    buckets, total, bounds = (getattr(child, name, None) for name in ("_buckets", "_sum", "_upper_bounds"))
    if (type(total) is not MutexValue or not isinstance(buckets, list) or not isinstance(bounds, list)
            or len(buckets) != len(bounds) or any(type(bucket) is not MutexValue for bucket in buckets)):
        return child.observe
    search = bisect.bisect_left

    def observe(amount: float) -> None:
        total._value += amount
        buckets[search(bounds, amount)]._value += 1

    return observe


def setter(child: Gauge) -> Callable[[float], None]:
    """``child.set`` for a gauge set only from the event loop: a plain assignment to its value."""
    value = getattr(child, "_value", None)
    if type(value) is not MutexValue:
        return child.set

    def assign(amount: float) -> None:
        value._value = float(amount)

    return assign


# --- every service: the bus ------------------------------------------------------------------------------------

COMMANDS = Counter("shoal_messages_handled", "Messages handed to a consumer's handler, by outcome "
                   "(ok, rejected, retried, dead_lettered, conflict).", ["consumer", "outcome"])
HANDLER_SECONDS = Histogram("shoal_handler_duration_seconds", "Time a consumer's handler took for one message.",
                            ["consumer"], buckets=SECONDS_BUCKETS)
CONSUMER_LAG = Gauge("shoal_consumer_lag_messages", "Messages in the stream not yet delivered to this consumer "
                     "(JetStream num_pending) at its last fetch.", ["consumer"])
# Lag is read from a fetch, so it stands still while a handler is stuck (nothing is fetched meanwhile): this one
# grows then. Read when scraped, on the process's own monotonic clock: a timestamp for Prometheus to subtract from its
# time() would count any difference between the two hosts' clocks as a stall.
CONSUMER_FETCH_AGE = Gauge("shoal_consumer_fetch_age_seconds", "Seconds since this consumer's last fetch came back "
                           "(with messages, or empty after its one-second wait), read when scraped: up to a second "
                           "or so while it keeps up; growing while its handlers hold a fetch's messages or it cannot "
                           "reach its durable; 0 once stopped.", ["consumer"])
KV_CONFLICTS = Counter("shoal_kv_conflicts", "Compare-and-set writes to a KV bucket that lost to another writer.",
                       ["bucket"])

# --- dataset service -------------------------------------------------------------------------------------------

# Outcome of a metadata sync besides OK: the listing failed (a problem in the status, or a retry later).
SYNC_FAILED = "failed"
DATASETS = Gauge("shoal_datasets", "Datasets by phase.", ["phase"])
DATASET_SYNC_SECONDS = Histogram("shoal_dataset_sync_duration_seconds", "Time to list a dataset's sources and "
                                 "save its manifest, by outcome (ok, failed).", ["outcome"],
                                 buckets=SYNC_SECONDS_BUCKETS)
DATASET_OBJECTS = Gauge("shoal_dataset_objects", "Objects in a dataset's manifest at its last sync.", ["dataset"])
DATASET_UFS_BYTES = Gauge("shoal_dataset_ufs_bytes", "Bytes in a dataset's sources at its last sync.", ["dataset"])
DATASET_SKIPPED_OBJECTS = Gauge("shoal_dataset_skipped_objects", "Objects a dataset's last sync listed but left out "
                                "of the tree (the ObjectsSkipped condition).", ["dataset"])
# Outcome of a periodic (autoSync) listing: a changed listing makes a new manifest, an unchanged one writes nothing.
AUTOSYNC_CHANGED, AUTOSYNC_UNCHANGED = "changed", "unchanged"
DATASET_AUTOSYNCS = Counter("shoal_dataset_autosyncs", "Periodic (autoSync) listings of a dataset, by outcome "
                            "(changed, unchanged, failed).", ["outcome"])

# --- runtime service -------------------------------------------------------------------------------------------

RUNTIMES = Gauge("shoal_runtimes", "Runtimes by phase.", ["phase"])
RUNTIME_WORKERS = Gauge("shoal_runtime_workers", "Cache workers picked for a runtime.", ["runtime"])
# Direction of an autoscaler decision.
SCALE_UP, SCALE_DOWN = "up", "down"
RUNTIME_AUTOSCALES = Counter("shoal_runtime_autoscales", "Changes of replicas the autoscaler made, by direction "
                             "(up, down).", ["direction"])

# --- agent: cache and data path (label ``node`` is the agent's node name) --------------------------------------

CACHE_BYTES = Gauge("shoal_cache_bytes", "Bytes held in a cache tier.", ["node", "dataset", "tier"])
CACHE_CAPACITY_BYTES = Gauge("shoal_cache_capacity_bytes", "Capacity of a cache tier.", ["node", "dataset", "tier"])
BLOCK_READS = Counter("shoal_block_reads", "Block reads of this node's readers by the source that served them "
                      "(memory and disk are hits, peer and store are misses).", ["node", "dataset", "source"])
READ_BYTES = Counter("shoal_read_bytes", "Bytes read by this node's readers, by source.", ["node", "dataset", "source"])
STORE_FETCHED_BYTES = Counter("shoal_store_fetched_bytes", "Bytes fetched from the object store, by whom for: read "
                              "(this node's readers), peer (another node's reader), load (a DataLoad).",
                              ["node", "dataset", "purpose"])
STORE_REQUEST_SECONDS = Histogram("shoal_store_request_duration_seconds", "Object store requests by operation "
                                  "(get, head, list).", ["node", "dataset", "operation"], buckets=SECONDS_BUCKETS)
STORE_ERRORS = Counter("shoal_store_errors", "Failed object store requests, by operation and reason "
                       "(not_found, changed, denied, timeout, other).", ["node", "dataset", "operation", "reason"])
READAHEAD_BYTES = Gauge("shoal_readahead_bytes", "Read-ahead memory held on the node.", ["node"])
READAHEAD_BUDGET_BYTES = Gauge("shoal_readahead_budget_bytes", "The node's read-ahead memory budget.", ["node"])
EVICTIONS = Counter("shoal_cache_evictions", "Blocks evicted from a tier.", ["node", "dataset", "tier"])
CACHE_WRITES_DROPPED = Counter("shoal_cache_writes_dropped", "Blocks fetched for a read or a peer and not cached: "
                               "too many cache writes were waiting for the disk.", ["node", "dataset"])
CACHE_DIR_HEALTHY = Gauge("shoal_cache_dir_healthy", "1 when a cache directory is writable and within its quota, "
                          "else 0.", ["node", "dir"])
FUSE_SECONDS = Histogram("shoal_fuse_request_duration_seconds", "FUSE requests by operation (lookup, getattr, "
                         "open, read, readdir, ...).", ["node", "dataset", "operation"],
                         buckets=FUSE_SECONDS_BUCKETS)
PEER_REQUESTS = Counter("shoal_peer_requests_served", "Block requests answered by this agent's peer server, by "
                        "outcome (ok, not_cached, unauthorized, bad_request, error).", ["node", "dataset", "outcome"])
PEER_SERVED_BYTES = Counter("shoal_peer_served_bytes", "Bytes sent to peers.", ["node", "dataset"])
WARMUP_BYTES = Counter("shoal_warmup_bytes", "Bytes fetched into the cache by load tasks.", ["node", "dataset"])

# Label values of the agent's instruments (spelled here for dashboards; ``services/agent/metrics.py`` binds them).
# Object store operations (STORE_REQUEST_SECONDS, STORE_ERRORS): a mount process only reads (get).
GET, HEAD, LIST = "get", "head", "list"
# Why a store request failed (STORE_ERRORS), from the ``libs.ufs.base`` error it raised.
NOT_FOUND, CHANGED, DENIED, TIMEOUT, OTHER = "not_found", "changed", "denied", "timeout", "other"
# How the peer server answered a block request (PEER_REQUESTS); ``ok`` is OK above.
NOT_CACHED, UNAUTHORIZED, BAD_REQUEST, ERROR = "not_cached", "unauthorized", "bad_request", "error"


# Prometheus's ``job`` of the mount processes' targets: the agent writes it into each file_sd target (where it wins
# over the scrape job's name), and ``shoal up`` names its scrape job so, so both say the same.
MOUNT_JOB = "shoal-mount"


def dataset_label(namespace: str, name: str) -> str:
    """The ``dataset`` label of the agent's series: ``<namespace>/<name>`` (how the agent names a mount in logs)."""
    return subjects.object_name(namespace, name)


DATA_PATH = (BLOCK_READS, READ_BYTES, STORE_FETCHED_BYTES, STORE_REQUEST_SECONDS, FUSE_SECONDS, PEER_SERVED_BYTES)

# --- loader ----------------------------------------------------------------------------------------------------

OPERATIONS = Gauge("shoal_operations", "DataLoads and DataCleans by kind and phase.", ["kind", "phase"])
OPERATION_BYTES_DONE = Gauge("shoal_operation_bytes_done", "Bytes done by an operation's current run.",
                             ["kind", "operation"])
OPERATION_BYTES_PLANNED = Gauge("shoal_operation_bytes_planned", "Bytes an operation's current run will do.",
                                ["kind", "operation"])
OPERATION_RUNS = Counter("shoal_operation_runs", "Finished operation runs by kind and phase (Complete, Failed).",
                         ["kind", "phase"])

# --- scheduler -------------------------------------------------------------------------------------------------

# The two without labels are not registered here: an instrument without labels serves a sample from the moment it
# is registered, so in every process (all import this module) they read 0, and a dashboard's max of the fold lag
# showed a current fold while the scheduler was down. The scheduler registers them (``register``).
FOLD_LAG_SECONDS = Gauge("shoal_scheduler_fold_lag_seconds", "Age of the newest inventory event folded when it "
                         "was folded.", registry=None)
FOLD_EVENTS = Counter("shoal_scheduler_fold_events", "Inventory events folded, or ignored by reason.",
                      ["outcome"])
# The scheduler and the dataset service: inventory events of an agent process other than the one the node's record
# holds (two agents given one node name, ``libs.inventory.other_instance``), by node.
INVENTORY_OTHER_INSTANCE = Counter("shoal_inventory_other_instance_events", "Inventory events ignored: sent by "
                                   "another agent process than the one the node's record holds (two agents share "
                                   "the node name).", ["node"])
SNAPSHOT_REQUESTS = Counter("shoal_scheduler_snapshot_requests", "Snapshot requests sent to agents.", registry=None)
DECISIONS = Counter("shoal_scheduler_decisions", "Scheduling questions answered, by way (nats, webhook, filter, "
                    "prioritize) and outcome.", ["way", "outcome"])
DECISION_SECONDS = Histogram("shoal_scheduler_decision_duration_seconds", "Time to answer one scheduling "
                             "question.", ["way"], buckets=FAST_SECONDS_BUCKETS)
