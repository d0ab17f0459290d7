"""The scheduler's webhook and extender over real HTTPS on 127.0.0.1, with a throwaway self-signed certificate.

``answer`` is a stub here (``StubScheduler``: scores = share of the requested datasets' bytes a node caches):
the real scheduler core (the fold and ``domain.score``) is wired to ``SchedulerHttp`` in ``app.py`` on another
branch, and the end-to-end test with real agents comes after that merge. What is real: the aiohttp server, TLS,
the recorded AdmissionReview as the API server sends it, and the returned JSON patch applied to the pod with the
``jsonpatch`` package, as the API server applies it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gc
import io
import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest

from libs import listener
from libs.events.schedule import NodeScore, ScoreReply, ScoreRequest
from services.scheduler.http import MAX_PROBED, HttpLimits, SchedulerHttp, http_loop, server_tls
from tests.helpers import eventually, json_lines, json_logs
from tests.metric_values import Snapshot

FIXTURES = Path(__file__).parent.parent / "fixtures" / "scheduler"
HOST = "kubernetes.io/hostname"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
NODES = ["node-a", "node-b", "node-c"]
# ml-team/imagenet: node-b holds 90 % of it, node-a 10 %, node-c nothing.
CACHE = {("ml-team", "imagenet"): {"node-b": 900, "node-a": 100}}
ZONE, POOL = "topology.kubernetes.io/zone", "shoal.io/pool"
# The labels the nodes' agents report (SHOAL_NODE_LABELS): the cache is on the CPU nodes of zone-1.
NODE_LABELS = {"node-a": {ZONE: "zone-1", POOL: "cpu"}, "node-b": {ZONE: "zone-1", POOL: "cpu"},
               "node-c": {ZONE: "zone-2", POOL: "gpu"}}

pytestmark = pytest.mark.needs("openssl")


@dataclass
class StubScheduler:
    """Stands in for the scheduler core's ``answer``: unknown datasets are an error, required datasets keep only
    the nodes that hold some of them, no dataset ranks nodes without cache first."""

    cache: dict[tuple[str, str], dict[str, int]] = field(default_factory=lambda: copy.deepcopy(CACHE))
    requests: list[ScoreRequest] = field(default_factory=list)
    # Replaces the answer when set (a slow or failing scheduler).
    override: Callable[[ScoreRequest], ScoreReply] | None = None

    def __call__(self, request: ScoreRequest) -> ScoreReply:
        self.requests.append(request)
        if self.override is not None:
            return self.override(request)
        names = [c.name for c in request.candidates] or NODES
        for use in request.datasets:
            if (use.namespace, use.name) not in self.cache:
                return ScoreReply(causation_id=request.id, error=f"unknown dataset {use.namespace}/{use.name}")
        if not request.datasets:
            holders = {node for nodes in self.cache.values() for node, size in nodes.items() if size}
            scores = [NodeScore(node=n, score=0 if n in holders else 100) for n in names]
            return ScoreReply(causation_id=request.id, scores=sorted(scores, key=lambda s: (-s.score, s.node)))
        held = [self.cache[(use.namespace, use.name)] for use in request.datasets]
        total = sum(sum(nodes.values()) for nodes in held)
        filtered = {n: f"holds none of {use.namespace}/{use.name}" for n in names for use in request.datasets
                    if use.required and not self.cache[(use.namespace, use.name)].get(n)}
        scores = [NodeScore(node=n, score=round(100 * sum(h.get(n, 0) for h in held) / total),
                            cached_bytes=sum(h.get(n, 0) for h in held)) for n in names if n not in filtered]
        return ScoreReply(causation_id=request.id, scores=sorted(scores, key=lambda s: (-s.score, s.node)),
                          filtered=filtered)


@dataclass
class Tls:
    cert: Path
    key: Path

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway self-signed certificate for the webhook's service name and 127.0.0.1 (what the API server
    would trust through the configuration's caBundle)."""
    return self_signed(tmp_path_factory.mktemp("tls"))


def self_signed(folder: Path) -> Tls:
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=shoal-scheduler.shoal-system.svc",
         "-addext", "subjectAltName=DNS:shoal-scheduler.shoal-system.svc,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return Tls(cert, key)


@dataclass
class Served:
    http: SchedulerHttp
    stub: StubScheduler
    url: str
    session: aiohttp.ClientSession

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(f"{self.url}{path}", data=data,
                                     headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.json()


@pytest.fixture
async def served(tls: Tls) -> AsyncIterator[Served]:
    stub = StubScheduler()
    # 2 s: far above the stub's microseconds even on a loaded machine; the slow-answer test sets its own.
    http = SchedulerHttp(stub, timeout=2.0, labels=lambda node: NODE_LABELS.get(node, {}))
    port = await http.start("127.0.0.1", 0, server_tls(str(tls.cert), str(tls.key)))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client()),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield Served(http, stub, f"https://127.0.0.1:{port}", session)
    finally:
        await http.stop()


def recorded_review() -> dict[str, Any]:
    return json.loads((FIXTURES / "admission-review-pod-with-dataset.json").read_text())


