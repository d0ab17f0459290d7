"""Typed settings read from the environment, parsed once in each ``__main__``.

Every setting has an environment variable, a type and a default with the reason for it. Parsing collects every
bad variable and raises one ``SettingsError`` that lists them all, so a person fixes the environment in one go.
Secret values are wrapped in ``Secret`` so they never show up in a repr or a log line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints
from urllib.parse import urlsplit

import msgspec

from libs.events.common import DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN, label_errors, parse_quantity
from libs.redact import strip_userinfo


class SettingsError(ValueError):
    """One or more environment variables are invalid; the message lists every one of them."""


class Secret:
    """A string that prints as ``'***'``; call ``reveal()`` where the real value is needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def env(name: str, doc: str, **kwargs: Any) -> Any:
    """A dataclass field bound to an environment variable, with its documentation."""
    return field(metadata={"env": name, "doc": doc}, **kwargs)


@dataclass(frozen=True)
class NatsSettings:
    urls: list[str] = env(
        "NATS_URL",
        "Comma-separated server URLs; several give failover across a cluster.",
        default_factory=lambda: ["nats://127.0.0.1:4222"],
    )
    user: str = env("NATS_USER", "User name for user/password authentication.", default="")
    password: Secret = env("NATS_PASSWORD", "Password for user/password authentication.", default=Secret(""))
    # A file read once at start instead: a per-node file on the host (deploy/nats-secure gives each node's agent its
    # own user, whose password no other node holds), which an environment variable from a Secret cannot be.
    password_file: str = env("NATS_PASSWORD_FILE", "File holding the password, instead of NATS_PASSWORD.", default="")
    token: Secret = env("NATS_TOKEN", "Token authentication.", default=Secret(""))
    tls_ca: str = env("NATS_TLS_CA", "CA bundle to verify the server; enables TLS.", default="")
    tls_cert: str = env("NATS_TLS_CERT", "Client certificate for mutual TLS.", default="")
    tls_key: str = env("NATS_TLS_KEY", "Client key for mutual TLS.", default="")
    # Streams are replicated in a production cluster; 1 for a single embedded server.
    replicas: int = env("SHOAL_STREAM_REPLICAS", "Replicas of Shoal's streams and KV buckets.", default=1)

    def __post_init__(self) -> None:
        # Spelled once with a scheme, however given (NATS_URL, --nats, a test): see ``nats_server_url``.
        object.__setattr__(self, "urls", [nats_server_url(url) for url in self.urls])


def nats_server_url(url: str) -> str:
    """``url`` as nats-py reads it: with ``nats://`` in front when it names no scheme (``host:4222``,
    ``user:password@host:4222``). Kept so, a user and password in it are hidden wherever it is shown
    (``libs.redact.strip_userinfo`` knows a URL by its scheme: ``cli:pw@host`` was shown whole in the CLI's "cannot
    reach NATS at ..." and in every service's "starting" log line) and its user is the one inboxes are named for."""
    return url if "://" in url else f"nats://{url}"


NATS_LOGIN_FIELDS = ("user", "password", "password_file", "token", "tls_ca", "tls_cert", "tls_key")


def nats_login_variables() -> tuple[str, ...]:
    """The variables that say how to log in to a NATS server (user, password, token, TLS), not where it is."""
    return tuple(item.metadata["env"] for item in fields(NatsSettings) if item.name in NATS_LOGIN_FIELDS)


@dataclass(frozen=True)
class S3Settings:
    """Defaults for S3 mounts that do not name their own endpoint or credentials."""

    endpoint: str = env("SHOAL_S3_ENDPOINT", "S3 endpoint URL; empty means AWS.", default="")
    region: str = env("SHOAL_S3_REGION", "S3 region.", default="us-east-1")
    access_key_id: Secret = env("SHOAL_S3_ACCESS_KEY_ID", "S3 access key id.", default=Secret(""))
    secret_access_key: Secret = env("SHOAL_S3_SECRET_ACCESS_KEY", "S3 secret access key.", default=Secret(""))
    # Self-hosted stores (SeaweedFS, MinIO) rarely have wildcard DNS for virtual-hosted buckets.
    path_style: bool = env("SHOAL_S3_PATH_STYLE", "Address buckets by path, not by host name.", default=True)
    secrets_dir: str = env(
        "SHOAL_SECRETS_DIR",
        "Folder of secrets referenced by encryptOptions, each namespace's apart: <dir>/<namespace>/<secret name>/"
        "<key>, like a mounted Secret; the bridge's copies <dir>/<namespace>.<secret name>/<key> or .<key> (one "
        "mounted Secret holding many, SHOAL_KUBE_SECRET_MIRROR); the default namespace's also <dir>/<secret name>/"
        "<key> (libs.ufs.mounts.secret_paths).",
        default="",
    )


