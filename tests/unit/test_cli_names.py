"""Names and targets ``shoal load`` and ``shoal clean`` make up (pure parts of libs.cli.main)."""

from __future__ import annotations

import re

from libs.cli.main import _targets, generated_name
from libs.events.common import DNS1123_LABEL
from libs.events.operation import TargetPath


def test_generated_names_are_dns_labels_with_a_random_suffix() -> None:
    names = {generated_name("imagenet", "load") for _ in range(20)}

    assert len(names) > 1  # random: 27^5 suffixes
    for name in names:
        assert re.fullmatch(r"imagenet-load-[bcdfghjklmnpqrstvwxz2456789]{5}", name), name
    long = generated_name("a" * 60, "clean")
    assert len(long) == 63 and long.startswith("a" * 51 + "-clean-")
    # Cut right after a dash: the dash goes, so no "--" and still a DNS label.
    cut = generated_name("a" * 50 + "-" + "b" * 10, "clean")
    assert cut.startswith("a" * 50 + "-clean-") and len(cut) == 62
    assert DNS1123_LABEL.fullmatch(long) and DNS1123_LABEL.fullmatch(cut)


def test_targets() -> None:
    assert _targets([], 1) == []  # the whole dataset, one replica: Fluid's default
    assert _targets([], 2) == [TargetPath(path="/", replicas=2)]
    assert _targets(["/train", "/test/a.bin"], 1) == [TargetPath(path="/train"), TargetPath(path="/test/a.bin")]