def patched_pod(review: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it after applying the webhook's patch (the same pod when none)."""
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
    if "patch" not in response:
        assert "patchType" not in response
        return review["request"]["object"]
    assert response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(review["request"]["object"], json.loads(base64.b64decode(response["patch"])))


def best_preferred(pod: dict[str, Any]) -> list[str]:
    terms = pod["spec"]["affinity"]["nodeAffinity"][PREFERRED]
    best = max(terms, key=lambda term: term["weight"])
    (expression,) = best["preference"]["matchExpressions"]
    assert expression["key"] == HOST and expression["operator"] == "In"
    return list(expression["values"])


async def test_recorded_review_of_a_pod_with_a_dataset_pvc_prefers_the_node_holding_it(served: Served) -> None:
    review = recorded_review()
    metrics = Snapshot()
    status, answer = await served.post("/mutate", review)
    assert metrics.moved("shoal_scheduler_decision_duration_seconds_count", way="webhook") == 1  # timed once
    assert status == 200
    pod = patched_pod(review, answer)
    assert best_preferred(pod) == ["node-b"]
    weights = {tuple(t["preference"]["matchExpressions"][0]["values"]): t["weight"]
               for t in pod["spec"]["affinity"]["nodeAffinity"][PREFERRED]}
    assert weights == {("node-b",): 90, ("node-a",): 10}
    assert REQUIRED not in pod["spec"]["affinity"]["nodeAffinity"]
    # Nothing else of the pod changed.
    original = review["request"]["object"]
    assert {k: v for k, v in pod["spec"].items() if k != "affinity"} == original["spec"]
    assert pod["metadata"] == original["metadata"]
    (request,) = served.stub.requests
    assert [(u.namespace, u.name, u.required) for u in request.datasets] == [("ml-team", "imagenet", False)]
    assert served.http.counts["mutate.patched"] == 1


async def test_required_label_requires_the_nodes_that_hold_the_cache(served: Served) -> None:
    review = recorded_review()
    review["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenet.sched"] = "required"
    # The pod already has a required term of its own: ours must narrow it, not add an alternative.
    review["request"]["object"]["spec"]["affinity"] = {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}
    status, answer = await served.post("/mutate", review)
    assert status == 200
    pod = patched_pod(review, answer)
    (term,) = pod["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
        {"key": HOST, "operator": "In", "values": ["node-a", "node-b"]},
    ]
    assert best_preferred(pod) == ["node-b"]


async def test_required_with_no_cache_anywhere_is_not_enforced_and_says_so(served: Served) -> None:
    served.stub.cache[("ml-team", "imagenet")] = {}
    review = recorded_review()
    review["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenet.sched"] = "required"
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    (warning,) = answer["response"]["warnings"]
    assert warning.startswith("shoal: no node caches ml-team/imagenet yet, so the pod is not restricted")
    assert "with the scheduler extender it stays Pending until one does" in warning


async def test_two_required_datasets_cached_on_different_nodes_are_warned_as_such(served: Served) -> None:
    # imagenet is on node-a and node-b, coco only on node-c: no node caches both. The warning said "no node caches
    # ml-team/coco, ml-team/imagenet yet", which sent the user to load data that was already loaded.
    served.stub.cache[("ml-team", "coco")] = {"node-c": 500}
    review = recorded_review()
    labels = review["request"]["object"]["metadata"]["labels"]
    labels["fluid.io/dataset.imagenet.sched"] = labels["fluid.io/dataset.coco.sched"] = "required"
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    (warning,) = answer["response"]["warnings"]
    assert warning.startswith("shoal: no one node caches all of ml-team/coco, ml-team/imagenet (ml-team/coco on "
                              "node-c; ml-team/imagenet on node-b, node-a)"), warning
    served.stub.cache[("ml-team", "coco")] = {}
    status, answer = await served.post("/mutate", review)
    (warning,) = answer["response"]["warnings"]
    assert warning.startswith("shoal: no node caches ml-team/coco yet"), warning


def required_expression(key: str, operator: str, *values: str) -> dict[str, Any]:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        expression["values"] = list(values)
    return {"affinity": {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [{"matchExpressions": [expression]}]}}}}


EXCLUDING = {
    "nodeSelector": {"nodeSelector": {POOL: "gpu"}},
    "required affinity": required_expression(ZONE, "In", "zone-2"),
    "NotIn": required_expression(POOL, "NotIn", "cpu"),
    "own host name": {"nodeSelector": {HOST: "node-c"}},
}