def _host_name_token() -> str:
    """The host's name as one NATS subject token and DNS label: lower case, anything else a '-'."""
    import re
    import socket

    return re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower()).strip("-")[:63] or "node"


@dataclass(frozen=True)
class ServiceSettings:
    log_level: str = env("SHOAL_LOG_LEVEL", "debug, info, warning or error.", default="info")
    log_format: str = env("SHOAL_LOG_FORMAT", "json, console, or auto (console on a terminal).", default="auto")
    # JetStream's own limit is 1 MiB per message; commands are far smaller, so a quarter of it flags abuse early.
    max_event_bytes: int = env("SHOAL_MAX_EVENT_BYTES", "Largest event a service decodes.", default=256 * 1024)
    # Handlers that keep failing stop after this many deliveries and go to the dead-letter stream.
    max_deliver: int = env("SHOAL_MAX_DELIVER", "Deliveries of one message before it is dead-lettered.", default=5)
    # Objects per listing page; S3 caps a page at 1000, and memory during a sync grows with one page.
    list_page_size: int = env("SHOAL_LIST_PAGE_SIZE", "Objects per listing page during a sync.", default=1000)
    # Any free port by default, so several processes on one machine (and every mount process) never collide;
    # give a fixed one where a prober must find it (Kubernetes probes, a Prometheus scrape config).
    http_port: int | None = env(
        "SHOAL_HTTP_PORT", "Port of the /healthz, /readyz, /metrics side server: 0 picks a free one (logged), "
        "off disables it.", default=0,
    )
    # Loopback by default: metrics and readiness are not for the whole network unless the operator says so.
    http_host: str = env("SHOAL_HTTP_HOST", "Address the side server binds (0.0.0.0 in a pod).",
                         default="127.0.0.1")
    # local:// serves host files through a mount every user of a node may read; only folders the operator
    # chose may be mounted (the dataset service refuses others at apply, the agent again at mount). Empty: none.
    local_roots: list[str] = env(
        "SHOAL_LOCAL_ROOTS", "Folders below which local:// mounts are allowed (comma-separated); empty allows none.",
        default_factory=list,
    )
    # An unreachable store is often back within seconds (a restart, a network blip); listing it again sooner
    # would mostly add load to a store that is struggling. A resync does not wait.
    sync_retry_seconds: float = env(
        "SHOAL_SYNC_RETRY_SECONDS", "Seconds before the dataset service lists again a store that was unreachable.",
        default=15.0,
    )
    # A listing page that takes longer is given up and the store retried like an unreachable one: an endpoint that
    # answers a byte at a time (or a hung network file system) never trips a read timeout and would hold the sync,
    # and one of its concurrent slots, for ever. Above the S3 client's own attempts (3 of 30 s) for a dead one.
    sync_page_seconds: float = env(
        "SHOAL_SYNC_PAGE_SECONDS", "Seconds a sync waits for one listing page before it takes the store for "
        "unreachable.", default=120.0,
    )
    # pvc://<claim>/<sub/path> reads the files of a PersistentVolumeClaim of the dataset's namespace where it is
    # mounted: <root>/<namespace>/<claim> (claims are namespaced, so two namespaces' "data" claims never meet). In
    # Kubernetes each claim is mounted into the dataset service and agent pods there; on one machine it is a
    # plain folder per claim. Empty: pvc:// mounts are refused.
    pvc_root: str = env(
        "SHOAL_PVC_ROOT", "Folder where volume claims are mounted, as <root>/<namespace>/<claim>, for pvc:// mounts; "
        "empty refuses pvc://.", default="",
    )
    # Replicas of a service split what they reconcile by name (libs.members). The host's name is a pod's name in
    # Kubernetes, and stays the same when the pod's container restarts: it takes its keys back at once.
    replica_name: str = env("SHOAL_REPLICA_NAME", "This process's name among the replicas of its service (unique "
                            "per replica; the host's name by default).", default_factory=_host_name_token)
    # Fluid's autoSync is on unless a runtime turns it off: objects that land in the store show up in the mounts
    # within this long. Listing costs one request per 1000 objects, so minutes, not seconds; an unchanged
    # listing writes nothing. A runtime's metadataSyncPolicy.periodSeconds overrides it.
    autosync_seconds: float = env(
        "SHOAL_AUTOSYNC_SECONDS", "Seconds between listings of a dataset whose runtime leaves autoSync on "
        "(unless its metadataSyncPolicy gives periodSeconds); 0 turns periodic listing off.", default=300.0,
    )


