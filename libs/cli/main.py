"""The ``shoal`` command line: apply, get, describe, delete, scale, load, clean, run, events, schemas (and up/down
from libs.cli.up).

Which I/O it owns: the NATS connection of one command (connect with a deadline, turning "unreachable" into one
sentence and exit code 2), publishing command events and waiting for the fact that answers each of them
(matched by ``causationId``), and reading the dataset, runtime and operation KV buckets. What documents mean is
decided in ``libs.documents`` and what is printed in ``libs.cli.render``; both are pure. Which files ``-f`` names
(a file, a folder, stdin) is ``libs.cli.manifests``. Following a DataLoad or DataClean to its end (``--wait``) is
``libs.cli.operations``.

Exit codes: 0 success; 1 something was rejected, not found, invalid or unanswered; 2 NATS or the settings are
unusable (and click's own usage errors).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from libs import subjects
from libs.bus import (
    CONNECT_TIMEOUT,
    MESSAGE_LIMIT,
    Bus,
    Permanent,
    PermissionDenied,
    TlsNotOffered,
    connect,
    kv_keys,
    kv_load,
    login_user,
)
from libs.cli import manifests, operations, render
from libs.cli.errors import CliError
from libs.cli.up import down, up
from libs.config import NatsSettings, Settings, SettingsError, load_settings, nats_url_errors
from libs.documents import (
    OPERATION_KINDS,
    Command,
    Kind,
    ManifestError,
    documents_to_commands,
    no_objects,
    parse_documents,
    resource_type,
    too_large,
)
from libs.events.common import DNS1123_LABEL, ObjectMeta, ObjectRef, dns_label_errors
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
from libs.events.operation import (
    CleanTarget,
    DataClean,
    DataCleanApply,
    DataCleanDelete,
    DataCleanSpec,
    DataLoad,
    DataLoadApply,
    DataLoadDelete,
    DataLoadRun,
    DataLoadSpec,
    DatasetRef,
    OperationAccepted,
    OperationDeleted,
    OperationFact,
    OperationRecord,
    OperationRejected,
    TargetPath,
)
from libs.events.runtime import (
    AutoscalingPolicy,
    RuntimeAccepted,
    RuntimeApply,
    RuntimeDelete,
    RuntimeDeleted,
    RuntimeFact,
    RuntimeRecord,
    RuntimeRejected,
    RuntimeScale,
)
from libs.events.schema import export_schemas
from libs.members import event_limits
from libs.mounts import exposed_secret_errors
from libs.paths import target_path_problem
from libs.telemetry import setup_logging

CLIENT_NAME = "shoal-cli"
# A service answers a command in milliseconds; 10 s leaves room for a service that is just starting.
DEFAULT_TIMEOUT = 10.0
DEFAULT_SCHEMAS_DIR = Path("docs/schemas")
# Seconds per server when --nats or NATS_URL names several: a live server answers within milliseconds (a busy one or
# a TLS handshake over a long link well within a second), so this moves on from a frozen one (SIGSTOPped: it accepts
# TCP and says nothing) quickly, where the Bus's 5 s made every command take 6.5 s. One server keeps the Bus's
# generous timeout: there is no other to try.
MULTI_SERVER_CONNECT_TIMEOUT = 1.5

# Each kind's names on the command line, as kubectl takes them: singular, plural and short names. The short names
# are Fluid's CRD shortNames where it has one (libs.crds.FLUID_SHORT_NAMES: `dataset`, `load`, which its users
# type), `clean` after `load` (Fluid has no DataClean), and a two-letter one for each kind, as kubectl's own (`ds`).
KIND_NAMES: dict[Kind, tuple[str, ...]] = {
    "dataset": ("dataset", "datasets", "ds"),
    "runtime": ("runtime", "runtimes", "rt"),
    "dataload": ("dataload", "dataloads", "dl", "load"),
    "dataclean": ("dataclean", "datacleans", "dc", "clean"),
}
RESOURCE_ALIASES: dict[str, Kind] = {name: kind for kind, names in KIND_NAMES.items() for name in names}
KV_BUCKET: dict[Kind, str] = {"dataset": subjects.KV_DATASETS, "runtime": subjects.KV_RUNTIMES,
                              "dataload": subjects.KV_OPERATIONS, "dataclean": subjects.KV_OPERATIONS}
FACTS: dict[Kind, str] = {"dataset": subjects.DATASET_FACTS, "runtime": subjects.RUNTIME_FACTS,
                          "dataload": subjects.DATALOAD_FACTS, "dataclean": subjects.DATACLEAN_FACTS}
# The service that answers each kind's commands, for "no answer" messages.
SERVICE: dict[Kind, str] = {"dataset": "dataset", "runtime": "runtime", "dataload": "loader",
                            "dataclean": "loader"}
RECORD_TYPE: dict[Kind, type[DatasetRecord] | type[RuntimeRecord] | type[OperationRecord]] = {
    "dataset": DatasetRecord, "runtime": RuntimeRecord, "dataload": OperationRecord, "dataclean": OperationRecord,
}
# Kubernetes' generateName alphabet: no vowels (no words) and no look-alikes (0/o, 1/l).
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_NAME_SUFFIX_LENGTH = 5
_MAX_NAME = 63  # a DNS label

AnyFact = DatasetFact | RuntimeFact | OperationFact
# Decoded once: every fact that may answer a command (status facts decode too and are skipped).
_FACT_DECODER: msgspec.json.Decoder[AnyFact] = msgspec.json.Decoder(AnyFact)
T = TypeVar("T")


def _checked_namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``-n``: a DNS-1123 label, as Kubernetes names namespaces; anything else (an empty one) names nothing there is
    to find or apply, and said as such it is a clearer error than "No resources found in  namespace"."""
    errors = dns_label_errors(value, "--namespace", DNS1123_LABEL)
    if errors:
        raise CliError("; ".join(errors))
    return value


def _checked_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A NAME, DATASET or ``--name``: an empty one names nothing; said here, before anything is published or read,
    rather than as the service's rejection of a blank name ("error:  rejected: ...") or a listing of every name."""
    if value is not None and not value:
        what = {"name": "a name", "dataset": "a dataset name"}.get(param.name or "", "a name")
        raise CliError(f"{param.opts[0] if isinstance(param, click.Option) else what} must not be empty")
    return value