@pytest.mark.parametrize("own", EXCLUDING)
async def test_a_pod_whose_own_placement_excludes_every_holder_of_a_required_dataset_is_warned(
        served: Served, own: str) -> None:
    # The pod requires ml-team/imagenet (cached on node-a and node-b, the CPU nodes of zone-1) and its own
    # nodeSelector or node affinity keeps it off both: it stayed Pending and nobody said why. Now the answer warns,
    # naming the dataset and its nodes and what to change; the pod is still admitted, and not held to those nodes.
    review = recorded_review()
    review["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenet.sched"] = "required"
    review["request"]["object"]["spec"].update(copy.deepcopy(EXCLUDING[own]))
    status, answer = await served.post("/mutate", review)
    assert status == 200
    pod = patched_pod(review, answer)  # allowed, uid echoed
    (warning,) = answer["response"]["warnings"]
    assert warning == ("shoal: the pod requires ml-team/imagenet but its own node selector or affinity excludes "
                       "every node caching it (node-a, node-b); the extender keeps it Pending until a node it allows "
                       "does: allow one, or load the data there")
    assert len(warning) <= 256  # the API server may cut longer warnings
    # No host list it can never meet is frozen into the pod (as with no cache anywhere): a node it allows that
    # caches the data later can still take it.
    terms = pod["spec"].get("affinity", {}).get("nodeAffinity", {}).get(REQUIRED, {}).get("nodeSelectorTerms", [])
    added = [e for term in terms for e in term.get("matchExpressions", []) if e["key"] == HOST and e["values"] != []]
    assert not added
    if own == "own host name":
        assert pod == review["request"]["object"], "a pod that places itself gets nothing added"


ALLOWING = {
    "a holder's pool": {"nodeSelector": {POOL: "cpu"}},
    "a label no agent reports": {"nodeSelector": {"nvidia.com/gpu.product": "A100"}},
    "one term of two allows zone-1": {"affinity": {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": ZONE, "operator": "In", "values": ["zone-2"]}]},
        {"matchExpressions": [{"key": ZONE, "operator": "In", "values": ["zone-1"]}]}]}}}},
    "own host name, a holder": {"nodeSelector": {HOST: "node-b"}},
}


@pytest.mark.parametrize("own", ALLOWING)
async def test_a_pod_whose_own_placement_allows_a_holder_is_not_warned(served: Served, own: str) -> None:
    # Only a certain exclusion is said: a label the agents do not report may well be on a holder.
    review = recorded_review()
    review["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenet.sched"] = "required"
    review["request"]["object"]["spec"].update(copy.deepcopy(ALLOWING[own]))
    status, answer = await served.post("/mutate", review)
    assert status == 200 and "warnings" not in answer["response"]
    patched_pod(review, answer)


async def test_an_ordinary_pvc_next_to_the_dataset_does_not_cancel_the_preference(served: Served) -> None:
    review = recorded_review()
    review["request"]["object"]["spec"]["volumes"].append(
        {"name": "db", "persistentVolumeClaim": {"claimName": "postgres-data"}})
    status, answer = await served.post("/mutate", review)
    assert status == 200 and best_preferred(patched_pod(review, answer)) == ["node-b"]


