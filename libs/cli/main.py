"""The ``shoal`` command line: apply, get, describe, delete, scale, events, schemas (and up/down from libs.cli.up).

Which I/O it owns: the NATS connection of one command (connect with a deadline, turning "unreachable" into one
sentence and exit code 2), publishing command events and waiting for the fact that answers each of them
(matched by ``causationId``), and reading the dataset and runtime KV buckets. What documents mean is decided in
``libs.documents`` and what is printed in ``libs.cli.render``; both are pure.

Exit codes: 0 success; 1 something was rejected, not found, invalid or unanswered; 2 NATS or the settings are
unusable (and click's own usage errors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import click
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NoStreamResponseError, NotFoundError

from libs import subjects
from libs.bus import Bus, connect, kv_load, kv_values
from libs.cli import render
from libs.cli.up import down, up
from libs.config import NatsSettings, SettingsError, load_settings
from libs.documents import Command, Kind, ManifestError, documents_to_commands, parse_documents
from libs.events.dataset import (
    DatasetAccepted,
    DatasetApply,
    DatasetDelete,
    DatasetDeleted,
    DatasetFact,
    DatasetRecord,
    DatasetRejected,
    DatasetResync,
)
from libs.events.runtime import (
    RuntimeAccepted,
    RuntimeApply,
    RuntimeDelete,
    RuntimeDeleted,
    RuntimeFact,
    RuntimeRecord,
    RuntimeRejected,
)
from libs.events.schema import export_schemas
from libs.mounts import exposed_secret_errors

CLIENT_NAME = "shoal-cli"
# A service answers a command in milliseconds; 10 s leaves room for a service that is just starting.
DEFAULT_TIMEOUT = 10.0
DEFAULT_SCHEMAS_DIR = Path("docs/schemas")

RESOURCE_ALIASES: dict[str, Kind] = {
    "dataset": "dataset", "datasets": "dataset", "ds": "dataset",
    "runtime": "runtime", "runtimes": "runtime",
}
KV_BUCKET: dict[Kind, str] = {"dataset": subjects.KV_DATASETS, "runtime": subjects.KV_RUNTIMES}
FACTS: dict[Kind, str] = {"dataset": subjects.DATASET_FACTS, "runtime": subjects.RUNTIME_FACTS}
RECORD_TYPE: dict[Kind, type[DatasetRecord] | type[RuntimeRecord]] = {
    "dataset": DatasetRecord, "runtime": RuntimeRecord,
}

# Decoded once: every fact that may answer a command (status facts decode too and are skipped).
_FACT_DECODER: msgspec.json.Decoder[DatasetFact | RuntimeFact] = msgspec.json.Decoder(DatasetFact | RuntimeFact)


class CliError(click.ClickException):
    """An error a person can act on: printed as one ``error: ...`` line, no traceback; exit code 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class SetupError(CliError):
    """NATS or the settings are unusable, so no command could be tried at all; exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Options:
    """The global options, handed to every command through click's context."""

    nats_urls: tuple[str, ...]
    timeout: float

    def nats_settings(self) -> NatsSettings:
        try:
            settings = load_settings().nats
        except SettingsError as err:
            raise SetupError(str(err)) from err
        if self.nats_urls:
            settings = replace(settings, urls=list(self.nats_urls))
        return settings


def main() -> None:
    """Console-script entry point (``shoal``)."""
    cli(prog_name="shoal")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", "nats_url", metavar="URLS", default=None,
              help="NATS server URL(s), comma-separated.  [default: $NATS_URL or nats://127.0.0.1:4222]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for NATS and for each answer from a service.")
@click.pass_context
def cli(ctx: click.Context, nats_url: str | None, timeout: float) -> None:
    """Shoal: datasets and their cache runtimes over NATS JetStream, with Fluid-compatible manifests."""
    urls = tuple(part.strip() for part in (nats_url or "").split(",") if part.strip())
    ctx.obj = Options(nats_urls=urls, timeout=timeout)