def _finite_timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """``--timeout``: click's range lets ``nan`` through (no comparison holds for it), which ended as "cannot reach
    NATS (no answer within nans)", and ``inf``, a traceback where a deadline is made whole seconds."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds: give a finite one, such as 30")
    return value


# kubectl's --timeout spelling (Go durations): 90s, 5m, 1h30m, 2.5m; a bare number is seconds.
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)[hms])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def duration_seconds(text: str) -> float | None:
    """Seconds ``text`` stands for (``90s``, ``5m``, ``1h30m``, ``300``), or None when it is no duration."""
    text = text.strip()
    if _DURATION.fullmatch(text):
        return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


class Duration(click.ParamType):
    """A positive duration, as kubectl's ``--timeout`` takes one; the value is seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        seconds = duration_seconds(str(value))
        if seconds is None or seconds <= 0:
            self.fail(f"{value!r} is not a duration: give one such as 90s, 5m or 1h30m (a bare number is seconds)",
                      param, ctx)
        return seconds


def wait_timeout_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--wait-timeout``, beside every ``--wait``."""
    return click.option("--wait-timeout", type=Duration(), default=None, metavar="DURATION",
                        help="With --wait: give up after this long (90s, 5m, 1h30m), saying where each one stood "
                             "(an operation whose dataset does not exist yet stays Pending); exit 1. The work goes "
                             "on.  "
                             "[default: until each ends]")


def _checked_wait_timeout(wait: bool, wait_timeout: float | None) -> None:
    if wait_timeout is not None and not wait:
        raise click.UsageError("--wait-timeout goes with --wait: shoal ... --wait --wait-timeout 5m")


def namespace_option(help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``-n/--namespace`` option of every command that works in one namespace."""
    return click.option("-n", "--namespace", default="default", show_default=True, callback=_checked_namespace,
                        help=help)


class SetupError(CliError):
    """NATS or the settings are unusable, so no command could be tried at all; exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Options:
    """The global options, handed to every command through click's context."""

    nats_urls: tuple[str, ...]
    timeout: float

    def nats_settings(self) -> NatsSettings:
        settings = _settings().nats
        if self.nats_urls:
            settings = replace(settings, urls=list(self.nats_urls))
            if errors := nats_url_errors(settings.urls, "--nats"):
                raise SetupError("; ".join(errors))
        return settings

    def event_limit(self) -> int:
        """This shell's own SHOAL_MAX_EVENT_BYTES (the services' default unless set): the largest command a service
        takes when none of its live replicas says its own (``service_event_limits``)."""
        return _settings().service.max_event_bytes


async def service_event_limits(bus: Bus) -> dict[str, int]:
    """The largest command each service takes: the smallest SHOAL_MAX_EVENT_BYTES among its live replicas' beats
    in shoal_members (``libs.members.event_limits``); none for a service whose replicas say none (not running, or
    from before the beats said it), and none at all where the bucket is not there yet."""
    try:
        return await event_limits(await bus.kv(subjects.KV_MEMBERS))
    except BucketNotFoundError:
        return {}


class _EventLimits:
    """What ``_read_manifests`` sizes each command by: the limit of the service that takes it, read from NATS once,
    when a first valid command needs it (a file of errors only needs no NATS); this shell's own where no live
    replica says one."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.known: dict[str, int] | None = None

    def of(self, kind: Kind) -> int:
        if self.known is None:
            self.known = _run(self._read())
        return self.known.get(subjects.MEMBERS_OF_KIND[kind], self.options.event_limit())

    async def _read(self) -> dict[str, int]:
        async with session(self.options) as bus:
            return await service_event_limits(bus)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as err:
        raise SetupError(str(err)) from err


def main() -> None:
    """Console-script entry point (``shoal``)."""
    # Lines the libraries log (a refused subject, a connection that did not close cleanly) go to stderr: stdout
    # carries only results, which scripts parse (-o json, events). structlog's default would print them there.
    # Errors only: a warning such as "did not close cleanly" after NATS went away would repeat the CLI's own error.
    setup_logging("error", file=sys.stderr)
    cli(prog_name="shoal")


class ShoalGroup(click.Group):
    """The ``shoal`` group: Ctrl-C ends any command with exit code 130 and no "Aborted!", wherever it lands. ``_run``
    says so for a command's NATS work; outside it (``shoal apply -f -`` reading stdin) click's own handling said
    "Aborted!" and exited 1, a rejected command's code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None


