"""An aiohttp runner served on one port with a cap on the connections open at once, and the runner itself.

aiohttp bounds neither the connections a server keeps nor how many it accepts: each costs a file descriptor (which
a mount process's cache files also need) and a little memory, and an unauthenticated client that opens many idle
ones could use them all up. ``CappedListener`` listens with asyncio's ``create_server``, handing each connection to
the runner's own protocol (``runner.server``, aiohttp's public low-level server) through a thin gate: beyond
``max_connections`` open at once, a new connection gets ``503`` with the reason and is closed, so the client sees
why (a kube-apiserver or a peer reader moves on: ``failurePolicy: Ignore``, the next block source).

A connection counts from the moment it can carry a request (after its TLS handshake) until it is lost. A TLS
connection is accepted as plain TCP and its handshake run here (``loop.start_tls``), so that handshakes under way
are bounded too, in time (``HANDSHAKE_SECONDS``) and in number: at most ``max_connections`` at once, and one more
drops the oldest one still under way (a real client finishes its handshake in milliseconds: the oldest is the
one most likely stalled, and a client that opens connections and never finishes them cannot keep a real one
out). Before, handshakes were not counted at all: a client opening connections faster than they timed out held
as many descriptors as it liked. So a listener holds at most twice ``max_connections`` descriptors.

A connection that carries no whole request for ``IDLE_SECONDS`` (none sent, or headers trickled in, after it
opened or after its last answer) is closed: aiohttp's keep-alive timeout, which a runner made by ``app_runner``
sets (``AppRunner``'s own default is 3630 s, not the 75 s of ``web.run_app``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from libs.telemetry import get_logger

log = get_logger(__name__)

# asyncio's default is 60 s: a client that opens TLS connections and never finishes the handshake would hold each
# that long. The API server, kube-scheduler and peers finish one in milliseconds; 10 s leaves room for a loaded node.
HANDSHAKE_SECONDS = 10.0
# A connection that carries no whole request this long after it opened or after its last answer is closed: a
# peer, the API server or Prometheus sends a request's headers at once. Longer than Go's HTTP clients (the API
# server, kube-scheduler, Prometheus) keep an idle connection (90 s), so they close theirs first and never send a
# request on one we are closing (a webhook POST is not retried); the peer client drops one idle for 15 s.
# ``AppRunner`` alone keeps such a connection 3630 s, so idle or trickling connections held places for an hour.
IDLE_SECONDS = 120.0
# A request answered before its body was all read (refused as too large, or as too slow to arrive) keeps its
# connection while aiohttp reads and drops the rest of the body, so the answer is not lost to a reset: aiohttp's
# default is 10 s, which let a client that stalls its body hold its place that much longer after its 408. A caller
# still sending takes well under a second to finish.
LINGER_SECONDS = 1.0
# aiohttp's own default for a request line: ample for probes, scrapes and webhooks (the peer server takes more).
MAX_LINE_BYTES = 8190
# A full listener says so at most this often (a client hammering it would otherwise fill the log).
REFUSAL_LOG_SECONDS = 60.0


def app_runner(app: web.Application, max_line_size: int = MAX_LINE_BYTES) -> web.AppRunner:
    """The runner every Shoal HTTP server serves ``app`` with: no access log (probes, scrapes and peer requests
    would drown the process's own lines; outcomes are counted instead), connections without a whole request closed
    after ``IDLE_SECONDS``, the unread rest of a refused body drained for at most ``LINGER_SECONDS``.
    ``max_line_size``: the longest request line taken; a longer one is answered 400."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_SECONDS, lingering_time=LINGER_SECONDS,
                         max_line_size=max_line_size)


