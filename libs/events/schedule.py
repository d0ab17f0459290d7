"""Scheduling questions: which nodes hold the bytes of the datasets a pod (or job) uses, asked over NATS
request/reply (``sched.score.v1``) by any scheduler; the webhook and the extender ask the same function.

Scores are 0..100 per node (the Kubernetes extender's range is 0..10 and is scaled there). ``required`` keeps
only nodes that hold some of the dataset's cache (Fluid's ``fluid.io/dataset.<name>.sched: required``). A request
that uses no dataset ranks nodes *without* cache first (Fluid's "prefer nodes without cache").

A reply lists the best ``limit`` nodes (100 unless the request says otherwise; 0: every node), so a cluster of
1,000 nodes answers with 100 entries, not 1,000: ``unlisted`` says how many nodes were scored but left out and
``unlistedScore`` the best score among them (every node left out scores at most that). The listed nodes are
exactly the first ``limit`` of the full ranking. Both fields are new in v1 with defaults, so a request without
``limit`` still decodes (and gets the best 100) and an older reader ignores the two counts.

The scheduler's one fact, ``scheduler.dataset.cache.v1``: how many bytes of a dataset's current files are in the
cache, each block once however many nodes hold it (only the scheduler folds every node's blocks).
"""

from __future__ import annotations

import msgspec

from libs.events.common import Event


class DatasetUse(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    name: str
    namespace: str = "default"
    # Only these dataset paths count (a file or folder, as in the mount); empty: the whole dataset.
    paths: list[str] = []
    required: bool = False


class Candidate(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """A node the caller may place the work on, with its labels (for zone/region locality). Labels empty: the
    labels the node's agent reported, if any."""

    name: str
    labels: dict[str, str] = {}


class ScoreRequest(Event, frozen=True, kw_only=True, tag="sched.score.v1", rename="camel"):
    datasets: list[DatasetUse] = []
    # Empty: every node the scheduler knows (agents that reported inventory or heartbeats).
    candidates: list[Candidate] = []
    # How many of the best nodes the reply lists (0: every node, e.g. to get a score per candidate). 100 by
    # default: more than a job's pods spread over, and a reply of ~15 KB of JSON rather than ~150 KB for 1,000 nodes.
    limit: int = 100


class NodeScore(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    node: str
    score: int
    # Bytes of the requested datasets (and paths) this node caches, and their share of the requested total.
    cached_bytes: int = 0
    share: float = 0.0
    # How the score was made, for a person ("holds 92% of default/imagenet", "same zone as a cache node").
    reason: str = ""


class ScoreReply(Event, frozen=True, kw_only=True, tag="sched.score.reply.v1", rename="camel"):
    """Nodes best first (ties broken by name); in required mode, nodes left out are listed in ``filtered``."""

    causation_id: str = ""
    scores: list[NodeScore] = []
    filtered: dict[str, str] = {}
    # Set when the request could not be answered (malformed, unknown dataset...); scores are then empty.
    error: str = ""
    # Nodes scored but not listed (the request's ``limit``), and the best score among them: every node that is
    # neither in ``scores`` nor in ``filtered`` scores at most ``unlisted_score``.
    unlisted: int = 0
    unlisted_score: int = 0


class DatasetCacheObserved(Event, frozen=True, kw_only=True, tag="scheduler.dataset.cache.v1", rename="camel"):
    """The bytes of a dataset's current file versions that at least one node caches, each block once: a block two
    nodes hold (a DataLoad with ``replicas: 2``, readers that each kept what they read) counts once here and twice in
    the nodes' own ``cachedBytes``. The dataset service's ``cachedPercentage`` is this over the dataset's size, moved
    by what the nodes' ``cachedBytes`` gained since (``nodesCachedBytes``, the same fold's sum of them): its
    ``cached`` is that sum at each inventory event, and the two columns must move together between two facts.
    Published by the scheduler when either figure changes, at most about once a second per dataset; ``id`` is a
    digest of what the figures were worked out from, so replicas folding the same events publish it once."""

    name: str
    namespace: str
    unique_cached_bytes: int
    # Nodes holding at least one block of the dataset's current files.
    nodes: int = 0
    # When the scheduler worked it out (RFC 3339, its clock).
    observed_at: str = ""
    # The nodes' own ``cachedBytes`` summed, as the fold that counted ``uniqueCachedBytes`` had them (a block two
    # nodes hold twice, old file versions too); None from a scheduler older than the field.
    nodes_cached_bytes: int | None = None