@click.group(cls=ShoalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", "nats_url", metavar="URLS", default=None,
              help="NATS server URL(s), comma-separated.  [default: $NATS_URL or nats://127.0.0.1:4222]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True,
              callback=_finite_timeout,
              help="Seconds to wait for NATS (also for it to come back, or answer, during --wait) and for each "
                   "answer from a service.")
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
        # Refusals unlogged: the command ends in one `error:` line saying it (the TimeoutError case below).
        per_server = MULTI_SERVER_CONNECT_TIMEOUT if len(settings.urls) > 1 else CONNECT_TIMEOUT
        connecting = asyncio.create_task(connect(settings, CLIENT_NAME, log_denials=False,
                                                 connect_timeout=per_server))
        failed = asyncio.create_task(handler.all_failed.wait())
        await asyncio.wait({connecting, failed}, timeout=options.timeout, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        await asyncio.gather(failed, return_exceptions=True)
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            raise _connect_error(shown, settings, handler.errors, options.timeout)
        try:
            bus = connecting.result()
        except (OSError, nats.errors.Error) as err:
            raise _connect_error(shown, settings, [*handler.errors, err], options.timeout) from err
        try:
            yield bus
        # A KV bucket is a stream too: a missing one (e.g. for --wait's watch) means the same.
        except (NoStreamResponseError, nats.errors.NoRespondersError, BucketNotFoundError) as err:
            raise SetupError(f"Shoal's streams do not exist on NATS at {shown}: is `make run` running?") from err
        except nats.errors.TimeoutError as err:
            # A JetStream API request this user may not send (a KV read, a consumer) gets no answer at all, only
            # the server's -ERR on the side: say the refusal, not a slow server.
            if bus.denials.seen:
                action, subject = bus.denials.seen[-1]
                user = login_user(settings) or "(none)"
                raise SetupError(f"{PermissionDenied(subject, action)} (NATS_USER={user})") from err
            raise SetupError(f"NATS at {shown} did not answer in time") from err
        except PermissionDenied as err:  # NATS_USER is not one that may do this (libs.natsauth: the cli user may)
            raise SetupError(f"{err} (NATS_USER={login_user(settings) or '(none)'})") from err
        except operations.ConnectionLost as err:
            raise SetupError(f"lost the connection to NATS at {shown}: {err}; the work goes on without this "
                             "command (`shoal get dataloads` or `datacleans` shows how it ends)") from err
        finally:
            await bus.close()
    finally:
        nats_log.removeHandler(handler)
        nats_log.propagate = saved_propagate


def _connect_error(shown: str, settings: NatsSettings, errors: Sequence[BaseException], timeout: float) -> SetupError:
    """Why no connection was made, with what to check.

    A refused login is looked for among every error: the server closes the connection right after its
    "Authorization Violation", so the last error nats-py reports is a broken pipe or a reset that says nothing.
    """
    if any(isinstance(err, nats.errors.AuthorizationError) or "authorization violation" in str(err).lower()
           for err in errors):
        if settings.user:
            check = f"check NATS_USER ({settings.user}) and NATS_PASSWORD"
        elif settings.token.reveal():
            check = "check NATS_TOKEN"
        elif any("@" in url for url in settings.urls):
            check = "check the user and password in the URL"
        else:
            check = "it wants a user: set NATS_USER and NATS_PASSWORD (or NATS_TOKEN)"
        return SetupError(f"NATS at {shown} refused the login (authorization violation): {check}")
    if any(isinstance(err, TlsNotOffered) for err in errors):
        return SetupError(f"NATS at {shown} offers no TLS, and NATS_TLS_CA asks for it: nothing was sent to it (does "
                          "--nats or NATS_URL name the secured server? for a server without TLS, unset NATS_TLS_CA)")
    tls = next((err for err in errors if isinstance(err, ssl.SSLError)), None)
    if tls is not None:
        return SetupError(f"no TLS connection to NATS at {shown} ({_error_text(tls)}): check NATS_TLS_CA, "
                          "NATS_TLS_CERT and NATS_TLS_KEY")
    reason = _error_text(errors[-1]) if errors else f"no answer within {timeout:g}s"
    return SetupError(f"cannot reach NATS at {shown} ({reason}): is `make run` running?")


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


async def send_commands(bus: Bus, commands: Sequence[Command], wait_seconds: float,
                        event_limit: int | None = None) -> list[Outcome]:
    """Publish every command, then wait up to ``wait_seconds`` for the fact answering each (by causationId).
    ``event_limit``: the largest command a service takes when none of its live replicas says its own
    (``Options.event_limit``; None: no check but NATS's); a command larger than its service's sends nothing."""
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

    # A server configured for smaller messages than Shoal's streams take refuses a command ``_read_manifests`` let
    # through: said before anything is published, not as nats-py's MaxPayloadError. A command too large for the
    # services (``shoal load`` with thousands of --path) would be their refusal after it was published.
    limit = min(MESSAGE_LIMIT, bus.nc.max_payload)
    limits = await service_event_limits(bus) if event_limit is not None else {}
    if large := [f"{command.resource}: {problem}" for command in commands
                 if (problem := too_large(command.event, command.source_kind, limit,
                                          limits.get(subjects.MEMBERS_OF_KIND[command.kind], event_limit)))]:
        raise CliError("; ".join(large) + "; nothing was sent")
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


def report_outcomes(outcomes: Sequence[Outcome], timeout: float, applied: str = "configured", *,
                    ignore_not_found: bool = False, namespaces: bool = False) -> bool:
    """Print one line per command in document order; True when every command was carried out.

    ``ignore_not_found``: a command refused because its object does not exist (any more) is passed over, neither
    printed nor a failure (``delete --all``: deleted by someone else since it was listed, as kubectl ignores it).
    ``namespaces``: a delete says its object's namespace (``... deleted from team namespace``, kubectl's words), for
    lines of several namespaces (``delete --all -A``), where two objects may share a name.

    An accepted apply says what the service found when it handled it (the fact's ``result``: created, configured
    or unchanged, as kubectl says), so another applier's command handled in between, or the same object applied
    twice in one go, is told as it was; a fact without one (a service older than the field) says ``applied``.
    """
    ok = True
    for outcome in outcomes:
        command, fact = outcome.command, outcome.fact
        if isinstance(fact, DatasetAccepted | RuntimeAccepted | OperationAccepted):
            if isinstance(command.event, DatasetResync):
                done = "resync requested"
            elif isinstance(command.event, DataLoadRun):
                # A request while a run is pending joins that run: say so, or the user expects two runs.
                merged = fact.merged if isinstance(fact, OperationAccepted) else ""
                done = f"run request joined the pending run ({merged})" if merged else "run requested"
            elif isinstance(command.event, DatasetApply | RuntimeApply | DataLoadApply | DataCleanApply):
                done = fact.result or applied
            else:
                done = applied
            click.echo(f"{command.resource} {done}")
        elif isinstance(fact, DatasetDeleted | RuntimeDeleted | OperationDeleted):
            click.echo(f"{command.resource} deleted" + (f" from {command.namespace} namespace" if namespaces else ""))
        elif isinstance(fact, DatasetRejected | RuntimeRejected | OperationRejected):
            if ignore_not_found and fact.not_found:
                continue
            click.echo(f"error: {_named(command)} rejected: {fact.reason}", err=True)
            ok = False
        else:
            click.echo(f"error: {_named(command)}: no answer from the {SERVICE[command.kind]} service within "
                       f"{timeout:g}s (is it running?)", err=True)
            ok = False
    return ok


def _named(command: Command) -> str:
    """How a message names the command's object: its name, or, when it has none (a manifest's ``name: ""``, which
    the service refuses), its kind and document, rather than a blank ("error:  rejected: ...")."""
    if command.name:
        return command.name
    return f"{command.source_kind} (document {command.document})" if command.document else command.source_kind


def _sources(paths: Sequence[str], recursive: bool) -> list[manifests.ManifestSource]:
    try:
        return manifests.manifest_sources(paths, recursive)
    except manifests.ManifestPathError as err:
        raise CliError(str(err)) from err


def _namespace_given() -> bool:
    """Whether the running command's ``-n`` was typed on the command line (not its default or the environment)."""
    return click.get_current_context().get_parameter_source("namespace") == click.core.ParameterSource.COMMANDLINE


def _read_manifests(sources: Sequence[manifests.ManifestSource], namespace: str,
                    action: str, enforce: bool = False, event_limit: Callable[[Kind], int] | None = None
                    ) -> tuple[list[Command], list[str], bool]:
    """Commands from every file; prints the errors of invalid documents. Returns (commands, notes, all valid).

    ``enforce`` (``-n`` given on the command line): a document naming another namespace is invalid, as in kubectl;
    otherwise ``namespace`` is only that of documents that name none. ``event_limit``: the largest command the
    service of a kind takes (``_EventLimits.of``)."""
    commands: list[Command] = []
    notes: list[str] = []
    valid = True
    for source in sources:
        try:
            documents = parse_documents(source.read())
        except UnicodeDecodeError as err:  # a binary file (found by fuzzing: it was a traceback)
            click.echo(f"error: {source.name}: not UTF-8 text: {err.reason} at byte {err.start}", err=True)
            valid = False
            continue
        except OSError as err:
            click.echo(f"error: {source.name}: cannot read it: {err.strerror or err}", err=True)
            valid = False
            continue
        except ManifestError as err:
            click.echo(f"error: {source.name}: {err}", err=True)
            valid = False
            continue
        file_commands, file_notes, errors = documents_to_commands(
            documents, default_namespace=namespace, action="delete" if action == "delete" else "apply",
            enforce_namespace=enforce,
        )
        if empty := no_objects(documents, action):
            errors = [empty]
        for command in file_commands:
            # Refused here, before publishing: a command stays in the command stream for a week.
            exposed = exposed_secret_errors(command.event.dataset) if isinstance(command.event, DatasetApply) else []
            errors += [f"{command.resource}: {reason}" for reason in exposed]
            # As kubectl refuses an object larger than the API server takes: NATS refuses the message, which was a
            # traceback after the file's earlier objects were applied; the service refuses one over its limit.
            if not exposed and (large := too_large(command.event, command.source_kind, MESSAGE_LIMIT,
                                                   event_limit(command.kind) if event_limit else None)):
                errors.append(f"document {command.document} ({command.source_kind} {command.name}): {large}")
            elif not exposed:
                commands.append(command)
        notes += file_notes
        for error in errors:
            click.echo(f"error: {source.name}: {error}", err=True)
            valid = False
    return commands, notes, valid


_FILENAME_HELP = ("Manifest file (multi-document YAML, JSON, or a kind: List), a folder (its *.yaml, *.yml and "
                  "*.json files, in name order), or - for stdin. Repeatable.")
_RECURSIVE_HELP = "Read the folders given with -f and their subfolders, all the way down."


@cli.command()
@click.option("-f", "--filename", "files", multiple=True, required=True, metavar="PATH", help=_FILENAME_HELP)
@click.option("-R", "--recursive", is_flag=True, help=_RECURSIVE_HELP)
@namespace_option(help="Namespace of documents that do not name one; given, a document naming another "
                                 "is an error.")
@click.option("--wait", is_flag=True,
              help="Follow each DataLoad and DataClean until it is Complete or Failed, with a progress bar; "
                   "exit 1 if one Failed.")
@wait_timeout_option()
@click.pass_obj
def apply(options: Options, files: tuple[str, ...], recursive: bool, namespace: str, wait: bool,
          wait_timeout: float | None) -> None:
    """Create or update datasets, runtimes, DataLoads and DataCleans from Shoal or Fluid manifests.

    Fluid runtimes (AlluxioRuntime, JuiceFSRuntime, ...) become Shoal runtimes and a Fluid DataLoad applies as
    it is; every field Shoal does not use is listed on stderr as "ignored: ...".
    """
    _checked_wait_timeout(wait, wait_timeout)
    commands, notes, valid = _read_manifests(_sources(files, recursive), namespace, "apply",
                                              _namespace_given(), _EventLimits(options).of)
    for note in notes:
        click.echo(note, err=True)
    if commands:
        ok = _run(_send(options, commands, wait=wait, wait_timeout=wait_timeout))
        valid = valid and ok
    if not valid:
        raise click.exceptions.Exit(1)


async def _send(options: Options, commands: Sequence[Command], *, wait: bool = False,
                wait_timeout: float | None = None, applied: str = "configured",
                dataset: ObjectRef | None = None) -> bool:
    """Publish the commands and report their answers; with ``wait``, then follow the accepted operations (for at
    most ``wait_timeout`` seconds when given).

    ``dataset``: the dataset the commands work on must exist first, or nothing is published (``shoal load``,
    ``shoal clean``).
    """
    async with session(options) as bus:
        if dataset is not None:
            await _require_dataset(bus, dataset, commands[0].source_kind)
        watches: dict[str, operations.OperationWatch] = {}
        try:
            if wait:  # opened before publishing: the end of a fast operation must not be missed
                for command in commands:
                    if isinstance(command.event, DataLoadApply | DataCleanApply):
                        watches[command.event.id] = await operations.open_watch(
                            bus, command.kind, command.namespace, command.name)
            outcomes = await send_commands(bus, commands, options.timeout, options.event_limit())
            ok = report_outcomes(outcomes, options.timeout, applied)
            followed = []
            for outcome in outcomes:
                event, watch = outcome.command.event, watches.get(outcome.command.event.id)
                if not isinstance(outcome.fact, OperationAccepted) or watch is None:
                    continue
                assert isinstance(event, DataLoadApply | DataCleanApply)
                note = operations.unfollowed(event, watch.before)
                if note:  # the previous run's end is not this apply's, and the next run may be hours away
                    click.echo(f"{watch.resource} {note}")
                else:
                    followed.append((watch, outcome.fact.generation))
            if followed:
                ok = operations.report(await operations.follow_connected(bus, followed, options.timeout,
                                                                         within=wait_timeout)) and ok
        finally:
            for watch in watches.values():
                await watch.close()
    return ok


async def _require_dataset(bus: Bus, dataset: ObjectRef, kind: str) -> None:
    """A CliError unless the dataset service holds a record of ``dataset``.

    The loader accepts a DataLoad or DataClean of any dataset (a manifest may create the dataset after it, or
    another system publish it) and only its run fails; a person typing ``shoal load dataset NAME`` means a dataset
    that exists now, so a typo is said before an operation (``kind``) that can only fail is created. A missing
    bucket is Shoal's streams missing (the session says so), as for every other KV read.
    """
    kv = await bus.kv(subjects.KV_DATASETS)
    if await _load_one(kv, "dataset", dataset.namespace, dataset.name, DatasetRecord) is None:
        raise CliError(f"dataset {dataset.namespace}/{dataset.name} not found; no {kind} was created")


@cli.command()
@click.argument("resource", required=False, type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False, callback=_checked_name)
@namespace_option()
@click.option("-f", "--filename", "files", multiple=True, metavar="PATH",
              help="Delete what these manifests describe: " + _FILENAME_HELP[0].lower() + _FILENAME_HELP[1:])
@click.option("-R", "--recursive", is_flag=True, help=_RECURSIVE_HELP)
@click.option("--all", "every", is_flag=True, help="Delete every object of RESOURCE in the namespace.")
@click.option("-A", "--all-namespaces", is_flag=True,
              help="With --all: in every namespace (-n is then ignored, as kubectl ignores it).")
@click.pass_obj
def delete(options: Options, resource: str | None, name: str | None, namespace: str,
           files: tuple[str, ...], recursive: bool, every: bool, all_namespaces: bool) -> None:
    """Delete a dataset, runtime, DataLoad or DataClean: `shoal delete dataset NAME`, `shoal delete -f FILE`, or
    every one of a kind: `shoal delete datasets --all [-n NS | -A]`.

    Deleting a DataLoad or DataClean cancels its work; blocks already cached stay.
    """
    if files and (resource or name):
        raise click.UsageError("give either -f FILE or RESOURCE NAME, not both")
    # As kubectl: --all names the objects itself, and -A widens only what --all names (a NAME is in one namespace).
    if every and (name or files):
        raise click.UsageError("--all deletes every object of RESOURCE: give either NAME, -f FILE or --all")
    if all_namespaces and not every:
        raise click.UsageError("-A/--all-namespaces goes with --all: shoal delete RESOURCE --all -A")
    if every:
        if not resource:
            raise click.UsageError("name the kind to delete every object of: RESOURCE --all (e.g. datasets --all)")
        kind = RESOURCE_ALIASES[resource.lower()]
        if not _run(_delete_every(options, kind, None if all_namespaces else namespace)):
            raise click.exceptions.Exit(1)
        return
    if files:
        commands, _, valid = _read_manifests(_sources(files, recursive), namespace, "delete",
                                                _namespace_given())
    elif resource and name:
        kind = RESOURCE_ALIASES[resource.lower()]
        commands, valid = [_delete_command(kind, namespace, name)], True
    else:
        raise click.UsageError("name what to delete: RESOURCE NAME (e.g. dataset demo), RESOURCE --all or -f FILE")
    if commands:
        valid = _run(_send(options, commands)) and valid
    if not valid:
        raise click.exceptions.Exit(1)


def _delete_command(kind: Kind, namespace: str, name: str) -> Command:
    """The command deleting one object of ``kind``."""
    event: DatasetDelete | RuntimeDelete | DataLoadDelete | DataCleanDelete
    if kind == "dataset":
        event, subject = DatasetDelete(name=name, namespace=namespace), subjects.DATASET_DELETE
    elif kind == "runtime":
        event, subject = RuntimeDelete(name=name, namespace=namespace), subjects.RUNTIME_DELETE
    elif kind == "dataload":
        event, subject = DataLoadDelete(name=name, namespace=namespace), subjects.DATALOAD_DELETE
    else:
        event, subject = DataCleanDelete(name=name, namespace=namespace), subjects.DATACLEAN_DELETE
    return Command(0, kind, kind, name, namespace, subject, event)


async def _delete_every(options: Options, kind: Kind, namespace: str | None) -> bool:
    """``delete RESOURCE --all``: a delete command for every object of ``kind`` the KV holds in ``namespace`` (None:
    in every one), in namespace and name order, each reported as one line (naming its namespace when ``namespace``
    is None); True when every one was deleted.

    Only the keys are read: a record that does not decode (another version's) is deleted all the same, as kubectl
    deletes what it lists. Nothing to delete is not an error, as in kubectl, nor is an object deleted by someone
    else between the listing and its delete (the service answers that it does not exist): kubectl's ``--all``
    ignores not-found.
    """
    operation = kind if kind in OPERATION_KINDS else None
    async with session(options) as bus:
        try:
            kv = await bus.kv(KV_BUCKET[kind])
        except BucketNotFoundError:
            keys = []  # nothing was ever applied: the services create the buckets on start
        else:
            keys = await kv_keys(kv)
        found = sorted(found for key in keys if (found := subjects.key_object(key, operation)) is not None
                       and (namespace is None or found[0] == namespace))
        if not found:
            click.echo("No resources found" + ("" if namespace is None else f" in {namespace} namespace") + ".",
                       err=True)
            return True
        commands = [_delete_command(kind, found_namespace, name) for found_namespace, name in found]
        outcomes = await send_commands(bus, commands, options.timeout)
    return report_outcomes(outcomes, options.timeout, ignore_not_found=True, namespaces=namespace is None)


@cli.command()
@click.argument("resource", type=click.Choice(KIND_NAMES["dataset"], case_sensitive=False))
@click.argument("name", callback=_checked_name)
@namespace_option()
@click.pass_obj
def resync(options: Options, resource: str, name: str, namespace: str) -> None:
    """List a dataset's mounts again (new or overwritten objects); mounts pick up the new manifest."""
    event = DatasetResync(name=name, namespace=namespace)
    command = Command(0, "dataset", "dataset", name, namespace, subjects.DATASET_RESYNC, event)
    if not _run(_send(options, [command])):
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("resource", type=click.Choice(KIND_NAMES["runtime"], case_sensitive=False))
@click.argument("name", callback=_checked_name)
@click.option("--replicas", type=int, required=True, help="How many cache workers the runtime should have.")
@namespace_option()
@click.pass_obj
def scale(options: Options, resource: str, name: str, replicas: int, namespace: str) -> None:
    """Set a runtime's number of cache workers: `shoal scale runtime NAME --replicas N`.

    Only the replicas change, on the runtime as the service holds it (a spec applied meanwhile is kept); the
    runtime service keeps the workers it has (growing) or drops the most recently picked ones (shrinking).
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
        # Read for the not-found message and the autoscaling note only: the command names the runtime, and the
        # service changes the replicas of the spec it holds then, not of this copy.
        record = await _load_one(kv, "runtime", namespace, name, RuntimeRecord)
        if record is None:
            _not_found("runtime", name, namespace)
        event = RuntimeScale(name=name, namespace=namespace, replicas=replicas)
        command = Command(0, "runtime", "runtime", name, namespace, subjects.RUNTIME_SCALE, event)
        outcomes = await send_commands(bus, [command], options.timeout)
    [outcome] = outcomes
    if isinstance(outcome.fact, RuntimeAccepted):
        click.echo(f"{command.resource} scaled to {replicas} replica{'' if replicas == 1 else 's'}")
        if (policy := record.runtime.spec.autoscaling) is not None:
            click.echo(f"note: {command.resource} has autoscaling ({policy.min_replicas}..{policy.max_replicas} "
                       f"workers): {_autoscaler_next(policy, replicas)}", err=True)
        return True
    return report_outcomes(outcomes, options.timeout)


def _autoscaler_next(policy: AutoscalingPolicy, replicas: int) -> str:
    """What the autoscaler does with ``replicas`` set by hand: outside its bounds it sets them back at its next look
    (a second later), so "scaled to 5" alone read as done while the runtime stayed at its maxReplicas."""
    for bound, word, off in ((policy.max_replicas, "above maxReplicas", replicas > policy.max_replicas),
                             (policy.min_replicas, "below minReplicas", replicas < policy.min_replicas)):
        if off:
            return (f"{replicas} is {word} {bound}, so its autoscaler sets it back to {bound} at once (change "
                    "spec.autoscaling to go beyond)")
    return (f"its autoscaler goes on changing replicas from here, the first step no sooner than "
            f"{policy.cool_down_seconds} s (coolDownSeconds) from now")


# --- DataLoad and DataClean shortcuts ---


def generated_name(dataset: str, what: str) -> str:
    """``<dataset>-<what>-<5 random characters>`` (like Kubernetes' generateName), at most a DNS label long."""
    suffix = "".join(secrets.choice(_NAME_SUFFIX_ALPHABET) for _ in range(_NAME_SUFFIX_LENGTH))
    tail = f"-{what}-{suffix}"
    return dataset[:_MAX_NAME - len(tail)].rstrip("-") + tail


def _checked_paths(paths: Sequence[str]) -> None:
    """A path the loader would refuse is refused here, before anything is sent, with the loader's words."""
    for path in paths:
        if (problem := target_path_problem(path)) is not None:
            raise CliError(f"--path {path!r} {problem}")


def _targets(paths: Sequence[str], replicas: int) -> list[TargetPath]:
    """One target per path; no path means the whole dataset ('/' when a replica count has to be said)."""
    _checked_paths(paths)
    if not paths:
        return [TargetPath(path="/", replicas=replicas)] if replicas != 1 else []
    return [TargetPath(path=path, replicas=replicas) for path in paths]


_DATASET_CHOICE = click.Choice(KIND_NAMES["dataset"], case_sensitive=False)
_WAIT_HELP = "Follow it until it is Complete or Failed, with a progress bar; exit 1 if it Failed."


@cli.command()
@click.argument("resource", type=_DATASET_CHOICE)
@click.argument("dataset", callback=_checked_name)
@click.option("--path", "paths", multiple=True, metavar="P",
              help="A file or folder to load, as seen through the mount (/<mount name>/...). Repeatable; "
                   "none: the whole dataset.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many cache workers hold each block.")
@click.option("--load-metadata", is_flag=True, help="List the dataset's store again before loading.")
@click.option("--name", default=None, callback=_checked_name,
              help="The DataLoad's name.  [default: <dataset>-load-<random>]")
@namespace_option()
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
@wait_timeout_option()
@click.pass_obj
def load(options: Options, resource: str, dataset: str, paths: tuple[str, ...], replicas: int,
         load_metadata: bool, name: str | None, namespace: str, wait: bool, wait_timeout: float | None) -> None:
    """Warm a dataset's cache now: creates a Once DataLoad and prints its name.

    `shoal load dataset demo --path /train/images --wait` loads the folder images/ of the dataset's mount named
    "train", shows its progress and exits 1 if the load fails.
    """
    _checked_wait_timeout(wait, wait_timeout)
    name = name or generated_name(dataset, "load")
    spec = DataLoadSpec(dataset=DatasetRef(name=dataset, namespace=namespace), load_metadata=load_metadata,
                        target=_targets(paths, replicas))
    event = DataLoadApply(data_load=DataLoad(metadata=ObjectMeta(name=name, namespace=namespace), spec=spec))
    command = Command(0, "DataLoad", "dataload", name, namespace, subjects.DATALOAD_APPLY, event)
    target = ObjectRef(name=dataset, namespace=namespace)
    if not _run(_send(options, [command], wait=wait, wait_timeout=wait_timeout, applied="created",
                      dataset=target)):
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("resource", type=_DATASET_CHOICE)
@click.argument("dataset", callback=_checked_name)
@click.option("--path", "paths", multiple=True, metavar="P",
              help="A file or folder to evict, as seen through the mount. Repeatable; none: the whole dataset.")
@click.option("--name", default=None, callback=_checked_name,
              help="The DataClean's name.  [default: <dataset>-clean-<random>]")
@namespace_option()
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
@wait_timeout_option()
@click.pass_obj
def clean(options: Options, resource: str, dataset: str, paths: tuple[str, ...], name: str | None,
          namespace: str, wait: bool, wait_timeout: float | None) -> None:
    """Evict a dataset's cached blocks (or those under --path) from every node: creates a DataClean."""
    _checked_wait_timeout(wait, wait_timeout)
    name = name or generated_name(dataset, "clean")
    _checked_paths(paths)
    spec = DataCleanSpec(dataset=DatasetRef(name=dataset, namespace=namespace),
                         target=[CleanTarget(path=path) for path in paths])
    event = DataCleanApply(data_clean=DataClean(metadata=ObjectMeta(name=name, namespace=namespace), spec=spec))
    command = Command(0, "DataClean", "dataclean", name, namespace, subjects.DATACLEAN_APPLY, event)
    target = ObjectRef(name=dataset, namespace=namespace)
    if not _run(_send(options, [command], wait=wait, wait_timeout=wait_timeout, applied="created",
                      dataset=target)):
        raise click.exceptions.Exit(1)


@cli.command(name="run")
@click.argument("resource", type=click.Choice(KIND_NAMES["dataload"], case_sensitive=False))
@click.argument("name", callback=_checked_name)
@namespace_option()
@click.pass_obj
def run_operation(options: Options, resource: str, name: str, namespace: str) -> None:
    """Run a Cron or OnEvent DataLoad now (publishes dataload.run.v1, as other systems may)."""
    event = DataLoadRun(name=name, namespace=namespace)
    command = Command(0, "DataLoad", "dataload", name, namespace, subjects.DATALOAD_RUN, event)
    if not _run(_send(options, [command])):
        raise click.exceptions.Exit(1)


# --- get and describe ---


@dataclass(frozen=True)
class Loaded:
    """What ``load_records`` found: the records, and why each record in scope that could not be decoded was not."""

    records: list[Any]
    unreadable: list[str]


async def load_records(options: Options, kind: Kind, namespace: str | None, name: str | None) -> Loaded:
    """Records of one kind, sorted by namespace and name; ``namespace`` None means every namespace.

    A record that does not decode (written by hand, or by another version) is said in ``unreadable`` and the others
    are still listed, as kubectl lists what it could get.
    """
    bucket = KV_BUCKET[kind]
    operation = kind if kind in OPERATION_KINDS else None
    async with session(options) as bus:
        try:
            kv = await bus.kv(bucket)
        except BucketNotFoundError:
            return Loaded([], [])  # nothing was ever applied: the services create the buckets on start
        if name is not None and namespace is not None:
            wanted = [(subjects.operation_key(kind, namespace, name) if operation
                       else subjects.resource_key(namespace, name), (namespace, name))]
        else:
            wanted = [(key, found) for key in await kv_keys(kv)
                      if (found := subjects.key_object(key, operation)) is not None
                      and (namespace is None or found[0] == namespace)]
        records: list[Any] = []
        unreadable = []
        for key, (key_namespace, key_name) in wanted:
            try:
                record = await _load_named(kv, key, RECORD_TYPE[kind])
            except (msgspec.DecodeError, UnicodeDecodeError) as err:
                unreadable.append(_cannot_read(kind, key_namespace, key_name, key, bucket, err))
                continue
            if record is not None:
                records.append(record)
    if operation:  # one bucket holds both kinds
        records = [record for record in records if record.kind.lower() == kind]
    records = [record for record in records if namespace is None or _meta(record).namespace == namespace]
    return Loaded(sorted(records, key=lambda record: (_meta(record).namespace, _meta(record).name)), unreadable)


def _cannot_read(kind: Kind, namespace: str, name: str, key: str, bucket: str, err: Exception) -> str:
    return f'cannot read {resource_type(kind)} "{name}" in namespace "{namespace}" (key {key} of KV {bucket}): {err}'


async def _load_one(kv: KeyValue, kind: Kind, namespace: str, name: str, record_type: type[T]) -> T | None:
    """One resource's record (None: there is none), for a command that acts on it: one that does not decode is
    a CliError saying so, not a traceback."""
    key = subjects.resource_key(namespace, name)
    try:
        return await _load_named(kv, key, record_type)
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise CliError(_cannot_read(kind, namespace, name, key, KV_BUCKET[kind], err)) from None


async def _load_named(kv: KeyValue, key: str, record_type: type[T]) -> T | None:
    """The record under ``key``; None when there is none, or when the name or namespace cannot be a key at all
    (``shoal get ds 'a b'``, ``'train*'``): no object has such a name, so it is "not found", not a traceback."""
    try:
        record, _ = await kv_load(kv, key, record_type)
    except Permanent:
        return None
    return record


def _meta(record: DatasetRecord | RuntimeRecord | OperationRecord) -> Any:
    if isinstance(record, DatasetRecord):
        return record.dataset.metadata
    if isinstance(record, RuntimeRecord):
        return record.runtime.metadata
    return record.metadata


def _unreadable(errors: Sequence[str]) -> None:
    """After what could be printed: one ``error:`` line per record that could not be read, and exit code 1."""
    if errors:
        for error in errors:
            click.echo(f"error: {error}", err=True)
        raise click.exceptions.Exit(1)


def _not_found(kind: Kind, name: str, namespace: str) -> NoReturn:
    raise CliError(f'{resource_type(kind)} "{name}" not found in namespace "{namespace}"')


_ALL_NAMESPACES_HELP = "Every namespace's (-n is then ignored, as kubectl ignores it)."
_BY_NAME_ACROSS = "a resource cannot be retrieved by name across all namespaces"


@cli.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False, callback=_checked_name)
@namespace_option()
@click.option("-A", "--all-namespaces", is_flag=True, help=_ALL_NAMESPACES_HELP)
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml", "name", "record"]), default=None,
              help="wide: more columns; json/yaml: Kubernetes objects (several: a kind: List) that `shoal apply -f` "
                   "takes back; name: kind.shoal.io/NAME lines, as kubectl's; record: the services' KV records "
                   "whole, as JSON.")