async def test_a_pod_with_only_an_ordinary_pvc_is_left_alone_and_counted_once(served: Served) -> None:
    review = recorded_review()
    review["request"]["object"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "postgres-data"
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    assert dict(served.http.counts) == {"mutate.unanswered": 1}


async def test_a_pod_naming_thousands_of_claims_is_not_asked_about_one_by_one(served: Served) -> None:
    """Each dataset a pod names is asked about on its own only up to ``MAX_PROBED``: one question per claim held
    the event loop (folding, every other answer) for over a second for a pod of 50,000 claims, which anyone who may
    create a pod can send to the webhook. Beyond that the first answer's error stands: the pod is admitted unchanged
    and ranked 0 everywhere, as for any question the scheduler cannot answer; below it the probing still finds the
    dataset among ordinary PVCs."""
    claims = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": f"pvc-{i}"}} for i in range(5000)]
    review = recorded_review()
    review["request"]["object"]["spec"]["volumes"] += claims
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    assert len(served.stub.requests) == 1
    pod = {"Pod": {"metadata": {"namespace": "ml-team"}, "spec": review["request"]["object"]["spec"]},
           "NodeNames": NODES}
    status, ranked = await served.post("/prioritize", pod)
    assert status == 200 and {p["Score"] for p in ranked} == {0}
    assert len(served.stub.requests) == 2
    # Up to the bound, the ordinary PVCs are dropped and the dataset among them still places the pod.
    review["request"]["object"]["spec"]["volumes"] = review["request"]["object"]["spec"]["volumes"][:MAX_PROBED]
    status, answer = await served.post("/mutate", review)
    assert status == 200 and best_preferred(patched_pod(review, answer)) == ["node-b"]


async def test_a_required_dataset_the_scheduler_does_not_know_is_said_in_a_warning(served: Served) -> None:
    """A typo in the required label: the pod cannot be placed by its data (the error stands, so not even by the
    dataset its PVC names), and the person who created it reads why in kubectl's warnings instead of nothing,
    and that the extender keeps it Pending until the dataset exists."""
    review = recorded_review()
    review["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenett.sched"] = "required"
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    (warning,) = answer["response"]["warnings"]
    assert warning == ("shoal: the pod is not placed near its data: unknown dataset ml-team/imagenett; with the "
                       "extender it stays Pending until the dataset exists")
    assert dict(served.http.counts) == {"mutate.unanswered": 1}
    # Any other error (the scheduler starting): the extender does not keep the pod Pending, so nothing says it does.
    served.stub.override = lambda request: ScoreReply(error="the scheduler is starting")
    status, answer = await served.post("/mutate", review)
    assert answer["response"]["warnings"] == ["shoal: the pod is not placed near its data: the scheduler is starting"]
    served.stub.override = None
    served.http.counts.clear()
    review = recorded_review()
    review["request"]["object"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "postgres-data"
    status, answer = await served.post("/mutate", review)
    assert status == 200 and "warnings" not in answer["response"]


@pytest.mark.parametrize("own", [
    {"nodeSelector": {HOST: "node-c"}},
    {"affinity": {"nodeAffinity": {PREFERRED: [
        {"weight": 50, "preference": {"matchExpressions": [{"key": HOST, "operator": "In", "values": ["node-c"]}]}}]}}},
])
async def test_pods_with_their_own_host_placement_are_left_alone(served: Served, own: dict[str, Any]) -> None:
    review = recorded_review()
    review["request"]["object"]["spec"].update(own)
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    assert served.stub.requests == []  # the scheduler was not even asked


async def test_a_pod_without_datasets_is_left_alone(served: Served) -> None:
    review = recorded_review()
    review["request"]["object"]["spec"]["volumes"] = []
    status, answer = await served.post("/mutate", review)
    assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
    assert served.http.counts["mutate.unchanged"] == 1


# The answer timeout once the scheduler is no longer slow (see the test below).
RECOVERED_SECONDS = 30.0
# How long an answer takes on the loaded machine the test below stands for.
LOADED_ANSWER_SECONDS = 0.5


@pytest.mark.parametrize("loaded", [False, True], ids=["quiet", "loaded"])
@pytest.mark.parametrize("threaded", [False, True], ids=["on-the-loop", "threaded"])
async def test_a_slow_or_failing_scheduler_allows_the_pod_unchanged(tls: Tls, threaded: bool, loaded: bool) -> None:
    """``loaded``: the scheduler, back, answers as on a machine so busy that it takes LOADED_ANSWER_SECONDS (longer
    than the short timeouts the slow answer is judged by); the answer is still used."""
    release = threading.Event()
    late = ScoreReply(scores=[NodeScore(node="node-b", score=90)])

    def slow(request: ScoreRequest) -> ScoreReply:
        if threaded:  # hangs until released: the server must stop waiting on its own
            return late if release.wait(30) else ScoreReply(error="never released")
        time.sleep(0.3)  # on the loop's thread: answers, but after the timeout, so the answer is not used
        return late

    stub = StubScheduler(override=slow)
    http = SchedulerHttp(stub, timeout=0.05 if not threaded else 0.3, threaded=threaded)
    port = await http.start("127.0.0.1", 0, server_tls(str(tls.cert), str(tls.key)))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client()),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            served = Served(http, stub, f"https://127.0.0.1:{port}", session)
            review = recorded_review()
            status, answer = await served.post("/mutate", review)
            assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
            assert http.counts["mutate.timeout"] == 1
            release.set()
            # From here on no answer is slow: a timeout far above any machine's pace, so a loaded one (CI runs 4
            # workers on 2 cores) makes no answer late. The short one above held for the slow answer only: 0.3 s
            # asleep is longer than 0.05 s on any machine, and the threaded one never answers by itself. A call
            # queued behind the released one (one worker thread) would otherwise wait for that one's wake-up too.
            http.timeout = RECOVERED_SECONDS

            def broken(request: ScoreRequest) -> ScoreReply:
                raise RuntimeError("fold unavailable")

            stub.override = broken
            status, answer = await served.post("/mutate", review)
            assert status == 200 and patched_pod(review, answer) == review["request"]["object"]
            assert http.counts["mutate.failed"] == 1
            # The extender degrades the same way: an Error to ignore, neutral priorities.
            extender = json.loads((FIXTURES / "extender-args-nodes.json").read_text())
            status, result = await served.post("/filter", extender)
            assert status == 200 and "RuntimeError" in result["Error"]
            status, ranked = await served.post("/prioritize", extender)
            assert status == 200 and [p["Score"] for p in ranked] == [0, 0, 0]
            # And it recovers when the scheduler does.
            stub.override = None
            if loaded:
                busy = StubScheduler()

                def busy_machine(request: ScoreRequest) -> ScoreReply:
                    time.sleep(LOADED_ANSWER_SECONDS)  # stands for a descheduled process, not a synchronisation
                    return busy(request)

                stub.override = busy_machine
            status, answer = await served.post("/mutate", review)
            assert best_preferred(patched_pod(review, answer)) == ["node-b"]
    finally:
        release.set()
        await http.stop()


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "not an AdmissionReview v1 of a pod"),
    ({"apiVersion": "v1", "kind": "Pod"}, "expected apiVersion admission.k8s.io/v1"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}},
     "request.kind must be an object"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
      "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE"}},
     "request.object must be an object"),
])
async def test_a_malformed_review_is_a_400_with_the_reason(served: Served, body: Any, reason: str) -> None:
    metrics = Snapshot()
    status, answer = await served.post("/mutate", body)
    assert status == 400 and reason in answer["error"]
    assert served.http.counts["mutate.malformed"] == 1
    assert metrics.moved("shoal_scheduler_decision_duration_seconds_count", way="webhook") == 1  # timed as well
    async with served.session.get(f"{served.url}/healthz") as health:
        assert health.status == 200