cli.add_command(up)
cli.add_command(down)


# --- connection ---


def _shown_url(url: str) -> str:
    """The URL without a user or password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class _ConnectErrors(logging.Handler):
    """Collects the errors nats-py reports while connecting, so the CLI can give up once every server failed.

    nats-py retries forever and reports each failure only to its logger; without this the CLI would hang until
    its deadline and print nothing useful.
    """

    def __init__(self, servers: int) -> None:
        super().__init__()
        self.servers = servers
        self.errors: list[BaseException] = []
        self.all_failed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            if len(self.errors) >= self.servers:
                self.all_failed.set()


@asynccontextmanager
async def session(options: Options) -> AsyncIterator[Bus]:
    """A connected Bus for one command; NATS unreachable or not set up for Shoal is a SetupError (exit 2)."""
    settings = options.nats_settings()
    shown = ", ".join(_shown_url(url) for url in settings.urls)
    nats_log = logging.getLogger("nats.aio.client")
    handler = _ConnectErrors(len(settings.urls))
    saved_propagate = nats_log.propagate
    # The CLI reports connection problems itself; nats-py's own log lines would add tracebacks.
    nats_log.propagate = False
    nats_log.addHandler(handler)
    try:
        connecting = asyncio.create_task(connect(settings, CLIENT_NAME))
        failed = asyncio.create_task(handler.all_failed.wait())
        await asyncio.wait({connecting, failed}, timeout=options.timeout, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        await asyncio.gather(failed, return_exceptions=True)
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            reason = _error_text(handler.errors[-1]) if handler.errors else f"no answer within {options.timeout:g}s"
            raise SetupError(f"cannot reach NATS at {shown} ({reason}): is `make run` running?")
        try:
            bus = connecting.result()
        except (OSError, nats.errors.Error) as err:
            raise SetupError(f"cannot reach NATS at {shown} ({_error_text(err)}): is `make run` running?") from err
        try:
            yield bus
        except (NoStreamResponseError, nats.errors.NoRespondersError) as err:
            raise SetupError(f"Shoal's streams do not exist on NATS at {shown}: is `make run` running?") from err
        except nats.errors.TimeoutError as err:
            raise SetupError(f"NATS at {shown} did not answer in time") from err
        finally:
            await bus.close()
    finally:
        nats_log.removeHandler(handler)
        nats_log.propagate = saved_propagate


def _error_text(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return str(err) or type(err).__name__


def _run(coroutine: Any) -> Any:
    """Run one command's coroutine; Ctrl-C ends it quietly with the usual exit code 130."""
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


# --- apply and delete ---


@dataclass(frozen=True)
class Outcome:
    command: Command
    fact: msgspec.Struct | None  # None: no answer before the deadline


