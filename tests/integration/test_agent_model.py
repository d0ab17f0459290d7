"""A Hypothesis state machine reads random paths and ranges through a real FUSE mount and compares every answer
with the source objects (the reference model), the way Mountpoint-S3 tests its filesystem.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from libs.bus import Bus
from libs.config import Settings
from tests.conftest import SeaweedServer, put_objects
from tests.integration.agent_stack import node_stack

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.needs("fuse")


def source_objects() -> dict[str, bytes]:
    rng = random.Random(1234)
    sizes = [0, 1, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 7 * MiB]
    objects = {f"dir{i % 3}/file{i}.bin": rng.randbytes(size) for i, size in enumerate(sizes)}
    objects["top.txt"] = b"top level\n"
    return objects


def machine_for(root: Path, objects: dict[str, bytes]) -> type[RuleBasedStateMachine]:
    keys = sorted(objects)

    class MountModel(RuleBasedStateMachine):
        """Open handles persist across steps, so sequential, random and interleaved reads all happen. Handles are
        drawn by their place in opening order, never by descriptor number: the services on this process's event loop
        open and close sockets meanwhile, so the numbers differ from one run of an example to the next, and a draw
        bounded by the file a number maps to made Hypothesis's replay draw differently (FlakyStrategyDefinition)."""

        @initialize()
        def start(self) -> None:
            self.handles: list[tuple[int, str]] = []  # (descriptor, key), in opening order

        def _handle(self, data: st.DataObject) -> tuple[int, str]:
            return self.handles[data.draw(st.integers(min_value=0, max_value=len(self.handles) - 1))]

        @rule(key=st.sampled_from(keys))
        def open_file(self, key: str) -> None:
            if len(self.handles) < 8:
                self.handles.append((os.open(root / key, os.O_RDONLY), key))

        @rule(data=st.data(), length=st.sampled_from([1, 100, 4096, 65536, 131072, MiB, 2 * MiB + 3]))
        def read_range(self, data: st.DataObject, length: int) -> None:
            if not self.handles:
                return
            fd, key = self._handle(data)
            body = objects[key]
            offset = data.draw(st.integers(min_value=0, max_value=len(body) + 100))
            assert os.pread(fd, length, offset) == body[offset:offset + length]

        @rule(data=st.data())
        def read_on(self, data: st.DataObject) -> None:
            """Continue where the handle is, like a streaming reader."""
            if not self.handles:
                return
            fd, key = self._handle(data)
            body = objects[key]
            position = os.lseek(fd, 0, os.SEEK_CUR)
            assert os.read(fd, 256 * KiB) == body[position:position + 256 * KiB]

        @rule()
        def close_one(self) -> None:
            if self.handles:
                fd, _ = self.handles.pop(0)
                os.close(fd)

        @rule(key=st.sampled_from(keys))
        def stat_matches(self, key: str) -> None:
            assert os.stat(root / key).st_size == len(objects[key])

        @rule(directory=st.sampled_from(["", "dir0/", "dir1/"]), name=st.text(alphabet="xyz.-", min_size=1,
                                                                               max_size=12))
        def unknown_names_are_enoent(self, directory: str, name: str) -> None:
            if name in (".", ".."):
                return
            try:
                os.stat(root / f"{directory}missing-{name}")
            except OSError as err:
                assert err.errno == errno.ENOENT
            else:
                raise AssertionError(f"{directory}missing-{name} should not exist")

        @invariant()
        def listing_matches(self) -> None:
            assert sorted(os.listdir(root)) == ["dir0", "dir1", "dir2", "top.txt"]

        def teardown(self) -> None:
            for fd, _ in self.handles:
                os.close(fd)

    return MountModel


async def test_random_reads_match_the_reference_model(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                      bucket: str, tmp_path: Path) -> None:
    objects = source_objects()
    await put_objects(seaweedfs, bucket, objects)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("model", bucket, block_size="1Mi")
        root = await node.wait_mounted("model", expect="top.txt")
        machine = machine_for(root, objects)
        # No example database: examples replayed from another run would meet a different mount.
        options = hypothesis_settings(max_examples=30, stateful_step_count=40, deadline=None, database=None,
                                      suppress_health_check=list(HealthCheck))
        # In a thread: the services this mount needs run on this test's event loop.
        await asyncio.to_thread(run_state_machine_as_test, machine, settings=options)
