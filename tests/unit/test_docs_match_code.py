"""What the docs name exists in the code, spelled the same: metric names and labels (``libs.metrics``), environment
variables and their defaults (``libs.config``, the CLI's options, direct reads), ``shoal`` command lines, NATS
subjects, streams and KV buckets (``libs.subjects``).

Static and fast: the docs are read as text, the names come from the modules that spell them once. A name a reader
copies from a README into a query, a shell or a config must work; these tests fail on the first typo or rename
with the file, the line and the name. ``docs/benchmarks.md`` and ``docs/reliability.md`` are reports of past runs
and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import click
import pytest
from prometheus_client import Counter, Gauge, Histogram

from libs import config, metrics, subjects
from libs.cli.main import cli
from libs.cli.stack.ports import service_http_ports
from libs.cli.stack.supervision import SERVICES
from libs.events.common import parse_quantity
from libs.telemetry import ENDPOINT_VARIABLES, PROTOCOL_VARIABLES

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
# Other ``shoal_`` words in the docs that are neither: a function of libs/crds.py.
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


# --- environment variables ---------------------------------------------------------------------------------------

SETTING_GROUPS = (config.NatsSettings, config.S3Settings, config.ServiceSettings, config.AgentSettings,
                  config.SchedulerSettings, config.KubeSettings)
# Where the code reads a variable outside libs.config: ``os.environ.get("X"...``, ``environ["X"]``, ``getenv("X"``.
ENVIRON_READ = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
VARIABLE_WORD = re.compile(r"\b((?:SHOAL|NATS|OTEL|PROMETHEUS)_[A-Z0-9_]*[A-Z0-9])(\*|_\*)?")
# Empty defaults as the Settings table words them.
EMPTY_WORDS = {"", "none", "all", "aws", "in-cluster", "off", "host name"}


def setting_fields() -> dict[str, Field[Any]]:
    """Environment variable → its field of ``libs.config``."""
    return {item.metadata["env"]: item for group in SETTING_GROUPS for item in fields(group)}


def cli_variables() -> set[str]:
    """Every ``envvar`` of an option of the ``shoal`` commands."""
    found: set[str] = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            if isinstance(param.envvar, str):
                found.add(param.envvar)
            elif param.envvar:
                found.update(param.envvar)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(cli)
    return found


def read_variables() -> set[str]:
    """Every variable Shoal's processes and CLI read: settings, CLI options, and direct reads in libs/ and services/."""
    direct = {name for folder in ("libs", "services") for path in (ROOT / folder).rglob("*.py")
              for name in ENVIRON_READ.findall(path.read_text())}
    return set(setting_fields()) | cli_variables() | direct | set(ENDPOINT_VARIABLES) | set(PROTOCOL_VARIABLES)


def split_cell(cell: str) -> list[str]:
    """A table cell's parts separated by ``/`` or ``,`` outside backticks, each without backticks or a trailing
    ``(...)`` remark."""
    parts, current, quoted = [], "", False
    for char in cell:
        if char == "`":
            quoted = not quoted
        elif char in "/," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [re.sub(r"\(.*\)", "", part).strip() for part in parts]