async def send_commands(bus: Bus, commands: Sequence[Command], wait_seconds: float) -> list[Outcome]:
    """Publish every command, then wait up to ``wait_seconds`` for the fact answering each (by causationId)."""
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[msgspec.Struct]] = {
        command.event.id: loop.create_future() for command in commands
    }

    async def on_fact(message: Msg) -> None:
        try:
            fact = _FACT_DECODER.decode(message.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return  # a newer version of a fact, or not ours to read
        future = waiting.get(getattr(fact, "causation_id", ""))
        if future is not None and not future.done():
            future.set_result(fact)

    # Subscribe before publishing, and flush so the server has the interest: a fast service cannot answer
    # before we listen. Core NATS is enough, the fact stream is only needed for a replay.
    subscriptions = [await bus.nc.subscribe(FACTS[kind], cb=on_fact)
                     for kind in sorted({command.kind for command in commands})]
    try:
        await bus.nc.flush(timeout=max(1, int(wait_seconds)))
        for command in commands:
            await bus.publish(command.subject, command.event)
        if waiting:
            await asyncio.wait(waiting.values(), timeout=wait_seconds)
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
    outcomes = []
    for command in commands:
        future = waiting[command.event.id]
        outcomes.append(Outcome(command, future.result() if future.done() else None))
        future.cancel()
    return outcomes


def report_outcomes(outcomes: Sequence[Outcome], timeout: float) -> bool:
    """Print one line per command in document order; True when every command was carried out."""
    ok = True
    for outcome in outcomes:
        command, fact = outcome.command, outcome.fact
        if isinstance(fact, DatasetAccepted | RuntimeAccepted):
            done = "resync requested" if isinstance(command.event, DatasetResync) else "configured"
            click.echo(f"{command.resource} {done}")
        elif isinstance(fact, DatasetDeleted | RuntimeDeleted):
            click.echo(f"{command.resource} deleted")
        elif isinstance(fact, DatasetRejected | RuntimeRejected):
            click.echo(f"error: {command.name} rejected: {fact.reason}", err=True)
            ok = False
        else:
            click.echo(f"error: {command.name}: no answer from the {command.kind} service within {timeout:g}s "
                       f"(is it running?)", err=True)
            ok = False
    return ok


def _read_manifests(files: Sequence[IO[str]], namespace: str, action: str) -> tuple[list[Command], list[str], bool]:
    """Commands from every file; prints the errors of invalid documents. Returns (commands, notes, all valid)."""
    commands: list[Command] = []
    notes: list[str] = []
    valid = True
    for file in files:
        try:
            documents = parse_documents(file.read())
        except ManifestError as err:
            click.echo(f"error: {file.name}: {err}", err=True)
            valid = False
            continue
        file_commands, file_notes, errors = documents_to_commands(
            documents, default_namespace=namespace, action="delete" if action == "delete" else "apply"
        )
        for command in file_commands:
            # Refused here, before publishing: a command stays in the command stream for a week.
            exposed = exposed_secret_errors(command.event.dataset) if isinstance(command.event, DatasetApply) else []
            errors += [f"{command.resource}: {reason}" for reason in exposed]
            if not exposed:
                commands.append(command)
        notes += file_notes
        for error in errors:
            click.echo(f"error: {file.name}: {error}", err=True)
            valid = False
    return commands, notes, valid


@cli.command()
@click.option("-f", "--filename", "files", type=click.File("r"), multiple=True, required=True,
              help="Manifest file (multi-document YAML), or - for stdin. Repeatable.")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of documents that do not name one.")
@click.pass_obj
def apply(options: Options, files: tuple[IO[str], ...], namespace: str) -> None:
    """Create or update datasets and runtimes from Shoal or Fluid manifests.

    Fluid runtimes (AlluxioRuntime, JuiceFSRuntime, ...) become Shoal runtimes; every field Shoal does not use
    is listed on stderr as "ignored: ...".
    """
    commands, notes, valid = _read_manifests(files, namespace, "apply")
    for note in notes:
        click.echo(note, err=True)
    if commands:
        ok = _run(_send(options, commands))
        valid = valid and ok
    if not valid:
        raise click.exceptions.Exit(1)


async def _send(options: Options, commands: Sequence[Command]) -> bool:
    async with session(options) as bus:
        outcomes = await send_commands(bus, commands, options.timeout)
    return report_outcomes(outcomes, options.timeout)


@cli.command()
@click.argument("resource", required=False, type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-f", "--filename", "files", type=click.File("r"), multiple=True,
              help="Delete what these manifests describe (or - for stdin).")
@click.pass_obj
def delete(options: Options, resource: str | None, name: str | None, namespace: str,
           files: tuple[IO[str], ...]) -> None:
    """Delete a dataset or runtime: `shoal delete dataset NAME` or `shoal delete -f FILE`."""
    if files and (resource or name):
        raise click.UsageError("give either -f FILE or RESOURCE NAME, not both")
    if files:
        commands, _, valid = _read_manifests(files, namespace, "delete")
    elif resource and name:
        kind = RESOURCE_ALIASES[resource.lower()]
        event: DatasetDelete | RuntimeDelete
        if kind == "dataset":
            event, subject = DatasetDelete(name=name, namespace=namespace), subjects.DATASET_DELETE
        else:
            event, subject = RuntimeDelete(name=name, namespace=namespace), subjects.RUNTIME_DELETE
        commands, valid = [Command(0, kind, kind, name, namespace, subject, event)], True
    else:
        raise click.UsageError("name what to delete: RESOURCE NAME (e.g. dataset demo) or -f FILE")
    if commands:
        valid = _run(_send(options, commands)) and valid
    if not valid:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("resource", type=click.Choice(["dataset", "ds"], case_sensitive=False))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_obj
def resync(options: Options, resource: str, name: str, namespace: str) -> None:
    """List a dataset's mounts again (new or overwritten objects); mounts pick up the new manifest."""
    event = DatasetResync(name=name, namespace=namespace)
    command = Command(0, "dataset", "dataset", name, namespace, subjects.DATASET_RESYNC, event)
    if not _run(_send(options, [command])):
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("resource", type=click.Choice(["runtime", "runtimes"], case_sensitive=False))
@click.argument("name")
@click.option("--replicas", type=int, required=True, help="How many cache workers the runtime should have.")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_obj
def scale(options: Options, resource: str, name: str, replicas: int, namespace: str) -> None:
    """Set a runtime's number of cache workers: `shoal scale runtime NAME --replicas N`.

    The runtime's spec is applied again with the new replicas; the runtime service keeps the workers it has
    (growing) or drops the most recently picked ones (shrinking).
    """
    if replicas < 0:
        raise CliError(f"--replicas must be 0 or more, got {replicas}")
    if not _run(_scale(options, name, namespace, replicas)):
        raise click.exceptions.Exit(1)


async def _scale(options: Options, name: str, namespace: str, replicas: int) -> bool:
    async with session(options) as bus:
        try:
            kv = await bus.kv(subjects.KV_RUNTIMES)
        except BucketNotFoundError:
            _not_found("runtime", name, namespace)
        record, _ = await kv_load(kv, subjects.resource_key(namespace, name), RuntimeRecord)
        if record is None:
            _not_found("runtime", name, namespace)
        runtime = record.runtime
        spec = msgspec.structs.replace(runtime.spec, replicas=replicas)
        event = RuntimeApply(runtime=msgspec.structs.replace(runtime, spec=spec))
        command = Command(0, "runtime", "runtime", name, namespace, subjects.RUNTIME_APPLY, event)
        outcomes = await send_commands(bus, [command], options.timeout)
    [outcome] = outcomes
    if isinstance(outcome.fact, RuntimeAccepted):
        click.echo(f"{command.resource} scaled to {replicas} replicas")
        return True
    return report_outcomes(outcomes, options.timeout)


# --- get and describe ---


async def load_records(options: Options, kind: Kind, namespace: str | None, name: str | None) -> list[Any]:
    """Records of one kind, sorted by namespace and name; ``namespace`` None means every namespace."""
    async with session(options) as bus:
        try:
            kv = await bus.kv(KV_BUCKET[kind])
        except BucketNotFoundError:
            return []  # nothing was ever applied: the services create the buckets on start
        record_type = RECORD_TYPE[kind]
        if name is not None and namespace is not None:
            record, _ = await kv_load(kv, subjects.resource_key(namespace, name), record_type)
            return [record] if record is not None else []
        records: list[Any] = await kv_values(kv, record_type)
    records = [record for record in records if namespace is None or _meta(record).namespace == namespace]
    return sorted(records, key=lambda record: (_meta(record).namespace, _meta(record).name))


def _meta(record: DatasetRecord | RuntimeRecord) -> Any:
    return record.dataset.metadata if isinstance(record, DatasetRecord) else record.runtime.metadata


def _not_found(kind: Kind, name: str, namespace: str) -> NoReturn:
    raise CliError(f'{kind}.shoal.io "{name}" not found in namespace "{namespace}"')


@cli.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-A", "--all-namespaces", is_flag=True, help="List across every namespace.")
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml"]), default=None,
              help="wide: more columns; json/yaml: the full records.")