async def test_a_body_over_its_routes_limit_is_a_413_with_the_reason(served: Served) -> None:
    # Bodies of up to 64 MiB were read and decoded whole, whatever the route: hostile JSON of tiny objects took
    # ~1.6 GB while decoded. A webhook body is now at most 8 MiB (above any pod the API server admits), an extender
    # body 32 MiB (kube-scheduler's Node objects), refused before more than that is read.
    review = recorded_review()
    review["request"]["object"]["metadata"]["annotations"] = {"padding": "x" * (8 * 1024 * 1024)}
    metrics = Snapshot()
    async with served.session.post(f"{served.url}/mutate", data=io.BytesIO(json.dumps(review).encode()),
                                   headers={"Content-Type": "application/json"}) as response:
        # With a Content-Length: refused before a byte of it is read.
        status, answer = response.status, await response.json()
    assert status == 413 and "over the limit of 8388608 bytes for /mutate" in answer["error"]
    assert served.stub.requests == [] and dict(served.http.counts) == {"mutate.too_large": 1}
    assert metrics.moved("shoal_scheduler_decisions_total", way="webhook", outcome="too_large") == 1
    sent = 0

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found while reading
        nonlocal sent
        yield b'{"Pod": {"metadata": {"namespace": "ml-team"}, "spec": {}}, "NodeNames": ["'
        while sent < 40 * 1024 * 1024:
            sent += 1024 * 1024
            yield b"n" * (1024 * 1024)
        yield b'"]}'

    async with served.session.post(f"{served.url}/filter", data=chunked()) as response:
        assert response.status == 413
        assert "over the limit of 33554432 bytes for /filter" in (await response.json())["Error"]
    assert served.http.counts["filter.too_large"] == 1 and served.stub.requests == []
    status, _ = await served.post("/mutate", recorded_review())  # bodies within the limit are answered as before
    assert status == 200


async def test_requests_beyond_those_being_read_at_once_get_a_503_with_the_reason(served: Served) -> None:
    # Nothing bounded how many bodies were read and decoded at once. Eight now (each request holds its place until
    # it is answered); one more is told to try again, and the webhook's failurePolicy: Ignore admits its pod.
    body = json.dumps(recorded_review()).encode()
    release = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield body[:100]
        await release.wait()
        yield body[100:]

    async def held() -> tuple[int, Any]:
        async with served.session.post(f"{served.url}/mutate", data=slowly()) as response:
            return response.status, await response.json()

    holding = [asyncio.create_task(held()) for _ in range(8)]
    try:
        await eventually(lambda: _async(served.http.reading == 8), what="eight requests being read")
        status, answer = await served.post("/mutate", recorded_review())
        assert status == 503 and "too many requests being read at once (8)" in answer["error"]
        status, result = await served.post("/prioritize", json.loads((FIXTURES / "extender-args-nodes.json")
                                                                     .read_text()))
        assert status == 503 and "too many requests being read at once" in result["Error"]
        assert served.http.counts["mutate.busy"] == served.http.counts["prioritize.busy"] == 1
        release.set()
        for status, answer in await asyncio.gather(*holding):
            assert status == 200 and best_preferred(patched_pod(recorded_review(), answer)) == ["node-b"]
    finally:
        release.set()
        await asyncio.gather(*holding, return_exceptions=True)
    assert served.http.reading == 0
    status, _ = await served.post("/mutate", recorded_review())
    assert status == 200


async def test_a_body_that_stalls_is_a_408_and_gives_its_place_back(tls: Tls) -> None:
    # A request held its place among the eight being read for as long as its body stalled (aiohttp bounds no body
    # read, and its keep-alive timeout does not run during a request): eight connections that sent headers and a
    # byte of body refused every webhook and extender call, for as long as they stayed open. A body now has
    # body_seconds to arrive; a late one gets 408 with the reason and its connection is closed.
    http = SchedulerHttp(StubScheduler(), timeout=2.0, limits=HttpLimits(body_seconds=1.0))
    port = await http.start("127.0.0.1", 0, server_tls(str(tls.cert), str(tls.key)))
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for path in ["/mutate"] * 7 + ["/filter"]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client())
            writer.write(f"POST {path} HTTP/1.1\r\nHost: shoal\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n{".encode())
            stalled.append((reader, writer))
        answers = [await asyncio.wait_for(reader.read(), 30) for reader, _ in stalled]  # closed after the answer
        reason = b'rror":"request body not received within 1 s"'  # the webhook's "error", the extender's "Error"
        assert all(answer.startswith(b"HTTP/1.1 408 ") and reason in answer for answer in answers)
        assert http.reading == 0
        assert http.counts["mutate.slow_body"] == 7 and http.counts["filter.slow_body"] == 1
        async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client())) as session,
                    session.post(f"https://127.0.0.1:{port}/mutate", json=recorded_review()) as response):
            assert response.status == 200
            assert best_preferred(patched_pod(recorded_review(), await response.json())) == ["node-b"]
    finally:
        for _, writer in stalled:
            writer.close()
        await http.stop()


