"""The seed bench's own pieces: its settings, the store link's request counting and byte counts (through a real
loopback server), and the generated docs section."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.bench.report import write_docs_section
from tests.bench.seed import (
    DOCS_BEGIN,
    DOCS_END,
    GiB,
    MiB,
    PeerRead,
    SeedBench,
    SeedConfig,
    SeedRow,
    parse_rate,
    target_lines,
)
from tests.bench.throttle import RequestCounter, ThrottledProxy


def test_rates_parse_in_bytes_a_second() -> None:
    assert parse_rate("50MB/s") == 50e6
    assert parse_rate("400Mbit/s") == 50e6
    assert parse_rate("20MiB/s") == 20 * 2**20
    assert parse_rate("1000") == 1000
    for bad in ("fast", "0MB/s", "-5MB/s", "5 parsecs"):
        with pytest.raises(ValueError, match="not a rate"):
            parse_rate(bad)


def test_settings_from_the_environment() -> None:
    config = SeedConfig.from_env({"SHOAL_BENCH_SEED_SIZE": "128Mi", "SHOAL_BENCH_SEED_RATE": "20MB/s",
                                  "SHOAL_BENCH_SEED_CONSUMERS": "4, 1,2", "SHOAL_BENCH_SEED_DOCS": "0"})
    assert config.model_bytes == 128 * 2**20
    assert config.rate == 20e6
    assert config.consumers == (1, 2, 4)
    assert config.docs is False
    assert SeedConfig.from_env({}).docs is True  # 1 GiB by default: the docs are rewritten
    assert SeedConfig.from_env({"SHOAL_BENCH_SEED_SIZE": "512Mi"}).docs is False
    assert SeedConfig().model_bytes == GiB
    quick = SeedConfig.from_env({"SHOAL_BENCH_SEED_RATE": "10MB/s"}, quick=True)
    assert (quick.model_bytes, quick.rate, quick.consumers) == (128 * 2**20, 10e6, (1, 2, 4))  # the variable wins


def test_bad_settings_name_the_variable() -> None:
    with pytest.raises(SystemExit, match="SHOAL_BENCH_SEED_RATE='quick'"):
        SeedConfig.from_env({"SHOAL_BENCH_SEED_RATE": "quick"})
    with pytest.raises(SystemExit, match="SHOAL_BENCH_SEED_CONSUMERS"):
        SeedConfig.from_env({"SHOAL_BENCH_SEED_CONSUMERS": "0,2"})


def test_requests_are_counted_across_reads_and_bodies_skipped() -> None:
    seen: list[str] = []
    counter = RequestCounter(seen.append)
    stream = (b"GET /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
              b"PUT /b/k HTTP/1.1\r\nContent-Length: 20\r\n\r\nGET / HTTP/1.1\r\n\r\nxx"  # a 20-byte body
              b"HEAD /b/k HTTP/1.1\r\n\r\n")
    for cut in range(0, len(stream), 7):  # arbitrary TCP segment boundaries
        counter.feed(stream[cut:cut + 7])
    assert seen == ["GET", "PUT", "HEAD"]  # the PUT's body looks like a request and is not one


async def test_the_link_counts_what_the_store_sent() -> None:
    body = b"m" * 300_000
    app = web.Application()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body)

    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    link = ThrottledProxy(port, rate=1e9)
    link.start()
    try:
        from aiohttp import ClientSession

        async with ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{link.endpoint}/bucket/key") as response:
                    assert await response.read() == body
        stats = link.reset()
        assert stats.gets == 3
        assert 3 * len(body) < stats.store_bytes < 3 * len(body) + 3 * 1024  # bodies and their headers
        assert link.stats().store_bytes == 0  # reset zeroed it
    finally:
        link.stop()
        await runner.cleanup()


def test_docs_section_is_replaced_in_place(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written\n\n<!-- seed-bench:begin (old) -->\nold numbers\n"
                    f"{DOCS_END}\n\n## After\n")
    write_docs_section(docs, f"<!-- seed-bench:begin (new) -->\nnew numbers\n{DOCS_END}", DOCS_BEGIN, DOCS_END)
    text = docs.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.startswith("# Benchmarks\n\nhand-written\n") and text.endswith("\n\n## After\n")
    fresh = tmp_path / "other.md"
    fresh.write_text("# Benchmarks\n")
    write_docs_section(fresh, f"<!-- seed-bench:begin -->\nfirst\n{DOCS_END}", DOCS_BEGIN, DOCS_END)
    assert fresh.read_text() == f"# Benchmarks\n\n<!-- seed-bench:begin -->\nfirst\n{DOCS_END}\n"


def _bench(rows: list[SeedRow], peer: list[PeerRead]) -> SeedBench:
    bench = SeedBench(SeedConfig(model_bytes=64 * MiB, consumers=(1, 8)), Path("/nonexistent"))
    bench.rows, bench.peer = rows, peer
    return bench


def test_targets_pass_miss_and_refuse_what_does_not_measure_them() -> None:
    model = 64 * MiB
    good = _bench([SeedRow("Shoal", 1, 10.0, model, 16), SeedRow("Shoal", 8, 12.0, model + 4096, 16)],
                  [PeerRead("owner disk", "a", 1.0, model, 0, {"hitBytes": model}),
                   PeerRead("peer", "b", 1.2, model, 0, {"remoteBytes": model})])
    assert [verdict for verdict, _, _ in target_lines(good)] == ["PASS", "PASS", "PASS"]
    slow = _bench([SeedRow("Shoal", 1, 10.0, model, 16), SeedRow("Shoal", 8, 14.0, 8 * model, 128)],
                  [PeerRead("owner disk", "a", 1.0, model, 0, {"hitBytes": model}),
                   PeerRead("peer", "b", 2.0, model, 0, {"remoteBytes": model})])
    assert [verdict for verdict, _, _ in target_lines(slow)] == ["MISS", "MISS", "MISS"]
    # Agents sharing a cache folder, and a "peer" read that came from the reader's own cache: never counted.
    invalid = _bench([SeedRow("Shoal", 1, 10.0, model, 16), SeedRow("Shoal", 8, 10.0, model, 16, valid=False)],
                     [PeerRead("owner disk", "a", 1.0, model, 0, {"hitBytes": model}),
                      PeerRead("peer", "b", 1.0, model, 0, {"hitBytes": model})])
    verdicts = target_lines(invalid)
    assert [verdict for verdict, _, _ in verdicts] == ["n/a", "n/a"]
    assert "not a peer-read measurement" in verdicts[1][2]
