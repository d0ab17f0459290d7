"""The scheduler's Kubernetes-facing HTTP server (aiohttp, HTTPS in a cluster): the mutating admission webhook
``/mutate`` (AdmissionReview v1), the kube-scheduler extender ``/filter`` and ``/prioritize``, and ``/healthz``.

It owns the I/O only: the translations are pure (``admission.py``, ``extender.py``) and every answer comes from
``answer`` (the scheduler's ``domain.score`` over the fold, the same function as the NATS API).

Bounded time, never blocking a pod: an answer later than ``timeout`` seconds (keep it below the webhook
configuration's ``timeoutSeconds`` and the extender's ``httpTimeout``) is not used, and neither is an answer that
raises: ``/mutate`` then allows the pod unchanged, ``/filter`` answers ``Error`` (the configuration's
``ignorable: true`` lets the pod schedule without the extender) and ``/prioritize`` scores every node 0. A
request that is not of the documented shape gets HTTP 400 with the reason. Each outcome is counted, per route,
in ``counts`` and in the Prometheus counter ``libs.metrics.DECISIONS``; each request counts once, and its time is
in ``libs.metrics.DECISION_SECONDS``.

Where ``answer`` runs: on the event loop's thread by default, because the scheduler's fold is read without
copies and is a consistent snapshot only there (``services/scheduler/fold.py``: updates run on the same loop).
It takes well under a millisecond; a late one is discarded after the fact (the API server's own timeout and
``failurePolicy: Ignore`` cover a loop that is blocked meanwhile). ``threaded=True`` runs it on one worker thread
instead and stops waiting at ``timeout`` sharp, for an ``answer`` that is safe to call off the loop's thread;
one thread, not one per request, so a hung ``answer`` holds one thread and the calls queued behind it are
dropped when their time is up.

Bounded memory and connections, whoever calls: a body longer than its route's limit (``HttpLimits``: the webhook's
is sized by the API server's own limit on a pod, the extender's by what kube-scheduler sends for thousands of
nodes) gets HTTP 413 with the reason, before more than the limit is read; beyond ``reading`` requests being read
and answered at once, a request gets 503 with the reason (each holds its body, and what is read of it: decoding
skips the rest, ``kube``); beyond ``connections`` open at once, a new connection gets 503 and is closed
(``libs.listener``). Each is counted.
The webhook configuration's ``failurePolicy: Ignore`` admits the pod unchanged on those answers, and the extender's
``ignorable: true`` schedules it without the extender.

Datasets a pod names through a PVC may not be datasets at all (any PVC is listed): when the scheduler answers
"unknown dataset", the ones it does not know and the pod does not require are dropped and it is asked again, so
an ordinary PVC next to a dataset's does not cancel the preference, and a pod with ordinary PVCs only is ranked by
``/prioritize`` as a pod without datasets. An unknown dataset the pod requires is an error that stands: the
webhook writes nothing and its warning says so, and the extender's ``/filter`` leaves every node out naming the
dataset (``extender.missing_required``), so the pod stays Pending until the dataset exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from libs import metrics
from libs.config import SchedulerSettings
from libs.events.common import DECODE_ERRORS
from libs.events.schedule import Candidate, DatasetUse, ScoreReply, ScoreRequest
from libs.listener import CappedListener, app_runner
from libs.telemetry import get_logger

from .admission import BadReview, affinity_patch, datasets_of, parse_review, placement, review_response
from .extender import BadArgs, error_body, filter_result, missing_required, parse_args, priorities

log = get_logger(__name__)

Answer = Callable[[ScoreRequest], ScoreReply]
Labels = Callable[[str], Mapping[str, str]]

MUTATE, FILTER, PRIORITIZE = "mutate", "filter", "prioritize"
# Outcomes counted per route.
PATCHED = "patched"  # /mutate: affinity added
UNCHANGED = "unchanged"  # answered, nothing to add (no dataset, no cache node, the pod places itself...)
ANSWERED = "answered"  # /filter, /prioritize: answered from the scheduler
MALFORMED = "malformed"  # HTTP 400
TIMEOUT = "timeout"  # answer too slow: allowed unchanged / Error / zeros
FAILED = "failed"  # answer raised: allowed unchanged / Error / zeros
UNANSWERED = "unanswered"  # the reply carried an error (an unknown dataset: often an ordinary PVC, not a dataset)
INTERNAL = "internal"  # a bug here: HTTP 500 (the webhook's failurePolicy Ignore still admits the pod)
TOO_LARGE = "too_large"  # the body is over the route's limit: HTTP 413
BUSY = "busy"  # too many requests being read and answered at once: HTTP 503
SLOW_BODY = "slow_body"  # the body did not arrive within HttpLimits.body_seconds: HTTP 408, connection closed
GONE = "gone"  # the caller closed the connection before its body was all in: nobody to answer
# The Prometheus way label of each route (libs.metrics.DECISIONS).
_WAY = {MUTATE: metrics.WAY_WEBHOOK, FILTER: metrics.WAY_FILTER, PRIORITIZE: metrics.WAY_PRIORITIZE}
# Pieces a body is read in: its limit is checked as it grows, whatever the Content-Length said.
BODY_PIECE_BYTES = 256 * 1024
# The API server and kube-scheduler send a body with its headers and stop waiting for the answer after 3 s
# (deploy/scheduler/): a body not all in after 10 s (the API server's default webhook timeout, for a configuration
# with a longer one) comes from a caller that no longer waits for the answer, or never meant to send it. Without a
# bound, a request holds its place among the ``reading`` ones for as long as its body trickles or stalls: eight
# stalled requests refused every webhook and extender call for as long as their connections stayed open.
BODY_SECONDS = 10.0


_DEFAULTS = SchedulerSettings()


@dataclass(frozen=True)
class HttpLimits:
    """What callers can make the server hold: the ``SHOAL_SCHED_*_MAX_*`` settings (their defaults, and why those,
    in ``libs.config.SchedulerSettings``)."""

    webhook_bytes: int = _DEFAULTS.webhook_max_bytes
    extender_bytes: int = _DEFAULTS.extender_max_bytes
    reading: int = _DEFAULTS.http_max_reading
    connections: int = _DEFAULTS.http_max_connections
    body_seconds: float = BODY_SECONDS

    @classmethod
    def of(cls, settings: SchedulerSettings) -> HttpLimits:
        return cls(settings.webhook_max_bytes, settings.extender_max_bytes, settings.http_max_reading,
                   settings.http_max_connections)

    def body_bytes(self, route: str) -> int:
        return self.webhook_bytes if route == MUTATE else self.extender_bytes


class BodyTooLarge(Exception):
    """A request body over its route's limit (HTTP 413)."""


