"""Each command type has its own subject (``subjects.command_subject``), and a consumer refuses one on another's
subject: NATS permissions are per subject, so a user allowed one command must not send another there."""

from __future__ import annotations

import typing

from libs import subjects
from libs.bus import misplaced_command
from libs.events.dataset import DatasetCommand, DatasetResync
from libs.events.operation import DataLoadDelete, DataLoadRun, OperationCommand
from libs.events.runtime import RuntimeCommand

SUBJECTS = {value for name, value in vars(subjects).items()
            if isinstance(value, str) and value.startswith(subjects.COMMAND_PREFIX) and value[-1] not in "*>."}


def test_every_command_type_has_its_subject_and_every_subject_a_type() -> None:
    tags = [kind.__struct_config__.tag
            for union in (DatasetCommand, RuntimeCommand, OperationCommand) for kind in typing.get_args(union)]
    assert {subjects.command_subject(tag) for tag in tags} == SUBJECTS
    assert subjects.command_subject("dataload.run.v1") == subjects.DATALOAD_RUN


def test_a_command_on_another_commands_subject_is_misplaced() -> None:
    assert misplaced_command(DataLoadRun(name="warm"), subjects.DATALOAD_RUN) is None
    assert misplaced_command(DataLoadDelete(name="warm"), subjects.DATALOAD_RUN) == (
        "a dataload.delete.v1 command is sent on shoal.cmd.dataload.delete, not on shoal.cmd.dataload.run")
    assert misplaced_command(DatasetResync(name="data"), subjects.RUNTIME_SCALE) is not None
    # Not a command subject (facts, inventory, progress): not this rule's business.
    assert misplaced_command(DataLoadDelete(name="warm"), subjects.DATALOAD_STATUS) is None
