"""What the docs name exists in the code, spelled the same: metric names and labels (``libs.metrics``).

Static and fast: the docs are read as text, the names come from the modules that spell them once. A name a reader
copies from a README into a query, a shell or a config must work; these tests fail on the first typo or rename
with the file, the line and the name. ``docs/benchmarks.md`` and ``docs/reliability.md`` are reports of past runs
and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from libs import metrics, subjects

ROOT = Path(__file__).resolve().parents[2]
# Reports of past runs: they quote what was true then.
REPORTS = {"docs/benchmarks.md", "docs/reliability.md"}


def doc_files() -> list[Path]:
    """Every doc a reader lands on: the README, docs/, each service's README and deploy/'s READMEs."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "services").glob("*/README.md")), *sorted((ROOT / "deploy").glob("**/README.md"))]
    return [path for path in found if str(path.relative_to(ROOT)) not in REPORTS]


def doc_lines() -> Iterator[tuple[str, str]]:
    """(``file:line``, text) of every line of every doc."""
    for path in doc_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{number}", line


def test_the_docs_are_found() -> None:
    names = {str(path.relative_to(ROOT)) for path in doc_files()}
    assert {"README.md", "docs/security.md", "services/agent/README.md", "deploy/grafana/README.md"} <= names
    assert not names & REPORTS


# --- metrics ---------------------------------------------------------------------------------------------------

INSTRUMENTS: list[Counter | Gauge | Histogram] = [
    value for value in vars(metrics).values() if isinstance(value, Counter | Gauge | Histogram)]
# Every KV bucket and object store: ``shoal_<word>`` in a doc is either a metric or one of these.
BUCKETS = {value for name, value in vars(subjects).items() if name.startswith(("KV_", "OBJ_"))}
# Other ``shoal_`` words in the docs that are neither: a function of services/bridge/domain.py.
OTHER_WORDS = {"shoal_status"}
METRIC_WORD = re.compile(r"\bshoal_[a-z0-9_]*[a-z0-9](?:\{([^}]*)\})?")


def series() -> dict[str, Counter | Gauge | Histogram]:
    """Every name a scrape shows for an instrument (as a doc may name it) → the instrument. A counter is only
    ``<name>_total``; a histogram is its name or one of its series."""
    names: dict[str, Counter | Gauge | Histogram] = {}
    for instrument in INSTRUMENTS:
        if isinstance(instrument, Counter):
            names[f"{instrument._name}_total"] = instrument
        elif isinstance(instrument, Histogram):
            names |= {f"{instrument._name}{suffix}": instrument for suffix in ("", "_bucket", "_count", "_sum")}
        else:
            names[instrument._name] = instrument
    return names


def label_keys(selector: str) -> set[str]:
    """The label names of ``{a, b}`` or ``{a="x", b=~"y"}`` as a doc writes them."""
    return {part.split("=")[0].strip().rstrip("!~") for part in selector.split(",") if part.strip()}


def metric_mentions() -> Iterator[tuple[str, str, str | None]]:
    """(where, name, labels or None) of every ``shoal_...`` word of the docs that is not a bucket."""
    for where, line in doc_lines():
        for match in METRIC_WORD.finditer(line):
            name = match.group(0).split("{")[0]
            if (name in BUCKETS and match.group(1) is None) or name in OTHER_WORDS:
                continue
            yield where, name, match.group(1)


def test_every_metric_the_docs_name_exists_with_the_labels_they_give() -> None:
    known = series()
    problems = []
    for where, name, labels in metric_mentions():
        instrument = known.get(name)
        if instrument is None:
            problems.append(f"{where}: {name} is not a metric of libs/metrics.py (nor a bucket of libs/subjects.py)")
        elif labels is not None and label_keys(labels) != set(instrument._labelnames):
            problems.append(f"{where}: {name}{{{labels}}}, but its labels are {list(instrument._labelnames)}")
    assert problems == []


def test_the_agent_readme_table_gives_each_metric_its_type_and_labels() -> None:
    """The agent README's table has a type and a labels column (``node`` and ``dataset`` implied)."""
    known = series()
    kinds = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
    text = (ROOT / "services/agent/README.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| `shoal_\w+` \| (counter|gauge|histogram) \|", line)]
    assert len(rows) >= 10
    for row in rows:
        name, kind, labels = (cell.strip() for cell in row.strip("|").split("|")[:3])
        instrument = known[name.strip("`")]
        assert kinds[type(instrument)] == kind, row
        assert set(re.findall(r"`(\w+)`", labels)) <= set(instrument._labelnames), row


def test_a_misspelt_metric_or_label_is_caught() -> None:
    """The checks above can fail: a name that is not registered, a label it does not have."""
    known = series()
    assert "shoal_scheduler_inventory_ignored_total" not in known
    assert "shoal_block_reads" not in known  # a counter is only scraped as ..._total
    assert "shoal_fuse_request_duration_seconds" in known
    assert label_keys('outcome="unknown_dataset"') == {"outcome"}
    assert label_keys("way, outcome") == set(known["shoal_scheduler_decisions_total"]._labelnames)