@click.pass_obj
def get(options: Options, resource: str, name: str | None, namespace: str, all_namespaces: bool,
        output: str | None) -> None:
    """List datasets or runtimes (`shoal get datasets`, `shoal get runtime demo -o yaml`)."""
    if all_namespaces and name:
        raise click.UsageError("a resource cannot be retrieved by name across all namespaces")
    kind = RESOURCE_ALIASES[resource.lower()]
    records = _run(load_records(options, kind, None if all_namespaces else namespace, name))
    if not records:
        if name:
            _not_found(kind, name, namespace)
        if output in ("json", "yaml"):  # an empty list, so scripts parse the same shape either way
            click.echo(render.to_json({"items": []}) if output == "json" else render.to_yaml({"items": []}), nl=False)
        else:
            click.echo("No resources found" + ("" if all_namespaces else f" in {namespace} namespace") + ".",
                       err=True)
        return
    if output == "json":
        click.echo(render.to_json(render.records_document(records, single=name is not None)), nl=False)
    elif output == "yaml":
        click.echo(render.to_yaml(render.records_document(records, single=name is not None)), nl=False)
    elif kind == "dataset":
        click.echo(render.dataset_table(records, wide=output == "wide", show_namespace=all_namespaces), nl=False)
    else:
        click.echo(render.runtime_table(records, wide=output == "wide", show_namespace=all_namespaces), nl=False)


