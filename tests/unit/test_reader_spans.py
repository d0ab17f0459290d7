"""The read path's spans (``services.agent.reader``): a miss is a ``read miss`` span whose children are the peer
requests (``peer GET``, an error when the peer fails) and the store GET it took; a cache hit makes no span; the
owner answering a peer request continues the asking node's trace (``serve block``). Real local store and disk
tier, a scripted peer client or a real peer server and client on loopback, an in-memory exporter."""

from __future__ import annotations

import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from libs.blocks import BlockId
from libs.embedded import LOOPBACK
from libs.events.dataset import ManifestEntry
from libs.events.runtime import CacheWorker
from libs.ufs import LocalLocation, LocalObjectStore
from services.agent.cache import BlockCache, DiskTier
from services.agent.peer import PeerClient, PeerError, PeerServer
from services.agent.readahead import MemoryBudget
from services.agent.reader import BlockReader, BlockRouter, StoreGate
from tests.helpers import spans_in_memory

BLOCK = 64 * 1024


class FailingPeers:
    """Every peer is asked, and every one fails: the read goes on to the store."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get_block(self, url: str, block: BlockId, length: int, block_size: int) -> bytes:
        self.asked.append(url)
        raise PeerError(f"{url} is down")


async def reader_for(tmp_path: Path, peers: FailingPeers | None) -> tuple[BlockReader, ManifestEntry]:
    source = tmp_path / "source"
    source.mkdir(parents=True)
    (source / "data.bin").write_bytes(os.urandom(4 * BLOCK))
    store = LocalObjectStore(LocalLocation(root=source))
    info = await store.head("data.bin")
    cache = BlockCache([DiskTier(tmp_path / "cache", 64 * BLOCK)])
    cache.load()
    router = None
    if peers is not None:
        router = BlockRouter("node-a", peers)
        router.update([CacheWorker(node=n, ready=True, peer_url=f"http://{n}:1") for n in ("node-b", "node-c")])
    reader = BlockReader(cache, [StoreGate(store)], BLOCK, MemoryBudget(16 * BLOCK), write_block=cache.put_async,
                         router=router)
    entry = ManifestEntry(path="/data.bin", mount=0, key="data.bin", size=info.size, etag=info.etag,
                          mtime=info.mtime)
    return reader, entry


def children(span: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id]


async def test_a_miss_spans_its_peer_requests_and_store_get_and_a_hit_spans_nothing(tmp_path: Path) -> None:
    peers = FailingPeers()
    with spans_in_memory() as exporter:
        reader, entry = await reader_for(tmp_path, peers)
        await reader.fetch(entry, 0)
        await reader.drain()
        spans = exporter.get_finished_spans()
        [miss] = [span for span in spans if span.name == "read miss"]
        assert miss.parent is None and miss.attributes is not None
        assert miss.attributes["shoal.block.index"] == 0
        below = children(miss, spans)
        assert [span.name for span in below] == ["peer GET", "peer GET", "store GET"]
        # OpenTelemetry's conventions: the host in server.address, the port apart, never the URL.
        assert sorted(peers.asked) == ["http://node-b:1", "http://node-c:1"]
        assert [dict(span.attributes or {}) for span in below[:2]] == [
            {"server.address": url.removeprefix("http://").removesuffix(":1"), "server.port": 1}
            for url in peers.asked]
        assert all(span.status.status_code == StatusCode.ERROR for span in below[:2])  # the failed peers
        assert below[2].kind == trace.SpanKind.CLIENT and below[2].status.status_code != StatusCode.ERROR

        # The block is not cached on this node (its owners are others): a second read is a miss again. A block
        # this node caches (a route of its own) is a hit the next time, and makes no span.
        local, local_entry = await reader_for(tmp_path / "local", None)
        await local.fetch(local_entry, 1)
        await local.drain()
        before = len(exporter.get_finished_spans())
        await local.fetch(local_entry, 1)
        assert len(exporter.get_finished_spans()) == before


async def test_a_small_random_read_is_a_miss_with_its_ranged_get(tmp_path: Path) -> None:
    with spans_in_memory() as exporter:
        reader, entry = await reader_for(tmp_path, None)
        handle = reader.open(entry)
        await reader.read(handle, 2 * BLOCK + 100, 100)
        await reader.drain()
        spans = exporter.get_finished_spans()
    ranged = [span for span in spans if span.name == "store GET" and span.attributes
              and span.attributes["shoal.range.length"] == 100]
    assert len(ranged) == 1
    parent = next(s for s in spans if ranged[0].parent and s.context.span_id == ranged[0].parent.span_id)
    assert parent.name == "read miss"


async def test_store_gets_outside_a_trace_make_no_span(tmp_path: Path) -> None:
    with spans_in_memory() as exporter:
        reader, entry = await reader_for(tmp_path, None)
        await reader.gates[0].get_range(entry.key, 0, 10, entry.etag)
    assert exporter.get_finished_spans() == ()


async def test_the_owner_serves_a_block_in_the_asking_node_trace(tmp_path: Path) -> None:
    body = os.urandom(BLOCK)
    entry = ManifestEntry(path="/b.bin", mount=0, key="b.bin", size=BLOCK, etag="e1", mtime=0.0)
    fetched_in: list[trace.SpanContext] = []

    async def source(entry: ManifestEntry, index: int) -> bytes:
        fetched_in.append(trace.get_current_span().get_span_context())
        return body

    key = b"k" * 32
    with spans_in_memory() as exporter:
        server = PeerServer(key, "default", "demo", BLOCK, lambda mount, k: entry if k == entry.key else None,
                            source)
        await server.start(LOOPBACK, 0)
        client = PeerClient(key, "default", "demo")
        try:
            with trace.get_tracer("test").start_as_current_span("peer GET") as asking:
                data = await client.get_block(f"http://{LOOPBACK}:{server.port}", BlockId(0, "b.bin", "e1", 0),
                                              BLOCK, BLOCK)
        finally:
            await client.close()
            await server.stop()
        spans = exporter.get_finished_spans()
    assert data == body
    [served] = [span for span in spans if span.name == "serve block"]
    assert served.kind == trace.SpanKind.SERVER
    assert served.parent is not None and served.parent.span_id == asking.get_span_context().span_id
    assert served.context.trace_id == asking.get_span_context().trace_id
    assert [context.span_id for context in fetched_in] == [served.context.span_id]  # the store fetch inside it