async def test_a_caller_that_goes_away_mid_body_is_counted_gone_not_as_an_internal_error(
        served: Served, tls: Tls, monkeypatch: pytest.MonkeyPatch) -> None:
    # A caller closing its connection before its body was in (it gave up, its connection broke) made the body read
    # raise ConnectionResetError: counted "internal" (a bug here) and logged as an error with a traceback.
    port = int(served.url.rsplit(":", 1)[1])
    with json_logs(monkeypatch) as logs:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client())
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: shoal\r\nContent-Length: 1000\r\n\r\n{")
        await eventually(lambda: _async(served.http.reading == 1), what="the request being read")
        writer.close()
        await eventually(lambda: _async(served.http.reading == 0), what="the request given up")
    assert dict(served.http.counts) == {"mutate.gone": 1}
    levels = [line["level"] for line in json_lines(logs.getvalue())]
    assert "error" not in levels and "info" in levels
    status, _ = await served.post("/mutate", recorded_review())
    assert status == 200


async def test_connections_beyond_the_cap_get_a_503_and_are_closed(served: Served, tls: Tls) -> None:
    # Nothing bounded the connections the port kept open: idle ones could use up the process's descriptors. 256 at
    # once now (SHOAL_SCHED_HTTP_MAX_CONNECTIONS); one more is answered 503 with the reason and closed.
    port = int(served.url.rsplit(":", 1)[1])
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(256):
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client())
            idle.append(writer)
        await eventually(lambda: _async(served.http.connections == 256), what="256 connections open")
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client())
        idle.append(writer)
        refused = await asyncio.wait_for(reader.read(), 10)  # all of it: the server closes the connection
        assert refused.startswith(b"HTTP/1.1 503 ") and b"too many connections open (256)" in refused
        assert served.http.listener is not None and served.http.listener.refused == 1
        for writer in idle[:2]:
            writer.close()
        await eventually(lambda: _async(served.http.connections <= 254), what="two connections closed")
        async with served.session.get(f"{served.url}/healthz") as health:
            assert health.status == 200
    finally:
        for writer in idle:
            writer.close()


async def _async(value: Any) -> Any:
    return value