def settings_table() -> dict[str, str]:
    """Variable → documented default, from the README's Settings table (``X`` / ``_Y`` stands for X and X with its
    last word replaced by Y)."""
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("\n## Settings\n", 1)[1], maxsplit=1)[0]
    table: dict[str, str] = {}
    for line in section.splitlines():
        if not re.match(r"\| `[A-Z_]", line):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z_][A-Z0-9_]*)`", cells[0])
        names = [name if not name.startswith("_") else names[0].rsplit("_", 1)[0] + name for name in names]
        defaults = split_cell(cells[1]) if cells[1] else [""] * len(names)
        assert len(defaults) == len(names), f"README Settings: {line}: one default per variable"
        table |= dict(zip(names, defaults, strict=True))
    return table


def default_problem(name: str, item: Field[Any], documented: str) -> str | None:
    """Why ``documented`` is not the field's default as the table writes it, or None when it is."""
    value = item.default_factory() if item.default is MISSING else item.default  # type: ignore[operator]
    if isinstance(value, config.Secret):
        value = value.reveal()
    if value in ("", None, [], {}) or name in ("SHOAL_NODE_NAME", "SHOAL_REPLICA_NAME"):  # the host name
        ok = documented.lower() in EMPTY_WORDS
    elif isinstance(value, bool):
        ok = documented == str(value).lower()
    elif isinstance(value, int | float):
        number = documented.split()[0] if documented else ""
        ok = (bool(re.fullmatch(r"[0-9.]+", number)) and float(number) == value) or (
            bool(re.fullmatch(r"[0-9]+[KMGT]i", number)) and parse_quantity(number) == value)
    elif isinstance(value, list):
        ok = documented == ",".join(value)
    else:
        ok = documented == value
    return None if ok else f"{name}: the README says {documented!r}, the code's default is {value!r}"


def test_every_setting_is_in_the_readme_table_with_the_code_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_METRICS", raising=False)
    table = settings_table()
    known = setting_fields()
    assert sorted(set(known) - set(table)) == [], "settings of libs/config.py missing from the README's table"
    # SHOAL_METRICS is read where the instruments are made (libs.metrics.data_path_enabled), before any settings.
    assert sorted(set(table) - set(known)) == ["SHOAL_METRICS"], "a variable of the README's table no code reads"
    assert table["SHOAL_METRICS"] == "on" and metrics.data_path_enabled()
    problems = [default_problem(name, known[name], documented) for name, documented in table.items() if name in known]
    assert [problem for problem in problems if problem] == []


def test_every_variable_the_docs_name_is_read_by_the_code() -> None:
    """A ``SHOAL_*``, ``NATS_*``, ``OTEL_*`` word is a variable something reads, a stream, or a prefix of those.
    Bench, soak and fuzz variables are read by tests/, so tests/ counts as code here."""
    streams = {value for value in vars(subjects).values() if isinstance(value, str) and value.startswith("SHOAL_")}
    code = "\n".join(path.read_text() for folder in ("libs", "services", "tests", "deploy")
                     for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".yaml", ".conf"))
    spelled = set(re.findall(r"\b(?:SHOAL|NATS|OTEL|PROMETHEUS)_[A-Z0-9_]*", code)) | read_variables() | streams
    # The OpenTelemetry SDK reads these itself (README, Traces: "as the OpenTelemetry SDK documents them").
    sdk = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_BSP")
    problems = []
    for where, line in doc_lines():
        for match in VARIABLE_WORD.finditer(line):
            name, wildcard = match.groups()
            if name.startswith(sdk) or name in spelled:
                continue
            prefix = wildcard or line[match.end():].startswith("<")
            if prefix and any(other.startswith(name) for other in spelled):
                continue
            problems.append(f"{where}: {name}{wildcard or ''}")
    assert problems == []


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = {match.group(1) for _, line in doc_lines() for match in VARIABLE_WORD.finditer(line)}
    assert sorted(read_variables() - documented) == []


def test_the_readme_gives_each_shoal_up_variable_its_option_default() -> None:
    up = cli.commands["up"]
    # A flag is off unless given (click's default for it is a sentinel, not False).
    defaults = {param.envvar: "off" if getattr(param, "is_flag", False) else str(param.default)
                for param in up.params if isinstance(param.envvar, str)}
    text = (ROOT / "README.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| `--[a-z0-9-]+`.* \| `SHOAL_", line)]
    table: dict[str, str] = {}
    for row in rows:
        _, names, documented = (cell.strip() for cell in row.strip().strip("|").split("|"))
        variables = re.findall(r"`(SHOAL_\w+)`", names)
        table |= dict(zip(variables, split_cell(documented) * (len(variables) // len(split_cell(documented))),
                          strict=True))
    assert sorted(table) == sorted(defaults), "a variable of `shoal up` missing from the README's table, or extra"
    for variable, documented in table.items():
        assert documented == defaults[variable], f"{variable}: the README says {documented}, not {defaults[variable]}"


def test_a_wrong_default_or_an_unread_variable_is_caught() -> None:
    known = setting_fields()
    assert default_problem("SHOAL_MAX_DELIVER", known["SHOAL_MAX_DELIVER"], "5") is None
    assert default_problem("SHOAL_MAX_DELIVER", known["SHOAL_MAX_DELIVER"], "3") is not None
    assert default_problem("SHOAL_SCHED_WEBHOOK_MAX_BYTES", known["SHOAL_SCHED_WEBHOOK_MAX_BYTES"], "8Mi") is None
    assert default_problem("SHOAL_S3_PATH_STYLE", known["SHOAL_S3_PATH_STYLE"], "false") is not None
    assert default_problem("SHOAL_S3_REGION", known["SHOAL_S3_REGION"], "none") is not None
    assert split_cell("`topology.kubernetes.io/zone` / `x`, `8Mi` (in bytes)") == [
        "topology.kubernetes.io/zone", "x", "8Mi"]
    assert "SHOAL_UP_AGENTS" in read_variables() and "SHOAL_METRICS" in read_variables()


# --- CLI commands and flags --------------------------------------------------------------------------------------

# ``shoal`` then its words (commands, kinds, names) up to the end of the command as a doc writes it.
INVOCATION = re.compile(r"(?<![\w/.-])shoal((?: +[a-z][\w-]*)+)")
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def options_of(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)}