# How long a mount process may take from its start to its mount. A start reads two records and the manifest and
# scans the cache (one open and two reads per block: a 1 TB disk tier of 4 MiB blocks is ~250,000 files, tens of
# seconds on a cold disk), so two minutes is far beyond a healthy start and short of "Starting" for ever.
MOUNT_START_SECONDS = 120.0
# The longest heartbeat interval: the agents' records expire a minute after the last beat (``libs.bus.
# AGENTS_TTL_SECONDS``; this module sits below it), and a node may miss three beats before it is not ready. Beating
# every 30 s, one missed beat let the record expire while the node still counted as fresh: a cache worker lost its
# seat to a spare, and the ring of block owners moved, at the first late beat.
MAX_HEARTBEAT_SECONDS = 20.0


def variable(group: type[Any], name: str) -> str:
    """The environment variable of the setting ``name`` of ``group``, for messages that say what to set."""
    return next(item.metadata["env"] for item in fields(group) if item.name == name)


# Named in the refusals of a command larger than the services take (``libs.bus``, ``libs.documents``).
MAX_EVENT_BYTES_VARIABLE = variable(ServiceSettings, "max_event_bytes")


@dataclass(frozen=True)
class AgentSettings:
    node_name: str = env("SHOAL_NODE_NAME", "This node's name in heartbeats and inventory (the Kubernetes node "
                         "name, dots included).",
                         default_factory=_host_name_token)
    mount_root: str = env("SHOAL_MOUNT_ROOT", "Datasets are mounted at <root>/<namespace>/<name>.",
                          default="/var/lib/shoal/mnt")
    runtimes: list[str] = env(
        "SHOAL_AGENT_RUNTIMES", "Runtimes this agent serves, as namespace/name; empty serves every runtime.",
        default_factory=list,
    )
    # Three missed beats make a node not ready; 2 s lets the runtime notice a dead agent within ~6 s. At most
    # ``MAX_HEARTBEAT_SECONDS``.
    heartbeat_seconds: float = env("SHOAL_HEARTBEAT_SECONDS", "Seconds between heartbeats (at most 20).",
                                   default=2.0)
    mount_start_seconds: float = env("SHOAL_MOUNT_START_SECONDS", "Seconds a mount process may take to mount; "
                                     "one that takes longer is reported Failing, stopped and started again with "
                                     "backoff.", default=MOUNT_START_SECONDS)
    # Memory for blocks fetched ahead, shared by every open file of every mount of the node.
    readahead_budget: str = env("SHOAL_READAHEAD_BUDGET", "Read-ahead memory of the node, all mounts together "
                                "(quantity).", default="512Mi")
    # Memory tiers of all the node's mounts together: 20 datasets with a 2Gi MEM tier each must not take 40Gi.
    memory_tier_budget: str = env("SHOAL_MEMORY_TIER_BUDGET", "Memory the MEM tiers of all the node's mounts may "
                                  "hold together (quantity); each mount gets at most its runtime's quota.",
                                  default="4Gi")
    labels: dict[str, str] = env("SHOAL_NODE_LABELS", "This node's labels as key=value,key=value (zone, region, "
                                 "any), matched against a Dataset's nodeAffinity; each key once, keys and values as "
                                 "Kubernetes allows them.", default_factory=dict)
    # Several agents on one machine (tests, `shoal up --agents N`) share the runtime's tier paths; each keeps
    # its blocks in its own folder below them.
    cache_subdir: str = env("SHOAL_CACHE_SUBDIR", "Folder below each tier path for this agent's blocks "
                            "(<path>/<subdir>/<namespace>/<name>); empty: <path>/<namespace>/<name>.", default="")
    # Loopback by default: peers on one machine. In a cluster, the node's address (every node must reach it).
    peer_host: str = env("SHOAL_PEER_HOST", "Address mount processes serve cached blocks to other nodes on, and "
                         "advertise.", default="127.0.0.1")
    # A file, not a variable: a secret in the environment shows in /proc and in crash reports.
    peer_secret_file: str = env("SHOAL_PEER_SECRET_FILE", "File holding the cluster's peer secret (each runtime's "
                                "signing key is derived from it); empty: no peer reads, every node reads the store.",
                                default="")
    # Blocks a DataLoad fetches at once per mount: with 4 MiB blocks, 8 GETs in flight fill ~1 Gbit/s at ~30 ms of
    # store latency while leaving most of the reader's 32 store slots to FUSE reads running beside the load.
    load_concurrency: int = env("SHOAL_LOAD_CONCURRENCY", "Blocks a DataLoad fetches from the store at once, per "
                                "mounted dataset.", default=8)
    # A job looping over a changed file fails every FUSE read: one line per file and errno this often (with the count
    # of those not logged) says it all without flooding the node's log.
    read_failure_log_seconds: float = env("SHOAL_READ_FAILURE_LOG_SECONDS", "Seconds between two \"read failed\" "
                                          "log lines of one file and errno in a mount process; those in between "
                                          "are counted, and told in the next line or a summary.", default=30.0)
    # Kubernetes rewrites a mounted Secret's files in place when it is rotated (within about a minute): a mount
    # process reads its secret files again this often, so new credentials take over without a resync. A few small
    # files per dataset with secret references; datasets without any read nothing.
    secret_refresh_seconds: float = env("SHOAL_SECRET_REFRESH_SECONDS", "Seconds between two reads of the secret "
                                        "files (encryptOptions) of a mounted dataset: a rewritten file's credentials "
                                        "are used from the next read of the store, without a resync.", default=10.0)
    cache_policy: str = env("SHOAL_CACHE_POLICY", "lfu-admission (keeps a stable subset) or lru.",
                            default="lfu-admission")
    # Training jobs read datasets as users other than the agent's (root); the kernel still checks every access
    # against the mode and owner each file is served with (default_permissions). False: only root can read.
    allow_other: bool = env("SHOAL_MOUNT_ALLOW_OTHER", "Let users other than the agent's read the mounts.",
                            default=True)
    # Each mount process has its own side server on a free port: Prometheus finds them through file_sd files
    # written here (``shoal up`` points its Prometheus at such a folder). Empty: no files.
    prometheus_targets_dir: str = env("SHOAL_PROMETHEUS_TARGETS_DIR", "Folder where each mount process writes its "
                                      "Prometheus file_sd target (<node>_<namespace>_<name>.json) while it runs; "
                                      "empty: none.", default="")


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler service: its HTTP front (admission webhook, extender) and its scoring weights."""

    # Loopback by default, like the side server; 0.0.0.0 in a pod, where the API server must reach the webhook.
    http_host: str = env("SHOAL_SCHED_HTTP_HOST", "Address the webhook and extender listen on.", default="127.0.0.1")
    # Off by default: a webhook needs a certificate the API server trusts, which only a deployment can provide.
    http_port: int | None = env("SHOAL_SCHED_HTTP_PORT", "Port of the webhook and extender (HTTPS with a "
                                "certificate): 0 picks a free one, off (default) serves none.", default=None)
    tls_cert: str = env("SHOAL_SCHED_TLS_CERT", "Certificate (PEM) of the webhook and extender; with the key, "
                        "HTTPS.", default="")
    tls_key: str = env("SHOAL_SCHED_TLS_KEY", "Private key (PEM) of SHOAL_SCHED_TLS_CERT.", default="")
    # Well under the API server's webhook timeout (10 s by default): an answer that comes late blocks pod creation.
    http_timeout: float = env("SHOAL_SCHED_HTTP_TIMEOUT", "Seconds an HTTP answer may take before the request "
                              "gets no preference.", default=2.0)
    # An AdmissionReview of a pod CREATE carries the pod once (oldObject is null). The API server refuses a create
    # body over 3 MiB (its default --max-request-body-bytes) and etcd a stored object over ~1.5 MiB; as JSON, a pod
    # sent as protobuf can take about twice its size, plus the defaults the API server fills in: 8 MiB is above any
    # pod the API server admits.
    webhook_max_bytes: int = env("SHOAL_SCHED_WEBHOOK_MAX_BYTES", "Largest AdmissionReview body /mutate reads "
                                 "(bytes); a longer one gets 413.", default=8 * 1024 * 1024)
    # With nodeCacheCapable: false (deploy/) kube-scheduler sends the pod and the full Node object of every node
    # that passed its own filters, 5-25 KiB each (most of it status.images, at most 50 by default). By default it
    # stops looking at percentageOfNodesToScore of the cluster: at most ~800 nodes at any size up to Kubernetes'
    # 5,000 (the most at 3,125 nodes, 25 %), ~20 MiB at 25 KiB a node. With percentageOfNodesToScore: 100, 32 MiB
    # is ~3,000 nodes of 10 KiB; larger clusters raise this, or set nodeCacheCapable: true (names only, ~30 bytes a
    # node; zone and region locality then come from the agents' labels).
    extender_max_bytes: int = env("SHOAL_SCHED_EXTENDER_MAX_BYTES", "Largest ExtenderArgs body /filter and "
                                  "/prioritize read (bytes; with nodeCacheCapable: false it holds every candidate "
                                  "Node); a longer one gets 413.", default=32 * 1024 * 1024)
    # A hostile body of tiny JSON objects decodes to ~25 times its size: this times the limits above bounds the
    # memory callers can make the scheduler hold. A real webhook call is read and answered in about a millisecond
    # and kube-scheduler asks the extender about one pod at a time, so 8 at once is already a burst of pods; one
    # more is told to try again (the webhook's failurePolicy: Ignore admits it unchanged).
    http_max_reading: int = env("SHOAL_SCHED_HTTP_MAX_READING", "Webhook and extender requests read and answered "
                                "at once; one more gets 503.", default=8)
    # Each API server and kube-scheduler keeps a few connections alive; an idle one counts, and each costs a file
    # descriptor. 256 is far above what they use and far below the descriptors a process has.
    http_max_connections: int = env("SHOAL_SCHED_HTTP_MAX_CONNECTIONS", "Connections the webhook and extender "
                                    "port keeps open at once; one more gets 503 and is closed.", default=256)
    # Fluid's affinity plugin defaults (node 100, zone 50, region 20): holding the bytes beats being near them.
    node_weight: int = env("SHOAL_SCHED_WEIGHT_NODE", "Weight of the bytes a node holds itself.", default=100)
    zone_weight: int = env("SHOAL_SCHED_WEIGHT_ZONE", "Weight of the bytes held in the node's zone.", default=50)
    region_weight: int = env("SHOAL_SCHED_WEIGHT_REGION", "Weight of the bytes held in the node's region.",
                             default=20)
    zone_label: str = env("SHOAL_SCHED_ZONE_LABEL", "Node label naming its zone.",
                          default="topology.kubernetes.io/zone")
    region_label: str = env("SHOAL_SCHED_REGION_LABEL", "Node label naming its region.",
                            default="topology.kubernetes.io/region")
    # The agents bucket forgets a silent agent after 60 s (its TTL): the same horizon for its cache here.
    node_timeout: float = env("SHOAL_SCHED_NODE_TIMEOUT", "Seconds without a heartbeat after which a node's cache "
                              "is forgotten.", default=60.0)


@dataclass(frozen=True)
class KubeSettings:
    """The Kubernetes bridge (services/bridge): which API server and which namespaces it watches."""

    # Empty: the in-cluster service account (the bridge's Deployment); a file for a bridge run outside the cluster.
    kubeconfig: str = env("SHOAL_KUBECONFIG", "kubeconfig file of the API server the bridge watches; empty: the "
                          "in-cluster service account.", default="")
    namespaces: list[str] = env("SHOAL_KUBE_NAMESPACES", "Namespaces whose custom resources the bridge watches "
                                "(comma-separated); empty: every namespace.", default_factory=list)
    # The apiserver ends a watch after its own timeout anyway; five minutes keeps re-lists rare and a stuck stream
    # short-lived (the bridge also gives up on a watch silent for 30 s longer than this).
    watch_seconds: int = env("SHOAL_KUBE_WATCH_SECONDS", "Seconds a watch runs before the bridge lists again "
                             "(every object handed over again, Secrets read again) and watches from that list.",
                             default=300)
    # In a cluster the services run in other pods and nodes than the bridge: they mount this one Secret instead of
    # reading the bridge's folder (deploy/ sets shoal-system/shoal-dataset-secrets).
    secret_mirror: str = env("SHOAL_KUBE_SECRET_MIRROR", "<namespace>/<name> of the Secret the bridge copies the "
                             "Secret keys named by encryptOptions into (data key <namespace>.<secret>.<key>), "
                             "for the services to mount as SHOAL_SECRETS_DIR; empty: files in the bridge's "
                             "SHOAL_SECRETS_DIR.", default="")

    @property
    def secret_mirror_ref(self) -> tuple[str, str] | None:
        """(namespace, name) of ``secret_mirror``, or None when unset (checked by ``load_settings``)."""
        namespace, _, name = self.secret_mirror.partition("/")
        return (namespace, name) if self.secret_mirror else None


@dataclass(frozen=True)
class Settings:
    nats: NatsSettings = field(default_factory=NatsSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    kube: KubeSettings = field(default_factory=KubeSettings)


T = TypeVar("T")


def _convert(raw: str, annotation: Any) -> Any:
    if annotation is Secret:
        return Secret(raw)
    if annotation == list[str]:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if annotation == dict[str, str]:
        pairs = [part.strip() for part in raw.split(",") if part.strip()]
        if any("=" not in pair for pair in pairs):
            raise ValueError("expected key=value pairs separated by commas")
        items = [(key.strip(), value.strip()) for key, value in (pair.split("=", 1) for pair in pairs)]
        keys = [key for key, _ in items]
        if repeated := sorted({key for key in keys if keys.count(key) > 1}):
            # A dict keeps the last value without a word: zone=a,zone=b would be zone=b.
            raise ValueError(f"{', '.join(map(repr, repeated))} given more than once: give each key one value")
        return dict(items)
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected true or false")
    if annotation is Path:
        return Path(raw)
    if annotation == int | None:  # a port that can be switched off
        lowered = raw.strip().lower()
        if lowered in ("off", "none", "disabled"):
            return None
        return _number(lowered, int, "expected a whole number, or off")
    if annotation in (int, float):
        return _number(raw.strip(), annotation, "expected a whole number" if annotation is int else "expected a number")
    return msgspec.convert(raw.strip(), annotation, strict=False)


def _number(raw: str, kind: type, expected: str) -> Any:
    """msgspec's conversion, its "Expected `int`, got `str`" said in the words of the setting's table."""
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError:
        raise ValueError(expected) from None


def _load_group(group: type[T], environ: Mapping[str, str], errors: list[str]) -> T:
    hints = get_type_hints(group)
    values: dict[str, Any] = {}
    for item in fields(group):  # type: ignore[arg-type]
        name = item.metadata["env"]
        if name not in environ:
            continue
        try:
            values[item.name] = _convert(environ[name], hints[item.name])
        except (ValueError, msgspec.ValidationError) as err:
            shown = "***" if hints[item.name] is Secret else repr(environ[name])
            errors.append(f"{name}={shown}: {err}")
    return group(**values)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; raises SettingsError listing every invalid variable."""
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    settings = Settings(
        nats=_load_group(NatsSettings, environ, errors),
        s3=_load_group(S3Settings, environ, errors),
        service=_load_group(ServiceSettings, environ, errors),
        agent=_load_group(AgentSettings, environ, errors),
        scheduler=_load_group(SchedulerSettings, environ, errors),
        kube=_load_group(KubeSettings, environ, errors),
    )
    if settings.nats.password_file:
        password = _password_from_file(settings.nats.password_file, "NATS_PASSWORD" in environ, errors)
        settings = replace(settings, nats=replace(settings.nats, password=password))
    for problem in _check(settings):
        errors.append(problem)
    if errors:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))
    return settings