class BodyTooSlow(Exception):
    """A request body not all in within ``HttpLimits.body_seconds`` (HTTP 408)."""


class BodyLost(Exception):
    """The caller closed the connection before its body was all in."""


# How often the certificate files are read again for a renewal: the kubelet updates a mounted Secret within
# about a minute of cert-manager rewriting it, so a renewal is served a minute or two later.
TLS_RELOAD_SECONDS = 60.0


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context for ``start``: the API server calls webhooks over HTTPS only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class RenewedTls:
    """The server's TLS: the certificate and key files as they are now, read again by ``reload`` when they change.

    A renewal (cert-manager rewrites the Secret; with a self-signed certificate the webhook configuration's
    caBundle changes at once) must be served without a restart, or the API server stops trusting the webhook
    and every pod goes unplaced. The listening ``context`` hands each handshake to the newest context that loaded
    (its SNI callback, called for every handshake), so a pair is swapped whole; files that do not load (a renewal
    half written) leave the last good pair in place."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._files = self._read()
        self._current = server_tls(cert_file, key_file)
        # The listening context is the first pair's; each handshake is then handed to the newest (``_choose``).
        self.context = self._current
        self.context.sni_callback = self._choose

    def _read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.cert_file, "rb") as cert, open(self.key_file, "rb") as key:
                return cert.read(), key.read()
        except OSError:
            return None

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    def reload(self) -> bool:
        """Load the files again if they changed; whether the served certificate changed. Blocking (file reads):
        call it in a thread; handshakes meanwhile get the previous pair."""
        files = self._read()
        if files is None or files == self._files:
            return False
        try:
            renewed = server_tls(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as err:
            log.warning("renewed TLS certificate not loaded, still serving the previous one", cert=self.cert_file,
                        error=f"{type(err).__name__}: {err}")
            self._files = files  # said once per change of the files
            return False
        self._files, self._current = files, renewed
        log.info("TLS certificate reloaded", cert=self.cert_file)
        return True


# ``ScoreRequest.limit`` for a reply that lists every node.
EVERY_NODE = 0
# Datasets of one pod (its PVCs and dataset labels) asked about one by one, when the scheduler cannot answer for all
# of them, to drop those it does not know. Each question is a decision on the event loop's thread: a pod naming
# 50,000 claims (the webhook's 8 MiB body holds over 100,000, the extender's four times that) held the loop for over
# a second per request, folding and every other answer waiting behind it, and the API server calls the webhook for
# every such pod created. A pod rarely has more than a few dozen volumes; beyond this many, the first answer's error
# stands (for the real scheduler, "too many datasets": a question holds at most ``domain.MAX_DATASETS``).
MAX_PROBED = 256


def ask_known(answer: Answer, datasets: list[DatasetUse], candidates: list[Candidate], *,
              none_known: bool = False) -> ScoreReply:
    """Ask ``answer`` for every node's score (``limit=0``: the extender scores each candidate, the webhook requires
    every node kept); when it cannot answer, ask again without the datasets it does not know, unless the pod
    requires them (then the error stands). When it knows none of them (ordinary PVCs only), the error stands too,
    unless ``none_known``: then the pod is asked about as one without datasets (the extender's ranking steers it
    away from the cache nodes, as any pod that reads no dataset; the webhook writes nothing for such pods). A pod
    naming more than ``MAX_PROBED`` datasets is not asked about one by one: the first error stands."""
    reply = answer(ScoreRequest(datasets=datasets, candidates=candidates, limit=EVERY_NODE))
    if not reply.error or not datasets or len(datasets) > MAX_PROBED:
        return reply
    known = [use for use in datasets if use.required] if len(datasets) == 1 else [
        use for use in datasets
        if use.required or not answer(ScoreRequest(datasets=[use], candidates=candidates, limit=EVERY_NODE)).error]
    if not known:
        return answer(ScoreRequest(candidates=candidates, limit=EVERY_NODE)) if none_known else reply
    if len(known) == len(datasets):
        return reply
    return answer(ScoreRequest(datasets=known, candidates=candidates, limit=EVERY_NODE))


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json",
                        headers=headers)


def _error(route: str, reason: str) -> dict[str, str]:
    """An error body in the route's shape: the webhook's ``error``, the extender's ``Error``."""
    return {"error": reason} if route == MUTATE else error_body(reason)