@click.pass_obj
def get(options: Options, resource: str, name: str | None, namespace: str, all_namespaces: bool,
        output: str | None) -> None:
    """List datasets, runtimes, DataLoads or DataCleans (`shoal get datasets`, `shoal get dataloads -o wide`)."""
    if all_namespaces and name:
        raise click.UsageError(_BY_NAME_ACROSS)
    kind = RESOURCE_ALIASES[resource.lower()]
    loaded = _run(load_records(options, kind, None if all_namespaces else namespace, name))
    records = loaded.records
    if not records:
        if loaded.unreadable:
            _unreadable(loaded.unreadable)
        if name:
            _not_found(kind, name, namespace)
        if output in ("json", "yaml", "record"):  # an empty list, so scripts parse the same shape either way
            empty = render.records_document([], single=False) if output == "record" else render.objects_document(
                [], single=False)
            click.echo(render.to_yaml(empty) if output == "yaml" else render.to_json(empty), nl=False)
        else:
            click.echo("No resources found" + ("" if all_namespaces else f" in {namespace} namespace") + ".",
                       err=True)
        return
    if output == "name":
        click.echo("".join(f"{resource_type(kind)}/{_meta(record).name}\n" for record in records), nl=False)
    elif output == "json":
        click.echo(render.to_json(render.objects_document(records, single=name is not None)), nl=False)
    elif output == "yaml":
        click.echo(render.to_yaml(render.objects_document(records, single=name is not None)), nl=False)
    elif output == "record":
        click.echo(render.to_json(render.records_document(records, single=name is not None)), nl=False)
    elif kind == "dataset":
        click.echo(render.dataset_table(records, wide=output == "wide", show_namespace=all_namespaces), nl=False)
    elif kind in OPERATION_KINDS:
        click.echo(render.operation_table(records, now=datetime.now(UTC), wide=output == "wide",
                                          show_namespace=all_namespaces), nl=False)
    else:
        click.echo(render.runtime_table(records, wide=output == "wide", show_namespace=all_namespaces), nl=False)
    _unreadable(loaded.unreadable)