def refusal(reason: str) -> bytes:
    """The whole HTTP answer a connection over the cap gets: 503, JSON ``{"reason": ...}``, closed."""
    body = json.dumps({"reason": reason}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Gate(asyncio.Protocol):
    """Stands between a transport and aiohttp's protocol for one connection: passes everything through when the
    listener has room, else answers the refusal and closes. On a TLS listener it is first the plain TCP
    connection's protocol while the handshake runs (counted among the listener's handshakes), then the TLS
    transport's."""

    def __init__(self, listener: CappedListener, inner: asyncio.Protocol) -> None:
        self._listener = listener
        self._inner: asyncio.Protocol | None = inner
        self._counted = False
        self._admitted = False
        self._lost = False
        # TLS: the plain transport while the handshake runs, and what the TLS transport delivered between the
        # handshake's end and ``_admit`` (the handshake's coroutine resumes a loop turn after its last bytes):
        # data, or the client's end of the connection.
        self.raw: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._ended = False
        self._handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._listener.tls
        if tls is None:
            self._admit(transport)
            return
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read before the handshake takes the connection over
        self.raw = transport
        self._listener.handshake_started(self)
        self._handshake = asyncio.get_running_loop().create_task(self._shake(transport, tls))

    async def _shake(self, transport: asyncio.Transport, tls: ssl.SSLContext) -> None:
        secure: asyncio.BaseTransport | None = None
        try:
            if not transport.is_closing():  # dropped before its turn came
                secure = await asyncio.get_running_loop().start_tls(
                    transport, self, tls, server_side=True, ssl_handshake_timeout=HANDSHAKE_SECONDS)
        except Exception:
            secure = None  # a failed handshake (timed out, not TLS, reset) ends this connection only
        finally:
            self.raw = None
            self._listener.handshake_ended(self)
        if secure is None or self._lost or self._ended:
            transport.close()
            return
        self._admit(secure)

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        self._admitted = True
        if listener.open >= listener.max_connections:
            self._inner = None
            listener.refuse()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(listener.refusal)
            transport.close()
            return
        listener.open += 1
        self._counted = True
        assert self._inner is not None
        self._inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self._inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.raw is not None:  # lost before the handshake started
            self.raw = None
            self._listener.handshake_ended(self)
        if self._counted:
            self._counted = False
            self._listener.open -= 1
        if self._inner is not None and self._admitted:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._admitted:
            self._early.append(data)
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None and not self._admitted:
            # The client's close_notify came with its handshake's last bytes: asyncio's TLS shuts the connection
            # down whatever this returns, so what it sent can never be answered, and aiohttp handed the closed
            # transport fails on it. It is not admitted (``_shake``).
            self._ended = True
            return None
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None and self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None and self._admitted:
            self._inner.resume_writing()


class CappedListener:
    """Serves ``runner`` (set up) on one host and port with at most ``max_connections`` connections open at once;
    ``open`` is how many are, ``refused`` how many were turned away; on TLS, ``handshaking`` how many handshakes are
    under way (at most ``max_connections``) and ``dropped`` how many were dropped unfinished to make room for a
    newer one. ``what`` names the server in the log."""

    def __init__(self, runner: web.BaseRunner, max_connections: int, what: str,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.runner = runner
        self.max_connections = max_connections
        self.what = what
        self.refusal = refusal(f"{what}: too many connections open ({max_connections}); try again")
        self.open = 0
        self.refused = 0
        self.dropped = 0
        self.port = 0
        self.tls: ssl.SSLContext | None = None
        self._monotonic = monotonic
        self._said_at: float | None = None
        self._refused_since_said = 0
        self._dropped_said_at: float | None = None
        self._dropped_since_said = 0
        # Handshakes under way, oldest first (a dict: ordered, and removal by key).
        self._handshakes: dict[_Gate, None] = {}
        self._server: asyncio.AbstractServer | None = None

    @property
    def handshaking(self) -> int:
        """TLS handshakes under way now."""
        return len(self._handshakes)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_address: bool | None = None) -> int:
        """Listen on ``host:port`` (0: a free port); the port."""
        server = self.runner.server
        if server is None:
            raise RuntimeError("set the runner up before listening")
        self.tls = ssl_context  # the handshake is the gate's (``_Gate._shake``), so that it is counted
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self, server()), host, port, reuse_address=reuse_address)
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    def close(self) -> None:
        """Stop listening and drop the handshakes under way; the connections open are the runner's to close
        (``runner.cleanup``)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for gate in list(self._handshakes):
            self._drop(gate)

    def handshake_started(self, gate: _Gate) -> None:
        """Count ``gate``'s handshake; with ``max_connections`` under way already, drop the oldest."""
        if len(self._handshakes) >= self.max_connections:
            self._drop(next(iter(self._handshakes)))
            self.dropped += 1
            self._dropped_since_said += 1
            now = self._monotonic()
            if self._dropped_said_at is None or now - self._dropped_said_at >= REFUSAL_LOG_SECONDS:
                log.warning("too many TLS handshakes under way: the oldest dropped", server=self.what,
                            max_handshakes=self.max_connections, dropped=self._dropped_since_said)
                self._dropped_said_at, self._dropped_since_said = now, 0
        self._handshakes[gate] = None

    def handshake_ended(self, gate: _Gate) -> None:
        self._handshakes.pop(gate, None)

    def _drop(self, gate: _Gate) -> None:
        self._handshakes.pop(gate, None)
        if gate.raw is not None:
            gate.raw.abort()  # its handshake ends at once (``start_tls`` sees the connection lost)

    def refuse(self) -> None:
        self.refused += 1
        self._refused_since_said += 1
        now = self._monotonic()
        if self._said_at is None or now - self._said_at >= REFUSAL_LOG_SECONDS:
            log.warning("too many connections open: new ones refused", server=self.what, open=self.open,
                        max_connections=self.max_connections, refused=self._refused_since_said)
            self._said_at, self._refused_since_said = now, 0
