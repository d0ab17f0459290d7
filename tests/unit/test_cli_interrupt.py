"""Ctrl-C ends every ``shoal`` command with exit code 130 and no "Aborted!" (README, The CLI), wherever it lands:
not only inside a command's NATS work (``libs.cli.main._run``), also while a manifest is read from stdin
(``shoal apply -f -``, before anything is sent), where click's own handling said "Aborted!" and exited 1, the code
of a rejected command."""

from __future__ import annotations

import io

from click.testing import CliRunner

from libs.cli.main import cli


class InterruptedStdin(io.RawIOBase):
    """A terminal's stdin on which the user presses Ctrl-C while the CLI waits for input."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        raise KeyboardInterrupt


def test_ctrl_c_while_apply_reads_stdin_exits_130_without_aborted() -> None:
    result = CliRunner().invoke(cli, ["--nats", "nats://127.0.0.1:1", "apply", "-f", "-", "--wait"],
                                input=io.BufferedReader(InterruptedStdin()))

    assert result.exit_code == 130, (result.exit_code, result.output)
    assert "Aborted" not in result.output
    assert "Traceback" not in result.output