@pytest.fixture
async def small_cap(tls: Tls, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """The webhook over TLS keeping at most 4 connections (and 4 handshakes under way), a handshake given the
    seconds the test's parameter says (set before the server starts: it may read them then)."""
    monkeypatch.setattr(listener, "HANDSHAKE_SECONDS", request.param)
    http = SchedulerHttp(StubScheduler(), timeout=2.0, limits=HttpLimits(connections=4))
    port = await http.start("127.0.0.1", 0, server_tls(str(tls.cert), str(tls.key)))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client(), force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield Served(http, StubScheduler(), f"https://127.0.0.1:{port}", session)
    finally:
        await http.stop()


@dataclass
class Silent:
    """TCP connections to a TLS port that never finish a handshake, in the order they were opened."""

    readers: list[asyncio.StreamReader] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def open(self, port: int, count: int, partial: bool = False) -> None:
        """``count`` more that never send a ClientHello (``partial``: its first bytes, never the rest)."""
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if partial:
                writer.write(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header and the start of a ClientHello
                await writer.drain()
            self.readers.append(reader)
            self.writers.append(writer)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


async def dropped(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed this connection without a byte (a close, or a reset: unread bytes were there)."""
    try:
        return await asyncio.wait_for(reader.read(), 30) == b""
    except ConnectionResetError:
        return True


# A handshake timeout far beyond the test's waits: the extra connections must be dropped for the count, not by it.
@pytest.mark.parametrize("small_cap", [600.0], indirect=True)
async def test_connections_that_never_finish_their_tls_handshake_are_bounded(small_cap: Served) -> None:
    # Connections were counted only once their TLS handshake was done, and a handshake could take 10 s: a client
    # opening connections and never sending a ClientHello held as many descriptors (and TLS objects) as it could
    # open in 10 s. Now at most the cap are under way at once and one more drops the oldest, so a real client,
    # whose handshake takes milliseconds, still gets in.
    port = int(small_cap.url.rsplit(":", 1)[1])
    capped = small_cap.http.listener
    assert capped is not None
    silent = Silent()
    try:
        await silent.open(port, 8)
        await silent.open(port, 4, partial=True)
        # The 8 oldest are dropped without a byte; the 4 newest stay in their handshake.
        for reader in silent.readers[:8]:
            assert await dropped(reader)
        await eventually(lambda: _async(capped.handshaking == 4), what="4 handshakes under way")
        assert capped.dropped == 8 and small_cap.http.connections == 0
        async with small_cap.session.get(f"{small_cap.url}/healthz") as health:
            assert health.status == 200
        # The oldest one still under way made room for the real client.
        assert capped.dropped == 9 and await dropped(silent.readers[8])
    finally:
        silent.close()


@pytest.mark.parametrize("small_cap", [0.5], indirect=True)
async def test_a_tls_handshake_not_finished_in_time_is_dropped(small_cap: Served) -> None:
    # Bounded in time too: silent or stalled handshakes end after HANDSHAKE_SECONDS (0.5 s here), and a real
    # client is answered meanwhile and after.
    port = int(small_cap.url.rsplit(":", 1)[1])
    capped = small_cap.http.listener
    assert capped is not None
    silent = Silent()
    try:
        await silent.open(port, 2)
        await silent.open(port, 1, partial=True)
        async with small_cap.session.get(f"{small_cap.url}/healthz") as health:
            assert health.status == 200
        for reader in silent.readers:
            assert await dropped(reader)
        await eventually(lambda: _async(capped.handshaking == 0), what="no handshake under way")
        assert capped.dropped == 0, "ended by the timeout, not dropped for room"
        async with small_cap.session.get(f"{small_cap.url}/healthz") as health:
            assert health.status == 200
    finally:
        silent.close()


async def handshake_request_and_close(port: int, client: ssl.SSLContext, request: bytes) -> bytes:
    """A TLS client whose last handshake message, request and close_notify reach the server in one segment (a
    client that sends its request and closes its side at once), then a FIN; what it reads back, decrypted."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                incoming.write(await asyncio.wait_for(reader.read(65536), 30))
        tls.write(request)
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's close_notify is read below, with the rest
            tls.unwrap()
        writer.write(outgoing.read())
        writer.write_eof()
        incoming.write(await asyncio.wait_for(reader.read(), 30))
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except (ssl.SSLError, ssl.SSLZeroReturnError):
                return answer
            if not chunk:
                return answer
            answer += chunk
    finally:
        writer.close()


@pytest.mark.parametrize("small_cap", [600.0], indirect=True)
async def test_a_request_and_close_sent_with_the_handshake_leave_no_error(small_cap: Served, tls: Tls,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # The handshake's last bytes, a request and close_notify in one segment: asyncio's TLS delivers all three
    # before the gate's handshake coroutine resumes, and shuts the connection down on close_notify. The gate then
    # handed aiohttp an already closed transport: its request handler failed on it ("Task exception was never
    # retrieved", an AttributeError, logged by asyncio for each such connection, and a warning that returning
    # true from eof_received has no effect). Such a connection is not admitted now; nothing is logged.
    port = int(small_cap.url.rsplit(":", 1)[1])
    capped = small_cap.http.listener
    assert capped is not None
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        for _ in range(3):
            await handshake_request_and_close(port, tls.client(),
                                              b"GET /healthz HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n")
        await eventually(lambda: _async(capped.open == 0 and capped.handshaking == 0), what="nothing open")
        gc.collect()  # a task that failed says so when it is collected
        assert errors == [] and [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
        async with small_cap.session.get(f"{small_cap.url}/healthz") as health:
            assert health.status == 200
    finally:
        loop.set_exception_handler(None)





async def test_extender_filters_and_ranks_by_cached_bytes(served: Served) -> None:
    args = json.loads((FIXTURES / "extender-args-nodes.json").read_text())
    metrics = Snapshot()
    status, result = await served.post("/filter", args)
    assert status == 200 and result["Error"] == ""
    # kube-scheduler with nodeCacheCapable: false reads the full node objects back from Nodes.
    assert [node["metadata"]["name"] for node in result["Nodes"]["items"]] == ["node-a", "node-b"]
    assert result["FailedNodes"] == {"node-c": "holds none of ml-team/imagenet"}
    status, ranked = await served.post("/prioritize", args)
    assert status == 200 and ranked == [{"Host": "node-a", "Score": 1}, {"Host": "node-b", "Score": 9},
                                        {"Host": "node-c", "Score": 0}]
    # The labels of the nodes kube-scheduler sent reach the scheduler (zone/region locality).
    assert served.stub.requests[-1].candidates[1].labels["topology.kubernetes.io/zone"] == "eu-1b"
    # nodeCacheCapable: true sends names only; a pod without datasets is steered away from cache nodes.
    by_name = {"Pod": {"metadata": {"namespace": "ml-team"}, "spec": {}}, "NodeNames": NODES}
    status, result = await served.post("/filter", by_name)
    assert status == 200 and result["NodeNames"] == NODES and "Nodes" not in result
    status, ranked = await served.post("/prioritize", by_name)
    assert {p["Host"]: p["Score"] for p in ranked} == {"node-a": 0, "node-b": 0, "node-c": 10}
    seconds = "shoal_scheduler_decision_duration_seconds_count"
    assert metrics.moved(seconds, way="filter") == metrics.moved(seconds, way="prioritize") == 2
    assert metrics.moved(seconds, way="webhook") == 0


async def test_extender_ranks_pods_with_only_ordinary_pvcs_as_pods_without_datasets(served: Served) -> None:
    """A PVC the scheduler does not know is dropped from the question, also when it is the pod's only one (a
    database's): the pod is then one without datasets, steered away from the cache nodes like any other. Its
    question errored and every node scored 0."""
    pvc: dict[str, Any] = {"Pod": {"metadata": {"namespace": "ml-team"}, "spec": {"volumes": [
        {"name": "db", "persistentVolumeClaim": {"claimName": "postgres-data"}},
        {"name": "logs", "persistentVolumeClaim": {"claimName": "logs"}}]}}, "NodeNames": NODES}
    for pod in (pvc, {**pvc, "Pod": {**pvc["Pod"], "spec": {"volumes": pvc["Pod"]["spec"]["volumes"][:1]}}}):
        status, ranked = await served.post("/prioritize", pod)
        assert status == 200 and {p["Host"]: p["Score"] for p in ranked} == {"node-a": 0, "node-b": 0, "node-c": 10}
    assert served.http.counts["prioritize.answered"] == 2 and "prioritize.unanswered" not in served.http.counts
    # Required, it is no mistake to drop: the pod is scored 0 everywhere, and the filter leaves every node out
    # saying why (an ``Error`` would let kube-scheduler, the extender being ignorable, start it anywhere).
    required = copy.deepcopy(pvc)
    required["Pod"]["metadata"]["labels"] = {"fluid.io/dataset.postgres-data.sched": "required"}
    status, ranked = await served.post("/prioritize", required)
    assert status == 200 and {p["Score"] for p in ranked} == {0}
    status, result = await served.post("/filter", required)
    assert status == 200 and result["Error"] == "" and result["NodeNames"] == []
    assert set(result["FailedAndUnresolvableNodes"].values()) == {
        "dataset ml-team/postgres-data does not exist (required)"}


async def test_extender_rejects_malformed_args_with_an_error(served: Served) -> None:
    for path in ("/filter", "/prioritize"):
        status, result = await served.post(path, {"Pod": {}, "NodeNames": "node-a"})
        assert status == 400 and "NodeNames must be a list of node names" in result["Error"]
    assert served.http.counts["filter.malformed"] == served.http.counts["prioritize.malformed"] == 1


async def test_the_webhook_speaks_tls_only_with_its_certificate(served: Served) -> None:
    async with aiohttp.ClientSession() as untrusting:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await untrusting.get(f"{served.url}/healthz")
    async with served.session.get(f"{served.url}/healthz") as health:
        assert health.status == 200 and await health.text() == "ok\n"


async def test_answer_runs_on_the_loops_thread_by_default(served: Served) -> None:
    """The scheduler's fold is a consistent snapshot only on the event loop's thread (it is read without copies)."""
    threads: list[int] = []

    def recording(request: ScoreRequest) -> ScoreReply:
        threads.append(threading.get_ident())
        served.stub.override = None
        return served.stub(request)

    served.stub.override = recording
    status, _ = await served.post("/mutate", recorded_review())
    assert status == 200 and threads == [threading.get_ident()]


async def test_the_service_loop_serves_until_stopped(tls: Tls) -> None:
    loop = http_loop(StubScheduler(), host="127.0.0.1", port=0, timeout=2.0, tls_cert=str(tls.cert),
                     tls_key=str(tls.key))
    task = asyncio.create_task(loop.run())
    try:
        port = await eventually(lambda: _bound(loop.http), what="the scheduler http port")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client())) as session, \
                session.get(f"https://127.0.0.1:{port}/healthz") as health:
            assert health.status == 200
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
    assert loop.http.port == port
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"https://127.0.0.1:{port}/healthz")


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # cert-manager renews the Secret (a new self-signed certificate, its CA injected into the webhook configuration
    # at once): a scheduler that kept serving the old one was no longer trusted, and every pod went unplaced.
    for folder in ("old", "new", "served"):
        (tmp_path / folder).mkdir()
    old, new = self_signed(tmp_path / "old"), self_signed(tmp_path / "new")
    served = Tls(tmp_path / "served" / "tls.crt", tmp_path / "served" / "tls.key")  # the mounted Secret
    served.cert.write_bytes(old.cert.read_bytes())
    served.key.write_bytes(old.key.read_bytes())
    loop = http_loop(StubScheduler(), host="127.0.0.1", port=0, timeout=2.0, tls_cert=str(served.cert),
                     tls_key=str(served.key), tls_reload_seconds=0.1)
    task = asyncio.create_task(loop.run())

    async def health(trusting: Tls) -> bool:
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting.client())) as session, \
                    session.get(f"https://127.0.0.1:{port}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    async def refused(logs: Any) -> bool:
        return any(line["event"].startswith("renewed TLS certificate not loaded")
                   for line in json_lines(logs.getvalue()))

    try:
        port = await eventually(lambda: _bound(loop.http), what="the scheduler http port")
        assert await health(old)
        with json_logs(monkeypatch) as logs:
            served.cert.write_text("not a certificate")  # a renewal half written: the old pair stays
            await eventually(lambda: refused(logs), what="the half-written renewal read and refused")
        assert await health(old)
        served.key.write_bytes(new.key.read_bytes())
        served.cert.write_bytes(new.cert.read_bytes())
        await eventually(lambda: health(new), timeout=10, what="the renewed certificate served")
        assert not await health(old)
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)


async def _bound(http: SchedulerHttp) -> int:
    return http.port