def invocation_problem(line: str, match: re.Match[str]) -> str | None:
    """Why ``shoal ...`` at ``match`` is not a command line the CLI takes, or None. Prose that starts with "shoal"
    (no command word after it) is not an invocation."""
    words = match.group(1).split()
    command: click.Command = cli
    path: list[str] = []
    for word in words:
        subcommands: dict[str, click.Command] = getattr(command, "commands", {})
        if word not in subcommands:
            break
        command = subcommands[word]
        path.append(word)
    if not path:
        return None
    rest = words[len(path):]
    choice = next((param.type for param in command.params if isinstance(param, click.Argument)), None)
    if isinstance(choice, click.Choice) and rest and rest[0] not in choice.choices:
        return f"shoal {' '.join(path)} {rest[0]}: not one of {list(choice.choices)}"
    # The command line ends at a backtick, a comment, a table cell or a shell separator.
    tail = re.split(r"[`#|;]|  ", line[match.end(1):])[0]
    known = options_of(command) | options_of(cli) | {"-h", "--help"}
    unknown = [flag for flag in FLAG.findall(tail) if flag not in known]
    return f"shoal {' '.join(path)}: no option {unknown}" if unknown else None


def test_every_shoal_command_line_in_the_docs_is_one_the_cli_takes() -> None:
    problems, seen = [], 0
    for where, line in doc_lines():
        for match in INVOCATION.finditer(line):
            problem = invocation_problem(line, match)
            seen += 1
            if problem:
                problems.append(f"{where}: {problem}")
    assert seen > 50
    assert problems == []


def test_the_readme_gives_each_service_its_side_server_port() -> None:
    """``shoal up --http-port`` hands the services consecutive ports in ``supervision.SERVICES`` order."""
    text = " ".join((ROOT / "README.md").read_text().split())
    documented = re.search(r"from `--http-port` \(default (\d+): ([^;]*);", text)
    assert documented is not None
    listed = dict((name, int(port)) for name, port in re.findall(r"(\w+) (\d+)", documented.group(2)))
    assert listed == service_http_ports(int(documented.group(1)), list(SERVICES))


def test_a_wrong_command_kind_or_flag_is_caught() -> None:
    def check(line: str) -> str | None:
        match = INVOCATION.search(line)
        assert match is not None
        return invocation_problem(line, match)

    assert check("shoal get datasets -A -o wide") is None
    assert check("shoal load dataset demo --path /a --replicas 2 --wait") is None
    assert check("shoal get datasets --namespaces") is not None
    assert check("shoal scale runtime demo --workers 3") is not None
    assert check("shoal get dataset demo") is None and check("shoal get pods") is not None


# --- NATS subjects, streams and buckets --------------------------------------------------------------------------

# A subject as a doc writes it: ``shoal.cmd.dataset.{apply,delete}``, ``shoal.task.node.<node>.>``. Not a word
# after a dot (``application/vnd.shoal.peer-block.v2``) or a hostname part (``shoal.io``).
SUBJECT_WORD = re.compile(r"(?<![\w./-])shoal\.[a-z][\w.*>{},<…-]*")
# The peer protocol's content type, the Kubernetes API group, a file name and a span attribute
# (``telemetry.DATASET_ATTRIBUTE``): ``shoal.`` words that are not subjects.
NOT_SUBJECTS = re.compile(r"shoal\.(io|yaml|peer-block\.v\d+)\b|shoal\.dataset$")
# Told as history: "Before, SHOAL_TASKS held every node's parts (shoal.task.>)" (docs/security.md, upgrading).
FORMER_SUBJECTS = {"shoal.task.>"}
PLACEHOLDER = "<x>"


