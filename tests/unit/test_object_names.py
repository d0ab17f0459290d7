"""How people read an object's name (``subjects.object_name``: ``<namespace>/<name>``, as kubectl writes it) against
how the wire spells it (``subjects.resource_key``: dotted, for KV keys and subject tokens): one helper for each, so a
log line or message never shows the wire's form."""

from __future__ import annotations

import pytest

from libs import metrics, subjects


def test_an_object_is_named_namespace_slash_name_and_its_key_stays_dotted() -> None:
    assert subjects.object_name("team-a", "imagenet") == "team-a/imagenet"
    assert subjects.resource_key("team-a", "imagenet") == "team-a.imagenet"  # the wire is unchanged
    assert metrics.dataset_label("team-a", "imagenet") == "team-a/imagenet"  # the metrics label says it as logs do


@pytest.mark.parametrize(("key", "shown"), [
    (subjects.resource_key("default", "demo"), "default/demo"),
    (subjects.operation_key("DataLoad", "team-a", "warm"), "dataload team-a/warm"),
    (subjects.operation_key("DataClean", "default", "cool"), "dataclean default/cool"),
    ("scheduler.replica-1.extra.parts", "scheduler.replica-1.extra.parts"),  # not an object's key: as it is
])
def test_a_message_holding_only_the_key_names_the_object_as_people_read_it(key: str, shown: str) -> None:
    assert subjects.key_name(key) == shown
