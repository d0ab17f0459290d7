"""What a reader follows or copies from the docs works: every relative link resolves (file and heading), every YAML
example parses, and every manifest among them becomes commands without an error or an ignored field; the README's
list of the buckets whose delete markers each service purges is ``libs.subjects``'s.

Static and fast, as ``test_docs_match_code``: the docs are read as text. ``docs/benchmarks.md`` and
``docs/reliability.md`` are reports of past runs and are left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from libs import subjects
from libs.documents import documents_to_commands, parse_documents
from tests.unit.test_docs_match_code import ROOT, doc_files

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCED_YAML = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)
# The groups whose documents `shoal apply` reads; a YAML example of another (a Pod, a kind cluster) is only parsed.
MANIFEST_API = re.compile(r"^apiVersion: *(shoal\.io|data\.fluid\.io)/", re.M)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"#{1,6} +(.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text()
    problems = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part) if file_part else path
        where = f"{path.relative_to(root)}:{line_of(text, match.start())}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: no heading #{anchor}")
    return problems


def yaml_problems(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text()
    problems = []
    for match in FENCED_YAML.finditer(text):
        where = f"{path.relative_to(root)}:{line_of(text, match.start())}"
        example = match.group(1)
        try:
            list(yaml.safe_load_all(example))
        except yaml.YAMLError as err:
            problems.append(f"{where}: not YAML: {' '.join(str(err).split())}")
            continue
        if not MANIFEST_API.search(example):
            continue
        commands, notes, errors = documents_to_commands(parse_documents(example))
        if errors or notes or not commands:
            problems.append(f"{where}: {errors or notes or 'no command'}")
    return problems


def test_every_relative_link_of_the_docs_resolves() -> None:
    problems = [problem for path in doc_files() for problem in link_problems(path)]
    assert problems == []


def test_every_yaml_example_parses_and_every_manifest_applies_cleanly() -> None:
    problems = [problem for path in doc_files() for problem in yaml_problems(path)]
    examples = sum(len(FENCED_YAML.findall(path.read_text())) for path in doc_files())
    assert examples >= 5
    assert problems == []


def test_a_broken_link_or_example_is_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#a-heading) [b](missing.md) [c](other.md#nope) [d](https://example.com/x)\n"
                   "```yaml\nkey: [\n```\n"
                   "```yaml\napiVersion: shoal.io/v1alpha1\nkind: Dataset\nmetadata: {name: x}\n"
                   "spec: {mounts: [{mountPoint: s3://b/}], mount: 1}\n```\n")
    links, examples = link_problems(doc, tmp_path), yaml_problems(doc, tmp_path)
    assert [problem.split(": ", 1)[1] for problem in links] == ["missing.md: no such file",
                                                                 "other.md#nope: no heading #nope"]
    assert len(examples) == 2 and "not YAML" in examples[0] and "spec.mount " in examples[1]


def test_the_readme_names_every_bucket_each_service_sweeps() -> None:
    """The README's `markers` paragraph lists, per service, the buckets ``libs.markers`` purges for it."""
    text = " ".join((ROOT / "README.md").read_text().split())
    paragraph = text[text.index("- `markers`:"):text.index("- `members`:")]
    swept = {"dataset": subjects.SWEPT_BY_DATASET, "runtime": subjects.SWEPT_BY_RUNTIME,
             "loader": subjects.SWEPT_BY_LOADER, "bridge": subjects.SWEPT_BY_BRIDGE}
    named = {}
    for service in swept:
        listed = re.search(rf"\b{service}: ([^;)]*)", paragraph)
        assert listed, f"the README's markers paragraph names no buckets for the {service} service"
        named[service] = set(re.findall(r"`(shoal_\w+)`", listed.group(1)))
    assert named == {service: set(buckets) for service, buckets in swept.items()}


def test_the_notes_the_migration_guide_shows_are_those_its_example_files_give() -> None:
    """docs/migrating-from-fluid.md shows what `shoal apply -f` prints for two files of deploy/examples/."""
    text = (ROOT / "docs" / "migrating-from-fluid.md").read_text()
    command = re.search(r"\(`\.venv/bin/shoal apply((?:\s+-f\s+[^\s`]+)+)`\):\n+```\n(.*?)```", text, re.S)
    assert command, "the guide's 'Check your manifests first' example is not found"
    files = re.findall(r"-f\s+(\S+)", command.group(1))
    notes = [note for name in files
             for note in documents_to_commands(parse_documents((ROOT / name).read_text()))[1]]
    assert command.group(2).splitlines() == notes