def subject_templates() -> set[str]:
    """Every subject of ``libs.subjects``: its constants, and its functions with ``<x>`` for each part."""
    constants = {value for value in vars(subjects).values() if isinstance(value, str) and value.startswith("shoal.")}
    constants |= {value for value in subjects.OPERATION_COMMANDS}
    made = {subjects.agent_heartbeat(PLACEHOLDER), subjects.agent_inventory(PLACEHOLDER),
            subjects.node_task(PLACEHOLDER, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER), subjects.node_tasks(PLACEHOLDER),
            subjects.task_progress(PLACEHOLDER), subjects.dead_letter(PLACEHOLDER, PLACEHOLDER)}
    return constants | made


def expand(subject: str) -> list[str]:
    """``a.{b,c}.d`` → ``a.b.d``, ``a.c.d`` (every brace group); ``{…}`` stands for the group before it."""
    match = re.search(r"\{([^{}]*)\}", subject)
    if match is None:
        return [subject]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand(subject[:match.start()] + choice.strip() + subject[match.end():])]


def subject_known(subject: str, templates: set[str]) -> bool:
    """True when ``subject`` is one of ``templates``, with any ``<...>`` or plain token where a template has
    ``<x>``."""
    written = re.sub(r"<[^>]*>", PLACEHOLDER, subject)
    for template in templates:
        pattern = re.escape(template).replace(re.escape(PLACEHOLDER), r"(?:<x>|[\w-]+)")
        if re.fullmatch(pattern, written):
            return True
    return False


def test_every_subject_the_docs_name_is_one_of_libs_subjects() -> None:
    templates = subject_templates()
    problems, seen = [], 0
    for where, line in doc_lines():
        for match in SUBJECT_WORD.finditer(line):
            word = match.group(0).rstrip(".,")
            if NOT_SUBJECTS.match(word) or word in FORMER_SUBJECTS or "…" in word:
                continue
            seen += 1
            problems += [f"{where}: {subject}" for subject in expand(word) if not subject_known(subject, templates)]
    assert seen > 20
    assert problems == []


def test_every_stream_and_bucket_the_docs_name_exists() -> None:
    """A word like a stream (``SHOAL_[A-Z_]+`` next to "stream") or a bucket (``shoal_*`` next to "bucket" or
    "KV") is one of libs/subjects.py."""
    streams = {value for value in vars(subjects).values() if isinstance(value, str) and value.startswith("SHOAL_")}
    problems = []
    for where, line in doc_lines():
        for name in re.findall(r"`(SHOAL_[A-Z_]+)` (?:stream|holds|captures)|stream `(SHOAL_[A-Z_]+)`", line):
            word = "".join(name)
            if word not in streams and not (word.endswith("_") and word in streams | {subjects.TASK_STREAM_PREFIX}):
                problems.append(f"{where}: stream {word}")
        for name in re.findall(r"`(shoal_\w+)` (?:bucket|KV|object store)|(?:bucket|KV) `(shoal_\w+)`", line):
            word = "".join(name)
            if word not in BUCKETS:
                problems.append(f"{where}: bucket {word}")
    assert problems == []


def test_a_subject_the_code_does_not_use_is_caught() -> None:
    templates = subject_templates()
    assert expand("shoal.evt.{dataload,dataclean}.{accepted,deleted}") == [
        "shoal.evt.dataload.accepted", "shoal.evt.dataload.deleted", "shoal.evt.dataclean.accepted",
        "shoal.evt.dataclean.deleted"]
    assert subject_known("shoal.task.node.n1.>", templates)
    assert subject_known("shoal.dlq.SHOAL_COMMANDS.dataset-commands", templates)
    assert subject_known("shoal.agent.heartbeat.<node>", templates)
    assert not subject_known("shoal.cmd.dataset.sync", templates)
    assert not subject_known("shoal.agent.heartbeats.<node>", templates)
