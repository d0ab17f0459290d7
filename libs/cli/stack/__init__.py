"""The pieces of ``shoal up`` (``libs.cli.up`` runs them in order), one concern per module:

- ``layout``: every path below the state directory;
- ``ports``: which loopback ports the embedded servers and the services' side servers need, and their checks;
- ``pids``: pid files, and finding and stopping processes by the PID we started;
- ``demo``: the demo bucket's objects, the manifest → commands, seeding and provisioning;
- ``supervision``: the services' environment, starting them, and restarting them through ``libs.supervisor``;
- ``banner``: what ``shoal up`` prints once everything runs.

Pure decisions sit at the top of each module, its I/O below.
"""

from __future__ import annotations

from dataclasses import dataclass


class UpError(Exception):
    """Something a person has to fix (a port in use, a second ``shoal up``); the message says what."""


@dataclass(frozen=True)
class S3Access:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    embedded: bool