@cli.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCE_ALIASES), case_sensitive=False))
@click.argument("name", required=False, callback=_checked_name)
@namespace_option()
@click.option("-A", "--all-namespaces", is_flag=True, help=_ALL_NAMESPACES_HELP)
@click.pass_obj
def describe(options: Options, resource: str, name: str | None, namespace: str, all_namespaces: bool) -> None:
    """Show every spec and status field of a dataset, runtime, DataLoad or DataClean (all of the namespace
    without NAME, of every namespace with -A); a DataLoad's or DataClean's progress per node too."""
    if all_namespaces and name:
        raise click.UsageError(_BY_NAME_ACROSS)
    kind = RESOURCE_ALIASES[resource.lower()]
    loaded = _run(load_records(options, kind, None if all_namespaces else namespace, name))
    records = loaded.records
    if not records:
        _unreadable(loaded.unreadable)
        if name:
            _not_found(kind, name, namespace)
        click.echo("No resources found" + ("" if all_namespaces else f" in {namespace} namespace") + ".", err=True)
        return
    texts = [render.describe_dataset(r) if isinstance(r, DatasetRecord)
             else render.describe_operation(r) if isinstance(r, OperationRecord)
             else render.describe_runtime(r) for r in records]
    click.echo("\n".join(texts), nl=False)
    _unreadable(loaded.unreadable)


