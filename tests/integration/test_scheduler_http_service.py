"""The webhook and the extender answered by the real scheduler service (its fold fed by agents' inventory over a
real nats-server), over HTTPS, through ``http_loop`` as the service builds it (here handed in with
``app.run(extra_loops=[...])`` to learn the bound port; ``test_scheduler_api`` shows the settings wiring).

Shown: after node-a caches 80 % of ml/imagenet and node-c 20 % (node-b shares node-a's zone), the recorded
AdmissionReview's patch, applied with ``jsonpatch``, prefers node-a most, then node-b, then node-c; in required mode
it requires the nodes that hold the cache (node-a, node-c); the extender ranks node-a first and, in required mode,
filters node-b out; and the answers follow the cache when node-c takes the lead.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import msgspec
import pytest

from libs import subjects
from libs.bus import Bus, kv_load
from libs.config import SchedulerSettings, Settings
from libs.events.agent import AgentHeartbeat, AgentRecord, InventoryRequest, MountGroup
from libs.events.common import ObjectMeta
from libs.events.dataset import Dataset, DatasetRecord, DatasetSpec, DatasetStatus, Mount
from libs.events.schedule import DatasetUse, ScoreRequest
from services.scheduler import app as scheduler_app
from services.scheduler.http import HttpLoop, http_loop
from tests.conftest import NatsServer
from tests.helpers import eventually, make_settings
from tests.integration import agent_stack as stack
from tests.integration import test_scheduler_agents as agents
from tests.integration import test_scheduler_api as api
from tests.metric_values import Snapshot

pytestmark = pytest.mark.needs("openssl")

FIXTURES = Path(__file__).parent.parent / "fixtures" / "scheduler"
HOST = "kubernetes.io/hostname"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
ZONE = "topology.kubernetes.io/zone"
NODES = {"node-a": {ZONE: "z1"}, "node-b": {ZONE: "z1"}, "node-c": {ZONE: "z2"}}


@pytest.fixture
def scheduler_settings(nats_server: NatsServer) -> Settings:
    return make_settings(nats_server.url)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=shoal-scheduler.shoal-system.svc",
         "-addext", "subjectAltName=DNS:shoal-scheduler.shoal-system.svc,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return cert, key


@asynccontextmanager
async def scheduler_with_http(settings: Settings, cert: Path, key: Path) -> AsyncIterator[str]:
    """The scheduler service in-process with its HTTP front; yields the front's base URL once it serves."""
    loops: list[HttpLoop] = []

    def front(handlers: Any, _settings: Settings) -> HttpLoop:
        loops.append(http_loop(handlers.answer, host="127.0.0.1", port=0, timeout=2.0, tls_cert=str(cert),
                               tls_key=str(key)))
        return loops[0]

    stop = asyncio.Event()
    task = asyncio.create_task(scheduler_app.run(settings, stop, extra_loops=[front]))
    try:
        port = await eventually(lambda: _port(loops), what="the scheduler's HTTPS port")
        yield f"https://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


Post = Callable[[str, Any], Awaitable[Any]]


