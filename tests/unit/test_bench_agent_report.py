"""The agent bench's report: issue 14's targets read off the right rows (the passthrough, the 2-reader small files,
s3fs cold fio), CPU per GiB and per file, and the generated docs section."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.bench.report import DOCS_BEGIN, DOCS_END, GiB, Row, cpu_per_unit, markdown, targets, write_docs_section
from tests.bench.workloads import QUICK, WORKLOADS


def row(workload: str, system: str, state: str, value: float, **detail: float) -> Row:
    return Row(WORKLOADS[workload].title, system, state, value, WORKLOADS[workload].unit,
               cpu={"daemon": 2.0, "store": 1.0, "reader": 0.5}, detail=dict(detail))


def verdicts(rows: list[Row]) -> dict[str, str]:
    return {target.text: target.verdict for target in targets(rows)}


def test_warm_large_reads_are_held_against_the_passthrough_in_the_same_run() -> None:
    found = verdicts([row("large1", "Shoal", "warm", 900.0), row("large1", "passthrough", "warm", 1000.0),
                      row("large8", "Shoal", "warm", 800.0), row("large8", "passthrough", "warm", 1000.0)])
    assert found["warm large reads ≥ 0.9x the pyfuse3 passthrough warm (1 reader)"] == "PASS"
    assert found["warm large reads ≥ 0.9x the pyfuse3 passthrough warm (8 readers)"] == "MISS"


def test_cold_small_files_are_held_against_direct_gets_at_the_same_concurrency() -> None:
    found = verdicts([row("small", "Shoal", "cold", 500.0), row("small", "direct GETs", "-", 450.0),
                      row("small2", "Shoal", "cold", 90.0), row("small2", "direct GETs", "-", 100.0),
                      # Another concurrency's direct row must not stand in for the 2-reader one.
                      row("small", "direct GETs", "-", 10.0)])
    assert found["cold 100 KiB files ≥ direct GETs at the same concurrency (16 readers)"] == "PASS"
    assert found["cold 100 KiB files ≥ direct GETs at the same concurrency (2 readers)"] == "MISS"


def test_cold_random_reads_need_twice_s3fs_cold() -> None:
    passing = verdicts([row("rand", "Shoal", "cold", 2100.0), row("rand", "s3fs", "cold", 1000.0)])
    failing = verdicts([row("rand", "Shoal", "cold", 1900.0), row("rand", "s3fs", "cold", 1000.0),
                        row("rand", "s3fs", "warm", 10.0)])
    assert passing["fio random 4 KiB cold ≥ 2x s3fs cold"] == "PASS"
    assert failing["fio random 4 KiB cold ≥ 2x s3fs cold"] == "MISS"
    assert verdicts([])["fio random 4 KiB cold ≥ 2x s3fs cold"] == "n/a"


def test_cpu_is_given_per_gib_for_large_files_and_per_file_for_small_ones() -> None:
    assert cpu_per_unit(row("large1", "Shoal", "cold", 300.0, bytes=2 * GiB)) == "1.00 / 0.50 / 0.25 s/GiB"
    assert cpu_per_unit(row("small", "Shoal", "cold", 300.0, files=1000)) == "2.00 / 1.00 / 0.50 ms/file"
    assert cpu_per_unit(row("small2", "direct GETs", "-", 300.0, objects=500)) == "4.00 / 2.00 / 1.00 ms/file"
    assert cpu_per_unit(row("walk", "Shoal", "warm", 1e5)) == ""


def test_the_docs_section_replaces_the_last_one(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nbefore\n\n{DOCS_BEGIN}\nold table\n{DOCS_END}\n\nafter\n")
    rows = [row("large1", "Shoal", "warm", 900.0, bytes=GiB), row("large1", "passthrough", "warm", 1000.0),
            row("large1", "local disk", "warm", 1800.0)]
    bench = SimpleNamespace(sizes=QUICK)
    section = markdown(bench, rows, targets(rows), ["a note"])  # type: ignore[arg-type]
    write_docs_section(docs, section, DOCS_BEGIN, DOCS_END)
    text = docs.read_text()
    assert "old table" not in text and text.count(DOCS_BEGIN) == 1
    assert text.index("before") < text.index(DOCS_BEGIN) < text.index(DOCS_END) < text.index("after")
    assert "| large seq, 1 reader | Shoal | warm | 900 MB/s | 0.50x | 2.00 / 1.00 / 0.50 s/GiB |" in text
    assert "| PASS | warm large reads ≥ 0.9x the pyfuse3 passthrough warm (1 reader) |" in text
    assert "- a note" in text