def _password_from_file(path: str, given: bool, errors: list[str]) -> Secret:
    """The password NATS_PASSWORD_FILE holds (whitespace around it dropped, as a kubelet-written or ``echo``-made
    file ends with a newline); "" with the reason in ``errors`` when it cannot be used. Never what the file holds."""
    if given:
        errors.append("NATS_PASSWORD_FILE: given with NATS_PASSWORD; give one of them")
        return Secret("")
    try:
        password = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        errors.append(f"NATS_PASSWORD_FILE={path!r}: cannot read it ({reason})")
        return Secret("")
    if not password:
        errors.append(f"NATS_PASSWORD_FILE={path!r}: the file is empty")
    return Secret(password)


# urlsplit's reasons quote a part of the URL ("Port could not be cast to integer value as 's3cret'"): a password
# with '/', '?' or '#' in it ends the host part early, so what it quotes as the port is the password.
_QUOTED = re.compile(r"\s*(?:\bas\s+)?'.*'")
_ESCAPE_HINT = "; a '/', '?' or '#' in a password must be percent-encoded (%2F, %3F, %23)"


def nats_url_errors(urls: list[str], source: str) -> list[str]:
    """Why each URL of ``urls`` (named ``source``: NATS_URL, --nats) cannot name a NATS server, its user and
    password hidden. nats-py raises on such a URL (an unclosed '[', a port beyond 65535) from deep inside its
    connect: said here, before any connection, it is one line naming the URL instead of a traceback."""
    problems = []
    for url in urls:
        try:
            split = urlsplit(url if "://" in url else f"nats://{url}")
            split.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
        except ValueError as err:
            hint = _ESCAPE_HINT if "@" in url and _QUOTED.search(str(err)) else ""
            problems.append(f"{source}: {strip_userinfo(url, strict=True)!r} is not a server URL "
                            f"({_QUOTED.sub('', str(err))}){hint}")
            continue
        if not split.hostname:
            problems.append(f"{source}: {strip_userinfo(url, strict=True)!r} names no host")
    return problems