@asynccontextmanager
async def scheduler_posts(settings: Settings, cert: Path, key: Path) -> AsyncIterator[Post]:
    """``scheduler_with_http``, and a ``post(path, body)`` to its front over TLS that wants a 200 and returns the
    JSON answer."""
    async with scheduler_with_http(settings, cert, key) as url, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(cert))),
            timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def post(path: str, body: Any) -> Any:
            async with session.post(f"{url}{path}", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        yield post


async def _port(loops: list[HttpLoop]) -> int:
    return loops[0].http.port if loops else 0


def review(required: bool = False) -> dict[str, Any]:
    body = json.loads((FIXTURES / "admission-review-pod-with-dataset.json").read_text())
    body["request"]["namespace"] = "ml"
    if required:
        body["request"]["object"]["metadata"]["labels"]["fluid.io/dataset.imagenet.sched"] = "required"
    return body


def extender_args(required: bool = False, dataset: str = "imagenet") -> dict[str, Any]:
    labels = {f"fluid.io/dataset.{dataset}.sched": "required"} if required else {}
    return {"Pod": {"metadata": {"name": "train-0", "namespace": "ml", "labels": labels},
                    "spec": {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": dataset}}]}},
            "Nodes": {"items": [{"metadata": {"name": node, "labels": {HOST: node, **node_labels}}}
                                for node, node_labels in NODES.items()]}}


def patched(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["response"]["uid"] == body["request"]["uid"] and answer["response"]["allowed"] is True
    ops = json.loads(base64.b64decode(answer["response"]["patch"]))
    return jsonpatch.apply_patch(body["request"]["object"], ops)


def preferred(pod: dict[str, Any]) -> list[tuple[int, list[str]]]:
    terms = pod["spec"]["affinity"]["nodeAffinity"][PREFERRED]
    return [(t["weight"], t["preference"]["matchExpressions"][0]["values"]) for t in terms]


async def test_webhook_and_extender_answer_from_the_scheduler_service(bus: Bus, scheduler_settings: Settings,
                                                                     certificate: tuple[Path, Path]) -> None:
    await api.seed(bus, NODES)
    agent_a, agent_c = api.FakeAgent(bus, "node-a"), api.FakeAgent(bus, "node-c")

    async def on_request(request: InventoryRequest) -> None:
        await agent_a.on_request(request)
        await agent_c.on_request(request)

    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest), on_request)
    cert, key = certificate
    try:
        async with scheduler_posts(scheduler_settings, cert, key) as post:
            await agent_a.cache("/train/a.bin")
            await agent_a.cache("/train/b.bin")
            await agent_c.cache("/val/c.bin")

            async def settled(expected: list[tuple[str, int]]) -> bool:
                return api.ranking(await api.ask(bus, api.WHOLE)) == expected

            await eventually(lambda: settled([("node-a", 80), ("node-b", 40), ("node-c", 20)]),
                             what="node-a (80 %) first, node-b in its zone next")

            pod = patched(review(), await post("/mutate", review()))
            assert preferred(pod) == [(80, ["node-a"]), (40, ["node-b"]), (20, ["node-c"])]
            assert REQUIRED not in pod["spec"]["affinity"]["nodeAffinity"]

            pod = patched(review(required=True), await post("/mutate", review(required=True)))
            (term,) = pod["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
            assert term["matchExpressions"] == [{"key": HOST, "operator": "In", "values": ["node-a", "node-c"]}]

            ranked = await post("/prioritize", extender_args())
            assert ranked == [{"Host": "node-a", "Score": 8}, {"Host": "node-b", "Score": 4},
                              {"Host": "node-c", "Score": 2}]
            kept = await post("/filter", extender_args(required=True))
            assert [n["metadata"]["name"] for n in kept["Nodes"]["items"]] == ["node-a", "node-c"]
            assert set(kept["FailedNodes"]) == {"node-b"} and kept["Error"] == ""

            # The cache moves: node-c now holds everything; the next pod and the extender follow it.
            await agent_c.cache("/train/a.bin")
            await agent_c.cache("/train/b.bin")
            await eventually(lambda: settled([("node-c", 100), ("node-a", 80), ("node-b", 40)]),
                             what="node-c first once it holds every file")
            pod = patched(review(), await post("/mutate", review()))
            assert preferred(pod)[0] == (100, ["node-c"])
            ranked = await post("/prioritize", extender_args())
            assert max(ranked, key=lambda p: p["Score"]) == {"Host": "node-c", "Score": 10}
    finally:
        await listener.unsubscribe()


async def test_the_extenders_filter_says_why_each_node_is_left_out(bus: Bus, scheduler_settings: Settings,
                                                                    certificate: tuple[Path, Path]) -> None:
    """A pod requiring ml/imagenet, whose Dataset allows only ``disk: ssd`` nodes and only node-a holds: every other
    node is left out (unresolvable: preemption brings no cache) with why, as the real scheduler service knows it
    from the agents' heartbeats, the Dataset's record and the Node objects: not a cache worker, a mount still
    starting, an agent that missed its heartbeats, no agent, outside the nodeAffinity. Reasons do not name the node
    (kube-scheduler adds equal ones up in the pod's event) and never carry a mount's message."""
    await api.seed(bus, {})
    datasets = await bus.kv(subjects.KV_DATASETS)
    record, _ = await kv_load(datasets, "ml.imagenet", DatasetRecord)
    assert record is not None
    ssd_only = {"required": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}
    spec = msgspec.structs.replace(record.dataset.spec, node_affinity=ssd_only)
    await datasets.put("ml.imagenet", msgspec.json.encode(msgspec.structs.replace(
        record, dataset=msgspec.structs.replace(record.dataset, spec=spec))))
    agents, now = await bus.kv(subjects.KV_AGENTS), time.time()
    starting = MountGroup(namespace="ml", state="Starting", message="mount s3://key:hunter2@bucket failed",
                          datasets={"imagenet": 0})
    beats = {"node-a": (AgentHeartbeat(node="node-a"), now), "node-b": (AgentHeartbeat(node="node-b"), now),
             "node-c": (AgentHeartbeat(node="node-c", mount_groups=[starting]), now),
             "node-d": (AgentHeartbeat(node="node-d"), now - 30),  # past the node timeout (5 s), still on record
             "node-f": (AgentHeartbeat(node="node-f"), now)}  # node-e has no agent
    for node, (beat, received) in beats.items():
        await agents.put(node, msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=received)))
    agent_a = api.FakeAgent(bus, "node-a")
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent_a.on_request)
    nodes = {name: {"disk": "hdd" if name == "node-f" else "ssd"} for name in
             ("node-a", "node-b", "node-c", "node-d", "node-e", "node-f")}
    args = {**extender_args(required=True),
            "Nodes": {"items": [{"metadata": {"name": name, "labels": labels}} for name, labels in nodes.items()]}}
    settings = dataclasses.replace(scheduler_settings, scheduler=SchedulerSettings(node_timeout=5.0))
    cert, key = certificate
    try:
        async with scheduler_posts(settings, cert, key) as post:
            await agent_a.cache("/train/a.bin")

            async def answered() -> Any:
                result = await post("/filter", args)
                return result if not result["Error"] and result["NodeNames"] == ["node-a"] else None

            result = await eventually(answered, what="node-a alone kept")
            # A kept decision is not kept past a mount changing state: the reason follows the heartbeat.
            failing = AgentHeartbeat(node="node-c", mount_groups=[msgspec.structs.replace(starting, state="Failing")])
            await agents.put("node-c", msgspec.json.encode(AgentRecord(heartbeat=failing, received_at=time.time())))

            async def followed() -> bool:
                reason = (await post("/filter", args))["FailedNodes"].get("node-c", "")
                return "is Failing" in reason

            await eventually(followed, what="node-c's reason: its mount Failing")
    finally:
        await listener.unsubscribe()
    assert result["FailedNodes"] == {
        "node-b": "not a cache worker of dataset ml/imagenet: the node has no mount of it (required)",
        "node-c": "the node's mount of dataset ml/imagenet is Starting, not serving yet (required)",
        "node-d": "the node's Shoal agent missed its heartbeats: its cache of dataset ml/imagenet is not counted "
                  "(required)",
        "node-e": "no Shoal agent on the node to cache dataset ml/imagenet (required)",
        "node-f": "outside the nodeAffinity of dataset ml/imagenet (required)",
    }
    assert result["FailedAndUnresolvableNodes"] == result["FailedNodes"]
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["node-a"]
    assert "hunter2" not in json.dumps(result)