@cli.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_obj
def describe(options: Options, resource: str, name: str | None, namespace: str) -> None:
    """Show every spec and status field of a dataset or runtime (all of the namespace without NAME)."""
    kind = RESOURCE_ALIASES[resource.lower()]
    records = _run(load_records(options, kind, namespace, name))
    if not records:
        if name:
            _not_found(kind, name, namespace)
        click.echo(f"No resources found in {namespace} namespace.", err=True)
        return
    texts = [render.describe_dataset(r) if isinstance(r, DatasetRecord) else render.describe_runtime(r)
             for r in records]
    click.echo("\n".join(texts), nl=False)


# --- events ---


@cli.command()
@click.option("--subject", default=subjects.ALL_FACTS, show_default=True, help="Subject (wildcards allowed).")
@click.option("--all", "replay", is_flag=True, help="Replay what the stream still holds, then follow.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.pass_obj
def events(options: Options, subject: str, replay: bool, limit: int | None) -> None:
    """Print events as JSON lines as they happen, until Ctrl-C."""
    _run(_tail(options, subject, replay, limit))


async def _tail(options: Options, subject: str, replay: bool, limit: int | None) -> None:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        await queue.put(message)

    subscription: Subscription
    async with session(options) as bus:
        if replay:
            try:
                subscription = await bus.js.subscribe(subject, cb=on_message, ordered_consumer=True,
                                                      deliver_policy=js_api.DeliverPolicy.ALL)
            except NotFoundError as err:
                raise CliError(f"no stream holds {subject!r}, so there is nothing to replay") from err
        else:
            subscription = await bus.nc.subscribe(subject, cb=on_message)
        try:
            printed = 0
            while limit is None or printed < limit:
                message = await queue.get()
                click.echo(message.data.decode(errors="replace"))
                printed += 1
        finally:
            await subscription.unsubscribe()


# --- schemas ---


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_SCHEMAS_DIR)
def schemas(directory: Path) -> None:
    """Write the JSON Schema of every public event type into DIRECTORY (one file per type tag + index.json)."""
    written = export_schemas(directory)
    click.echo(f"wrote {len(written)} files to {directory}")


if __name__ == "__main__":
    main()