def _check(settings: Settings) -> list[str]:
    problems = []
    if not settings.nats.urls:
        problems.append("NATS_URL: at least one server URL is needed")
    problems += nats_url_errors(settings.nats.urls, "NATS_URL")
    if settings.service.log_level not in ("debug", "info", "warning", "error"):
        problems.append(f"SHOAL_LOG_LEVEL={settings.service.log_level!r}: use debug, info, warning or error")
    if settings.service.log_format not in ("json", "console", "auto"):
        problems.append(f"SHOAL_LOG_FORMAT={settings.service.log_format!r}: use json, console or auto")
    if settings.service.max_event_bytes <= 0:
        problems.append("SHOAL_MAX_EVENT_BYTES: must be positive")
    if settings.service.max_deliver < 1:
        problems.append("SHOAL_MAX_DELIVER: must be at least 1")
    if not 1 <= settings.service.list_page_size <= 1000:
        problems.append("SHOAL_LIST_PAGE_SIZE: must be between 1 and 1000")
    if settings.service.sync_retry_seconds <= 0:
        problems.append("SHOAL_SYNC_RETRY_SECONDS: must be positive")
    if settings.service.sync_page_seconds <= 0:
        problems.append("SHOAL_SYNC_PAGE_SECONDS: must be positive")
    if settings.service.autosync_seconds < 0:
        problems.append("SHOAL_AUTOSYNC_SECONDS: must be 0 (off) or positive")
    if settings.service.http_port is not None and not 0 <= settings.service.http_port <= 65535:
        problems.append(f"SHOAL_HTTP_PORT={settings.service.http_port}: use 0 to 65535, or off")
    if not 1 <= settings.nats.replicas <= 5:
        problems.append("SHOAL_STREAM_REPLICAS: JetStream allows 1 to 5 replicas")
    if settings.agent.cache_policy not in ("lfu-admission", "lru"):
        problems.append(f"SHOAL_CACHE_POLICY={settings.agent.cache_policy!r}: use lfu-admission or lru")
    if not 0 < settings.agent.heartbeat_seconds <= MAX_HEARTBEAT_SECONDS:
        problems.append(f"SHOAL_HEARTBEAT_SECONDS={settings.agent.heartbeat_seconds:g}: must be positive and at most "
                        f"{MAX_HEARTBEAT_SECONDS:g} (the agents' records expire {3 * MAX_HEARTBEAT_SECONDS:g} s after "
                        "the last beat: three beats, which a node may miss before it is not ready)")
    if settings.agent.mount_start_seconds <= 0:
        problems.append("SHOAL_MOUNT_START_SECONDS: must be positive")
    if not settings.agent.secret_refresh_seconds > 0:
        problems.append("SHOAL_SECRET_REFRESH_SECONDS: must be positive")
    if not settings.agent.read_failure_log_seconds >= 0:
        problems.append("SHOAL_READ_FAILURE_LOG_SECONDS: must be 0 (every failure) or positive")
    # The replica name is one token of a KV key. The node name is Kubernetes' (``spec.nodeName``), dots included
    # (EKS): subjects and durable names carry it as one token (``subjects.node_token``); never a wildcard.
    for variable, name, refused, example in (
            ("SHOAL_NODE_NAME", settings.agent.node_name, "*>", "the Kubernetes node name"),
            ("SHOAL_REPLICA_NAME", settings.service.replica_name, ".*>", "the host name with dots replaced by '-'")):
        if not name or any(c in name for c in f"{refused} \t\r\n"):
            problems.append(f"{variable}={name!r}: must be non-empty, without {', '.join(map(repr, refused))} or "
                            f"spaces (it names NATS subjects); e.g. {example}")
    # Matched against a Dataset's nodeAffinity, whose keys and values the API server checks: a label it would
    # refuse there (a space, a ':') could never be matched, and the node would be left out with no clue why.
    for key, value in settings.agent.labels.items():
        problems += [f"SHOAL_NODE_LABELS: {error}" for error in label_errors(key, value)]
    if settings.agent.load_concurrency < 1:
        problems.append(f"SHOAL_LOAD_CONCURRENCY={settings.agent.load_concurrency}: must be at least 1")
    for variable, quantity in (("SHOAL_READAHEAD_BUDGET", settings.agent.readahead_budget),
                               ("SHOAL_MEMORY_TIER_BUDGET", settings.agent.memory_tier_budget)):
        try:
            parse_quantity(quantity)
        except ValueError as err:
            problems.append(f"{variable}: {err}")
    if not settings.agent.mount_root.startswith("/"):
        problems.append(f"SHOAL_MOUNT_ROOT={settings.agent.mount_root!r}: must be an absolute path")
    # Joined below every tier path, by the agent and by its mount processes alike: an absolute path or a '..'
    # would put blocks outside the tier (and the agent would look for them elsewhere than its mounts wrote them).
    subdir = settings.agent.cache_subdir
    if subdir.startswith("/") or ".." in subdir.split("/"):
        problems.append(f"SHOAL_CACHE_SUBDIR={subdir!r}: must be a relative path without '..' (a folder below each "
                        "tier path, e.g. node-2)")
    for root in settings.service.local_roots:
        if not root.startswith("/"):
            problems.append(f"SHOAL_LOCAL_ROOTS: {root!r} must be an absolute path")
    if settings.service.pvc_root and not settings.service.pvc_root.startswith("/"):
        problems.append(f"SHOAL_PVC_ROOT={settings.service.pvc_root!r}: must be an absolute path")
    if settings.nats.user and not settings.nats.password and not settings.nats.password_file:  # a file: said above
        problems.append("NATS_PASSWORD: required when NATS_USER is set (or NATS_PASSWORD_FILE)")
    # Read only when connecting, where a missing file was a traceback (a service) or "cannot reach NATS" (the CLI).
    for variable, path in (("NATS_TLS_CA", settings.nats.tls_ca), ("NATS_TLS_CERT", settings.nats.tls_cert),
                           ("NATS_TLS_KEY", settings.nats.tls_key)):
        if path and not os.path.isfile(path):
            problems.append(f"{variable}={path!r}: no such file")
    if settings.nats.tls_key and not settings.nats.tls_cert:
        problems.append("NATS_TLS_KEY: given without NATS_TLS_CERT, the client certificate it is the key of")
    if settings.kube.watch_seconds < 1:
        problems.append(f"SHOAL_KUBE_WATCH_SECONDS={settings.kube.watch_seconds}: must be at least 1")
    # Matched against each runtime's "<namespace>/<name>": any other spelling (a bare name, kubectl's habit of
    # leaving the namespace to -n; a dot) matched no runtime, and the agent served nothing without a word.
    bad = [ref for ref in settings.agent.runtimes if not _runtime_ref(ref)]
    if bad:
        problems.append(f"SHOAL_AGENT_RUNTIMES: not <namespace>/<name> of a runtime: {', '.join(map(repr, bad))} "
                        "(e.g. default/demo)")
    bad = [ns for ns in settings.kube.namespaces if not (DNS1123_LABEL.fullmatch(ns) and len(ns) <= 63)]
    if bad:
        problems.append(f"SHOAL_KUBE_NAMESPACES: not namespace names: {', '.join(map(repr, bad))}")
    repeated = sorted({ns for ns in settings.kube.namespaces if settings.kube.namespaces.count(ns) > 1})
    if repeated:  # each would be listed and watched twice
        problems.append(f"SHOAL_KUBE_NAMESPACES: given more than once: {', '.join(repeated)}")
    mirror = settings.kube.secret_mirror_ref
    if mirror is not None and not (DNS1123_LABEL.fullmatch(mirror[0]) and len(mirror[0]) <= 63
                                   and DNS1123_SUBDOMAIN.fullmatch(mirror[1]) and len(mirror[1]) <= 253):
        problems.append(f"SHOAL_KUBE_SECRET_MIRROR={settings.kube.secret_mirror!r}: use <namespace>/<name> of a "
                        "Secret, e.g. shoal-system/shoal-dataset-secrets")
    return problems + _check_scheduler(settings.scheduler)