async def test_a_pod_requiring_a_dataset_that_does_not_exist_stays_pending_saying_why(
        bus: Bus, scheduler_settings: Settings, certificate: tuple[Path, Path]) -> None:
    """ml/imagenet is not applied yet (a typo, or deleted, reads the same), and the reference ml/ref shows it: a pod
    requiring either gets every node left out by the extender's filter, unresolvable, with a reason naming the
    dataset, and no ``Error`` (the extender is ``ignorable``: kube-scheduler dropped the error and started the pod
    on any node, with no event saying why). Nothing else changes: the webhook writes nothing and warns, the
    prioritize verb ranks the pod as one without datasets, and the NATS API answers an error, also for a dataset
    only preferred. Once the dataset is applied and node-a caches some of it, both pods are filtered as usual."""
    agents, now = await bus.kv(subjects.KV_AGENTS), time.time()
    for node, labels in NODES.items():
        beat = AgentHeartbeat(node=node, labels=labels, sent_at=now)
        await agents.put(node, msgspec.json.encode(AgentRecord(heartbeat=beat, received_at=now)))
    reference = DatasetRecord(
        dataset=Dataset(metadata=ObjectMeta(name="ref", namespace="ml"),
                        spec=DatasetSpec(mounts=[Mount(mount_point="dataset://ml/imagenet")])),
        generation=1, status=DatasetStatus(phase="Failed", message="source dataset ml/imagenet does not exist"))
    await (await bus.kv(subjects.KV_DATASETS)).put("ml.ref", msgspec.json.encode(reference))
    agent_a = api.FakeAgent(bus, "node-a")
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent_a.on_request)
    cert, key = certificate
    missing = "dataset ml/imagenet does not exist (required)"
    through = "dataset ml/imagenet, the source of a dataset:// reference the pod requires, does not exist (required)"
    try:
        async with scheduler_posts(scheduler_settings, cert, key) as post:

            async def filtered(args: dict[str, Any]) -> Any:
                result = await post("/filter", args)
                return result if not result["Error"] else None  # until the scheduler has read the records

            for args, reason in ((extender_args(required=True), missing),
                                 (extender_args(required=True, dataset="ref"), through)):
                result = await eventually(functools.partial(filtered, args), what="a filter answer without an error")
                assert result["NodeNames"] == [] and result["Nodes"]["items"] == []
                assert result["FailedNodes"] == result["FailedAndUnresolvableNodes"] == dict.fromkeys(NODES, reason)

            # The webhook writes nothing and says why; prioritize and the NATS API answer as before.
            answer = await post("/mutate", review(required=True))
            assert "patch" not in answer["response"]
            assert answer["response"]["warnings"] == ["shoal: the pod is not placed near its data: unknown dataset "
                                                      "ml/imagenet; with the extender it stays Pending until the "
                                                      "dataset exists"]
            assert await post("/prioritize", extender_args()) == [{"Host": node, "Score": 10} for node in NODES]
            for required in (True, False):
                reply = await api.ask(bus, ScoreRequest(datasets=[DatasetUse(name="imagenet", namespace="ml",
                                                                             required=required)]))
                assert reply.error == "unknown dataset ml/imagenet" and reply.scores == [] and reply.filtered == {}

            # Applied, and node-a caches a file: the same pods are kept to node-a.
            await api.seed(bus, NODES)
            await eventually(lambda: _dataset_known(bus), what="ml/imagenet known to the scheduler")
            await agent_a.cache("/train/a.bin")

            async def kept(args: dict[str, Any]) -> Any:
                result = await post("/filter", args)
                return result if result["NodeNames"] == ["node-a"] else None

            for args in (extender_args(required=True), extender_args(required=True, dataset="ref")):
                result = await eventually(functools.partial(kept, args), what="node-a kept once it caches the dataset")
                assert result["Error"] == "" and set(result["FailedNodes"]) == {"node-b", "node-c"}
                assert missing not in result["FailedNodes"].values()
    finally:
        await listener.unsubscribe()