class SchedulerHttp:
    """The webhook and extender routes, answered by ``answer`` within ``timeout`` seconds."""

    def __init__(self, answer: Answer, *, timeout: float, threaded: bool = False,
                 limits: HttpLimits = HttpLimits(), labels: Labels = lambda node: {}) -> None:
        self._answer = answer
        # The labels a node's agent reports (the webhook sees no Node objects): a pod's own node selector is
        # judged against them for its warnings.
        self._labels = labels
        self.timeout = timeout
        self.threaded = threaded
        self.limits = limits
        self.counts: Counter[str] = Counter()
        self.port = 0
        # Requests of the POST routes being read and answered now (at most ``limits.reading``).
        self.reading = 0
        self.listener: CappedListener | None = None
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None

    def app(self) -> web.Application:
        # Bodies are read by ``_body`` against their route's limit; aiohttp's own check is a backstop.
        app = web.Application(client_max_size=max(self.limits.webhook_bytes, self.limits.extender_bytes) + 1,
                              middlewares=[self._guard])
        app.router.add_post("/mutate", self._mutate)
        app.router.add_post("/filter", self._filter)
        app.router.add_post("/prioritize", self._prioritize)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve on ``host:port`` (0: a free port), over TLS when ``ssl_context`` is given; return the port."""
        # No access log: the API server calls the webhook for every pod created; outcomes are counted instead.
        self._runner = app_runner(self.app())
        await self._runner.setup()
        self.listener = CappedListener(self._runner, self.limits.connections, "scheduler webhook and extender")
        self.port = await self.listener.start(host, port, ssl_context)
        log.info("scheduler http started", host=host, port=self.port, tls=ssl_context is not None,
                 routes=["/mutate", "/filter", "/prioritize", "/healthz"], webhook_max_bytes=self.limits.webhook_bytes,
                 extender_max_bytes=self.limits.extender_bytes, max_reading=self.limits.reading,
                 max_connections=self.limits.connections)
        return self.port

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.listener.open if self.listener is not None else 0

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._executor is not None:
            # A hung answer keeps its thread; nothing waits for it, and queued calls are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _count(self, route: str, outcome: str) -> None:
        self.counts[f"{route}.{outcome}"] += 1
        metrics.DECISIONS.labels(_WAY[route], outcome).inc()

    async def _ask(self, route: str, datasets: list[DatasetUse], candidates: list[Candidate], *,
                   none_known: bool = False) -> tuple[ScoreReply | None, str]:
        """The scheduler's reply (``ask_known``), or None and why there is none (counted)."""
        try:
            reply = await self._call(datasets, candidates, none_known)
        except TimeoutError:
            self._count(route, TIMEOUT)
            log.warning("scheduler did not answer in time", route=route, timeout=self.timeout)
            return None, f"no answer within {self.timeout:g} s"
        except Exception as err:
            self._count(route, FAILED)
            log.warning("scheduler answer failed", route=route, error=f"{type(err).__name__}: {err}")
            return None, f"the scheduler failed: {type(err).__name__}"
        if reply.error:
            self._count(route, UNANSWERED)
            # Debug only: every pod with an ordinary PVC (not a dataset's) gets here.
            log.debug("scheduler gave no answer", route=route, error=reply.error)
        return reply, ""

    async def _call(self, datasets: list[DatasetUse], candidates: list[Candidate], none_known: bool) -> ScoreReply:
        """``ask_known`` on the loop's thread or the worker thread; TimeoutError when later than ``timeout``."""
        ask = functools.partial(ask_known, self._answer, datasets, candidates, none_known=none_known)
        if not self.threaded:
            started = time.monotonic()
            reply = ask()
            if time.monotonic() - started > self.timeout:
                raise TimeoutError
            return reply
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sched-answer")
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._executor, ask), self.timeout)

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The limits of the POST routes: a body over its route's limit gets 413, a request beyond ``reading`` at
        once 503 (both counted). A bug here answers 500 (counted, logged), never takes the server down. Each
        route's answer is timed (``libs.metrics.DECISION_SECONDS``: reading the body, deciding, building the
        reply), whatever it is."""
        route = request.path.strip("/") or "/"
        way = _WAY.get(route)
        if way is None or request.method != "POST":
            return await handler(request)
        started = time.perf_counter()
        try:
            limit = self.limits.body_bytes(route)
            if request.content_length is not None and request.content_length > limit:
                return self._too_large(route, limit)  # said before a byte of it is read
            if self.reading >= self.limits.reading:
                self._count(route, BUSY)
                log.warning("too many requests being read at once, one refused", route=route,
                            reading=self.reading)
                return _json(_error(route, f"too many requests being read at once ({self.limits.reading}); try "
                                           "again"), status=503, headers={"Retry-After": "1"})
            self.reading += 1
            try:
                return await handler(request)
            finally:
                self.reading -= 1
        except BodyTooLarge:
            return self._too_large(route, limit)
        except BodyTooSlow:
            self._count(route, SLOW_BODY)
            log.warning("request body not in within its time, request refused", route=route,
                        seconds=self.limits.body_seconds)
            late = _json(_error(route, f"request body not received within {self.limits.body_seconds:g} s"),
                         status=408)
            late.force_close()  # the rest of the body is not waited for either
            return late
        except BodyLost:
            # The caller's business (it gave up, or its connection broke), not a failure here: no traceback.
            self._count(route, GONE)
            log.info("caller went away before its request body was in", route=route)
            return _json(_error(route, "connection lost before the body was in"), status=400)
        except web.HTTPException:
            raise
        except Exception as err:
            self._count(route, INTERNAL)
            log.exception("scheduler http request failed", route=route)
            return _json({"error": f"internal error: {type(err).__name__}"}, status=500)
        finally:
            metrics.DECISION_SECONDS.labels(way).observe(time.perf_counter() - started)

    def _too_large(self, route: str, limit: int) -> web.Response:
        self._count(route, TOO_LARGE)
        log.warning("request body over the limit refused", route=route, limit=limit)
        return _json(_error(route, f"request body over the limit of {limit} bytes for /{route}"), status=413)

    async def _body(self, request: web.Request) -> bytes:
        """The request's body; BodyTooLarge as soon as it grows past its route's limit (a chunked body has no
        Content-Length to refuse it by), BodyTooSlow when it is not all in within ``body_seconds``, BodyLost when the
        caller closes the connection before."""
        limit = self.limits.body_bytes(request.path.strip("/"))
        pieces: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_seconds):
                while piece := await request.content.read(BODY_PIECE_BYTES):
                    size += len(piece)
                    if size > limit:
                        raise BodyTooLarge
                    pieces.append(piece)
        except TimeoutError:
            raise BodyTooSlow from None
        except ConnectionError:
            raise BodyLost from None
        return b"".join(pieces)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _mutate(self, request: web.Request) -> web.Response:
        try:
            review = parse_review(await self._body(request))
            uses = datasets_of(review.pod, review.namespace) if not review.skip or review.placed else None
        except (*DECODE_ERRORS, BadReview) as err:
            self._count(MUTATE, MALFORMED)
            log.warning("malformed admission review", reason=str(err))
            return _json({"error": f"not an AdmissionReview v1 of a pod: {err}"}, status=400)
        # A pod that places itself is asked about only to warn when it keeps away from a dataset it requires.
        if uses is None or not uses.datasets or (review.placed and not uses.required):
            self._count(MUTATE, UNCHANGED)
            return _json(review_response(review.uid, warnings=uses.warnings if uses else ()))
        reply, _ = await self._ask(MUTATE, uses.datasets, [])
        if reply is None or reply.error:
            warnings = list(uses.warnings)
            if reply is not None and uses.required:  # it stands because of a dataset the pod requires: say so
                # ... and, when that dataset does not exist, that the extender's filter keeps the pod Pending.
                pending = "; with the extender it stays Pending until the dataset exists" if missing_required(
                    uses, reply.error) else ""
                warnings.append(f"shoal: the pod is not placed near its data: {reply.error}{pending}")
            return _json(review_response(review.uid, warnings=warnings))
        holders = {score.node: self._labels(score.node) for score in reply.scores} if uses.required else {}
        apart = await self._apart(uses.required) if len(uses.required) > 1 and not reply.scores else None
        wanted = placement(reply, uses, review.pod, holders, apart)
        patch = [] if review.placed else affinity_patch(review.pod, wanted)
        self._count(MUTATE, PATCHED if patch else UNCHANGED)
        if patch:
            metadata = review.pod.get("metadata") or {}
            log.info("pod placed near its data", namespace=review.namespace,
                     pod=metadata.get("name") or metadata.get("generateName"),
                     datasets=[f"{use.namespace}/{use.name}" for use in uses.datasets],
                     preferred=[nodes for _, nodes in wanted.preferred], required=wanted.required_hosts)
        return _json(review_response(review.uid, patch, [*uses.warnings, *wanted.warnings]))

    async def _apart(self, required: list[DatasetUse]) -> dict[str, list[str]] | None:
        """The nodes caching each required dataset, asked one by one (only when no node caches them all, so the
        warning can say which is missing); None when an answer fails (the warning then names them all)."""
        apart: dict[str, list[str]] = {}
        for use in required:
            try:
                reply = await self._call([use], [], False)
            except Exception:  # a worse warning, never a failed admission
                return None
            if reply.error:
                return None
            apart[f"{use.namespace}/{use.name}"] = [score.node for score in reply.scores]
        return apart

    async def _filter(self, request: web.Request) -> web.Response:
        try:
            args = parse_args(await self._body(request))
        except (*DECODE_ERRORS, BadArgs) as err:
            self._count(FILTER, MALFORMED)
            log.warning("malformed extender filter request", reason=str(err))
            return _json(error_body(f"not an ExtenderArgs: {err}"), status=400)
        if not args.uses.required:
            self._count(FILTER, ANSWERED)
            return _json(filter_result(args, None))
        reply, failure = await self._ask(FILTER, args.uses.datasets, args.candidates)
        if reply is not None and not reply.error:
            self._count(FILTER, ANSWERED)
        return _json(filter_result(args, reply, failure))

    async def _prioritize(self, request: web.Request) -> web.Response:
        try:
            args = parse_args(await self._body(request))
        except (*DECODE_ERRORS, BadArgs) as err:
            self._count(PRIORITIZE, MALFORMED)
            log.warning("malformed extender prioritize request", reason=str(err))
            return _json(error_body(f"not an ExtenderArgs: {err}"), status=400)
        reply, _ = await self._ask(PRIORITIZE, args.uses.datasets, args.candidates, none_known=True)
        if reply is not None and not reply.error:
            self._count(PRIORITIZE, ANSWERED)
        return _json(priorities(args, reply))


class HttpLoop:
    """``SchedulerHttp`` as one of the service's loops (``libs.service.Loop``): serves from ``run`` until ``stop``.
    The scheduler's wiring adds it (``app.run(extra_loops=...)``) when ``SHOAL_SCHED_HTTP_PORT`` is set."""

    name = "scheduler-http"

    def __init__(self, http: SchedulerHttp, host: str, port: int, tls: RenewedTls | None,
                 tls_reload_seconds: float = TLS_RELOAD_SECONDS) -> None:
        self.http = http
        self.host = host
        self.port = port
        self.tls = tls
        self.tls_reload_seconds = tls_reload_seconds
        # The port it listens on once started (``port`` 0 picks a free one).
        self.bound_port = 0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        self.bound_port = await self.http.start(self.host, self.port, self.tls.context if self.tls else None)
        log.info("webhook and extender listening", host=self.host, port=self.bound_port, tls=self.tls is not None)
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.tls_reload_seconds)
                if self.tls is not None and not self._stopping.is_set():
                    await asyncio.to_thread(self.tls.reload)
        finally:
            await self.http.stop()

    def stop(self) -> None:
        self._stopping.set()


def http_loop(answer: Answer, *, host: str, port: int, timeout: float, tls_cert: str = "",
              tls_key: str = "", tls_reload_seconds: float = TLS_RELOAD_SECONDS,
              limits: HttpLimits = HttpLimits(), labels: Labels = lambda node: {}) -> HttpLoop:
    """The loop serving ``answer`` on ``host:port``: HTTPS with ``tls_cert`` and ``tls_key`` (read again every
    ``tls_reload_seconds``, for renewals); plain HTTP without (the API server calls webhooks over HTTPS only, so
    plain HTTP suits an extender on loopback, or tests)."""
    tls = RenewedTls(tls_cert, tls_key) if tls_cert and tls_key else None
    if tls is None:
        log.warning("scheduler http without TLS: the API server will not call a webhook over plain HTTP")
    return HttpLoop(SchedulerHttp(answer, timeout=timeout, limits=limits, labels=labels), host, port, tls,
                    tls_reload_seconds)
