"""The error every ``shoal`` command (``up`` and ``down`` too) ends with when a person has something to fix.

Apart from ``libs.cli.main`` so that ``libs.cli.up``, which ``main`` imports, raises the same one.
"""

from __future__ import annotations

from typing import IO, Any

import click


class CliError(click.ClickException):
    """An error a person can act on: printed as one ``error: ...`` line, no traceback; exit code 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
