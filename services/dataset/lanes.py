"""Which dataset a message is about, read from its raw payload: the lane (``libs.bus.Consumer.lane_of``) its
consumer handles it in. Messages of one dataset stay in stream order; those of different datasets are handled at
once, so a burst of applies is not one KV round trip after another.

Every message the dataset service consumes names its dataset (or the runtime of the same name) in one of three
places: ``dataset.metadata`` (apply), ``dataset`` (inventory) or at the top (delete, resync, runtime facts). Only
those fields are decoded; a payload that is not even that goes to a lane of its own (the consumer rejects it).
"""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from libs import subjects
from libs.events.common import DECODE_ERRORS


class _Ref(msgspec.Struct, frozen=True):
    name: str = ""
    namespace: str = "default"
    metadata: _Ref | None = None


class _Named(msgspec.Struct, frozen=True):
    name: str = ""
    namespace: str = "default"
    dataset: _Ref | None = None


_DECODER = msgspec.json.Decoder(_Named)
# The lane of payloads that do not name a dataset: handled one after another, like every message before lanes.
UNNAMED = ""


def dataset_lane(message: Msg) -> str:
    try:
        named = _DECODER.decode(message.data)
    except DECODE_ERRORS:  # also text that is not UTF-8 (a fuzzed apply at 10,000 examples stopped the consumer)
        return UNNAMED
    ref: _Ref | _Named = named
    if named.dataset is not None:
        ref = named.dataset.metadata or named.dataset
    if not ref.name:
        return UNNAMED
    return subjects.resource_key(ref.namespace, ref.name)