async def _dataset_known(bus: Bus) -> bool:
    return not (await api.ask(bus, api.WHOLE)).error


async def test_each_http_request_counts_once_under_its_own_way(bus: Bus, scheduler_settings: Settings,
                                                            certificate: tuple[Path, Path]) -> None:
    """``shoal_scheduler_decisions_total``: a webhook or extender request is one decision of its own way, none of
    NATS's, also when the front asks the scheduler several questions for it (a pod with an ordinary PVC next to its
    dataset's: the question with both, then each alone, then the dataset alone: four answers, one decision)."""
    await api.seed(bus, NODES)
    agent_a = api.FakeAgent(bus, "node-a")
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent_a.on_request)
    cert, key = certificate
    decisions = "shoal_scheduler_decisions_total"
    try:
        async with scheduler_posts(scheduler_settings, cert, key) as post:
            await agent_a.cache("/train/a.bin")

            async def settled() -> bool:
                return api.ranking(await api.ask(bus, api.WHOLE))[:1] == [("node-a", 40)]

            await eventually(settled, what="node-a holding 40 % of ml/imagenet")
            with_scratch = review()
            with_scratch["request"]["object"]["spec"]["volumes"].append(
                {"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}})
            metrics = Snapshot()
            assert preferred(patched(with_scratch, await post("/mutate", with_scratch)))[0] == (40, ["node-a"])
            assert (await post("/prioritize", extender_args()))[0] == {"Host": "node-a", "Score": 4}
            assert [n["metadata"]["name"] for n in (await post("/filter", extender_args(required=True)))["Nodes"][
                "items"]] == ["node-a"]
            moved = {(way, outcome): metrics.moved(decisions, way=way, outcome=outcome)
                     for way in ("nats", "webhook", "filter", "prioritize")
                     for outcome in ("answered", "error", "patched", "unanswered")}
            assert {k: v for k, v in moved.items() if v} == {("webhook", "patched"): 1, ("prioritize", "answered"): 1,
                                                          ("filter", "answered"): 1}
            # A question over NATS is still one NATS decision.
            assert await settled()
            assert metrics.moved(decisions, way="nats", outcome="answered") == 1
    finally:
        await listener.unsubscribe()


async def test_the_extender_reads_zones_from_the_node_objects_when_agents_report_none(
        bus: Bus, scheduler_settings: Settings, certificate: tuple[Path, Path]) -> None:
    """As deployed: the agents have no ``SHOAL_NODE_LABELS`` (the downward API gives no Node labels), and
    kube-scheduler sends the extender full Node objects (``nodeCacheCapable: false``) with their zone labels. node-b,
    in node-a's zone, ranks next to it; it scored like a node in no zone, since node-a's own zone was looked up in
    its agent's labels only."""
    await api.seed(bus, {node: {} for node in NODES})
    agent_a = api.FakeAgent(bus, "node-a")
    listener = await bus.subscribe(subjects.INVENTORY_REQUEST, msgspec.json.Decoder(InventoryRequest),
                                   agent_a.on_request)
    cert, key = certificate
    try:
        async with scheduler_posts(scheduler_settings, cert, key) as post:
            await agent_a.cache("/train/a.bin")
            await agent_a.cache("/train/b.bin")

            async def settled() -> bool:
                return api.ranking(await api.ask(bus, api.WHOLE))[:1] == [("node-a", 80)]

            await eventually(settled, what="node-a holding 80 % of ml/imagenet")
            assert await post("/prioritize", extender_args()) == [
                {"Host": "node-a", "Score": 8}, {"Host": "node-b", "Score": 4}, {"Host": "node-c", "Score": 0}]
    finally:
        await listener.unsubscribe()


@pytest.mark.needs("fuse")
async def test_webhook_and_extender_follow_the_bytes_read_through_real_agents(
        bus: Bus, settings: Settings, seaweedfs: Any, bucket: str, tmp_path: Path,
        certificate: tuple[Path, Path]) -> None:
    """Three real agents (real FUSE mounts, every node caching what it reads): reading through node-c makes the
    webhook prefer node-c and, in required mode, require it alone; the extender ranks it first and filters the
    others; reading through node-a too adds node-a to the nodes a required pod may use."""
    from tests.conftest import put_objects

    await put_objects(seaweedfs, bucket, agents.OBJECTS)
    cert, key = certificate
    name = agents.NAME

    def pod_review(required: bool = False) -> dict[str, Any]:
        body = review(required=False)
        body["request"]["namespace"] = "default"
        body["request"]["object"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = name
        if required:
            body["request"]["object"]["metadata"]["labels"][f"fluid.io/dataset.{name}.sched"] = "required"
        return body

    def names_args(required: bool = False) -> dict[str, Any]:
        labels = {f"fluid.io/dataset.{name}.sched": "required"} if required else {}
        return {"Pod": {"metadata": {"name": "p", "namespace": "default", "labels": labels},
                        "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": name}}]}},
                "NodeNames": sorted(agents.NODES)}

    async with stack.cluster_stack(bus, settings, seaweedfs, tmp_path, agents.NODES) as cluster:
        await agents.apply(bus, cluster, bucket, seaweedfs.endpoint)
        await cluster.wait_mounted(name, expect="f2.bin")
        async with scheduler_posts(settings, cert, key) as post:
            await agents.read_through(cluster, "node-c", "f0.bin", "f1.bin")

            async def required_hosts(expected: list[str], first: str | None = None) -> dict[str, Any] | None:
                body = pod_review(required=True)
                answer = await post("/mutate", body)
                if "patch" not in answer["response"]:
                    return None
                pod = patched(body, answer)
                (term,) = pod["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
                if term["matchExpressions"][0]["values"] != expected:
                    return None
                # A node whose inventory holds only the first bytes read may still score 0 (allowed, not yet
                # preferred): wait for ``first`` to be the preferred one too.
                if first is not None and not (PREFERRED in pod["spec"]["affinity"]["nodeAffinity"]
                                              and preferred(pod)[0][1] == [first]):
                    return None
                return pod

            pod = await eventually(lambda: required_hosts(["node-c"], first="node-c"),
                                   what="a required pod sent to node-c only, and preferring it")
            assert preferred(pod)[0][1] == ["node-c"]
            pod = patched(pod_review(), await post("/mutate", pod_review()))
            assert [nodes for _, nodes in preferred(pod)] == [["node-c"], ["node-b"], ["node-a"]]  # host, zone, region

            ranked = {p["Host"]: p["Score"] for p in await post("/prioritize", names_args())}
            assert ranked["node-c"] > ranked["node-b"] > ranked["node-a"] > 0
            kept = await post("/filter", names_args(required=True))
            assert kept["NodeNames"] == ["node-c"] and set(kept["FailedNodes"]) == {"node-a", "node-b"}

            await agents.read_through(cluster, "node-a", "f2.bin")
            await eventually(lambda: required_hosts(["node-a", "node-c"]), timeout=20,
                             what="node-a allowed once it holds a file too")
            kept = await post("/filter", names_args(required=True))
            assert kept["NodeNames"] == ["node-a", "node-c"]