def _runtime_ref(ref: str) -> bool:
    """Whether ``ref`` is ``<namespace>/<name>`` of a runtime: a DNS-1123 label, then a DNS-1035 label."""
    namespace, _, name = ref.partition("/")
    return bool(DNS1123_LABEL.fullmatch(namespace) and DNS1035_LABEL.fullmatch(name)
                and len(namespace) <= 63 and len(name) <= 63)


def _check_scheduler(sched: SchedulerSettings) -> list[str]:
    problems = []
    if sched.http_port is not None and not 0 <= sched.http_port <= 65535:
        problems.append(f"SHOAL_SCHED_HTTP_PORT={sched.http_port}: use 0 to 65535, or off")
    if bool(sched.tls_cert) != bool(sched.tls_key):
        problems.append("SHOAL_SCHED_TLS_CERT and SHOAL_SCHED_TLS_KEY: give both or neither")
    if sched.http_timeout <= 0:
        problems.append("SHOAL_SCHED_HTTP_TIMEOUT: must be positive")
    for variable, value in (("SHOAL_SCHED_WEBHOOK_MAX_BYTES", sched.webhook_max_bytes),
                            ("SHOAL_SCHED_EXTENDER_MAX_BYTES", sched.extender_max_bytes),
                            ("SHOAL_SCHED_HTTP_MAX_READING", sched.http_max_reading),
                            ("SHOAL_SCHED_HTTP_MAX_CONNECTIONS", sched.http_max_connections)):
        if value < 1:
            problems.append(f"{variable}={value}: must be at least 1")
    for variable, weight in (("SHOAL_SCHED_WEIGHT_NODE", sched.node_weight),
                             ("SHOAL_SCHED_WEIGHT_ZONE", sched.zone_weight),
                             ("SHOAL_SCHED_WEIGHT_REGION", sched.region_weight)):
        if weight < 0:
            problems.append(f"{variable}={weight}: must be 0 or more")
    if max(sched.node_weight, sched.zone_weight, sched.region_weight) == 0:
        problems.append("SHOAL_SCHED_WEIGHT_*: at least one weight must be positive")
    if sched.node_timeout <= 0:
        problems.append("SHOAL_SCHED_NODE_TIMEOUT: must be positive")
    return problems


def describe_settings() -> list[tuple[str, str, str]]:
    """(variable, default, doc) of every setting, for READMEs and ``--help``."""
    rows = []
    for group in (NatsSettings, S3Settings, ServiceSettings, AgentSettings, SchedulerSettings, KubeSettings):
        defaults = group()
        for item in fields(group):
            default = getattr(defaults, item.name)
            if isinstance(default, dict):
                default = [f"{key}={value}" for key, value in default.items()]
            shown = ",".join(default) if isinstance(default, list) else str(default)
            rows.append((item.metadata["env"], shown, item.metadata["doc"]))
    return rows