# --- events ---


@cli.command()
@click.option("--subject", default=subjects.ALL_FACTS, show_default=True, help="Subject (wildcards allowed).")
@click.option("--all", "replay", is_flag=True, help="Replay what the stream still holds, then follow.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.pass_obj
def events(options: Options, subject: str, replay: bool, limit: int | None) -> None:
    """Print events as JSON lines as they happen, until Ctrl-C."""
    problem = subject_problem(subject)
    if problem:
        raise CliError(f"--subject {subject!r} is not a NATS subject: {problem}")
    _run(_tail(options, subject, replay, limit))


def subject_problem(subject: str) -> str:
    """Why ``subject`` cannot be subscribed to ("" when it can), as NATS's rules say: nats-py would raise a bare
    BadSubjectError for most (a traceback), and a stream lookup for ``--all`` would take "" as any stream."""
    if not subject:
        return "it is empty"
    if any(char.isspace() for char in subject):
        return "it holds whitespace"
    tokens = subject.split(".")
    if "" in tokens:
        return "it has an empty token (a '.' at either end, or two in a row)"
    if ">" in tokens[:-1]:
        return "'>' can only be its last token"
    if any(token not in ("*", ">") and ("*" in token or ">" in token) for token in tokens):
        return "'*' and '>' are wildcards only as a whole token"
    return ""


async def _tail(options: Options, subject: str, replay: bool, limit: int | None) -> None:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        await queue.put(message)

    subscription: Subscription
    denied: asyncio.Future[str] | None = None
    async with session(options) as bus:
        if replay:
            try:
                subscription = await bus.js.subscribe(subject, cb=on_message, ordered_consumer=True,
                                                      deliver_policy=js_api.DeliverPolicy.ALL)
            except NotFoundError as err:
                raise CliError(f"no stream holds {subject!r}, so there is nothing to replay") from err
        else:
            # A refused subscription is only an -ERR on the side: without this the command would wait forever. It
            # comes before the flush's PONG, and is watched for as long as the command follows anyway.
            denied = bus.denials.watch(subject)
            subscription = await bus.nc.subscribe(subject, cb=on_message)
            await bus.nc.flush(timeout=max(1, int(options.timeout)))
        try:
            printed = 0
            while limit is None or printed < limit:
                message = await _next_or_refused(queue, denied, subject)
                try:
                    line = render.json_line(message.data)
                except render.NotJson as err:
                    # Not an event (another system's on a fact subject): stdout stays JSON lines for scripts.
                    click.echo(f"note: skipped a message on {message.subject} that is not JSON ({err}, "
                               f"{len(message.data)} bytes)", err=True)
                    continue
                click.echo(line)
                printed += 1
        finally:
            if denied is not None:
                bus.denials.forget(subject, denied)
            await subscription.unsubscribe()


async def _next_or_refused(queue: asyncio.Queue[Msg], denied: asyncio.Future[str] | None, subject: str) -> Msg:
    """The next message, or PermissionDenied as soon as the server refuses the subscription."""
    if denied is None:
        return await queue.get()
    if not denied.done():
        getter = asyncio.ensure_future(queue.get())
        waits: list[asyncio.Future[Any]] = [getter, denied]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
    if denied.cancelled():
        return await queue.get()
    raise PermissionDenied(subject, "subscribe")


# --- schemas ---


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_SCHEMAS_DIR)
def schemas(directory: Path) -> None:
    """Write the JSON Schema of every public event type into DIRECTORY (one file per type tag + index.json)."""
    try:
        written = export_schemas(directory)
    except OSError as err:  # a folder that cannot be made or written (read-only, under a file, /proc)
        raise CliError(f"cannot write the schemas to {err.filename or directory}: {err.strerror or err}") from err
    click.echo(f"wrote {len(written)} files to {directory}")


if __name__ == "__main__":
    main()
