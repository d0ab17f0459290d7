"""The note a delete command leaves in a record's KV delete marker, and reading it back.

A delete keeps its command's stream sequence in the marker (``libs.bus.kv_delete``'s ``note``): an apply older than
it, handled after it (delivered again once its handling failed, or by another replica), finds the marker
(``kv_load_deleted``) and is stale instead of bringing the object back. The dataset, runtime and loader services
all order their commands this way.
"""

from __future__ import annotations

import msgspec

from libs.events.common import DECODE_ERRORS


class DeletionNote(msgspec.Struct, rename="camel"):
    """What a delete leaves in the marker: the delete command's stream sequence (a service may add what it needs to
    finish the delete, as the dataset service does)."""

    command_sequence: int


def deletion_note(sequence: int) -> bytes:
    """The note of a delete at stream ``sequence``; none (b"") for 0, a delete that no command made."""
    return msgspec.json.encode(DeletionNote(command_sequence=sequence)) if sequence else b""


def deleted_at(note: bytes) -> int:
    """The stream sequence of the delete that left ``note``; 0 without one (never deleted, a delete no command made,
    or one from before deletes left notes)."""
    if not note:
        return 0
    try:
        return msgspec.json.decode(note, type=DeletionNote).command_sequence
    except DECODE_ERRORS:
        return 0
