"""Names and targets ``shoal load`` and ``shoal clean`` make up, and the names each kind goes by (pure parts of
libs.cli.main)."""

from __future__ import annotations

import re

from libs import crds
from libs.cli.main import KIND_NAMES, RESOURCE_ALIASES, _targets, generated_name, run_operation, scale
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


def test_every_kind_has_a_short_name_and_fluids_short_names_name_their_kind() -> None:
    assert {names[-1] for names in KIND_NAMES.values()} >= {"ds", "rt", "load", "clean"}
    assert all(any(len(name) == 2 for name in names) for names in KIND_NAMES.values())
    assert len(RESOURCE_ALIASES) == sum(len(names) for names in KIND_NAMES.values())  # no name for two kinds
    for kind in ("Dataset", "DataLoad"):  # Fluid's kinds that are Shoal's too; its runtimes are one kind here
        for short in crds.FLUID_SHORT_NAMES[kind]:
            assert RESOURCE_ALIASES[short] == kind.lower()
    # The commands of one kind take its short names too: `shoal scale rt`, `shoal run dl`.
    assert scale.make_context("scale", ["rt", "demo", "--replicas", "2"]).params["resource"] == "rt"
    assert run_operation.make_context("run", ["dl", "nightly"]).params["resource"] == "dl"
