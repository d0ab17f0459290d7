"""Errors of Shoal's NATS client that more than one layer names: ``libs.bus`` raises them while connecting,
``libs.telemetry`` summarises nats-py's log records of them (``NatsConnectErrors``), and the CLI explains them."""

from __future__ import annotations

import nats.errors


class TlsNotOffered(nats.errors.Error):
    """A CA was given, and the server's INFO did not ask for TLS: nothing was sent to it, its credentials least of
    all."""
