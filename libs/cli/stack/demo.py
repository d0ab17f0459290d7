"""The demo ``shoal up`` applies: the demo bucket's objects, the manifest → commands, and the I/O that seeds the
bucket, provisions JetStream and publishes the commands.

Pure: ``demo_objects`` (deterministic bytes), ``rebase_tier_paths`` and ``manifest_commands`` (documents →
commands, and what they apply, for the banner). I/O: ``seed_demo_bucket`` and ``prepare``, at the bottom.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from libs.cli.stack import S3Access, UpError
from libs.cli.stack.layout import DEFAULT_STATE_DIR
from libs.config import NatsSettings
from libs.documents import documents_to_commands
from libs.events.dataset import DatasetApply
from libs.events.runtime import RuntimeApply
from libs.mounts import exposed_secret_errors
from libs.redact import strip_userinfo

DEMO_BUCKET = "demo"
DEMO_MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "demo" / "demo.yaml"
# Reaching an external NATS: nats-py would retry forever; a person wants an answer.
CONNECT_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class Applied:
    """One resource a manifest applies, as the banner names it."""

    kind: str  # "Dataset" or "Runtime"
    namespace: str
    name: str


@dataclass(frozen=True)
class DemoObject:
    """One object of the demo bucket; binary bodies are generated from the key so every run seeds the same bytes."""

    key: str
    size: int
    text: str | None = None

    def body(self) -> bytes:
        if self.text is not None:
            return self.text.encode()
        return hashlib.shake_256(self.key.encode()).digest(self.size)


_SAMPLE_SIZES = (
    # Tiny files, page and block edges (4 KiB, 64 KiB, 128 KiB ± 1), and mid-sized ones up to 1 MiB.
    1, 17, 512, 1000, 4095, 4096, 4097, 10_000, 65_536, 100_000, 131_071, 131_073, 250_000, 500_000,
    777_777, 1 << 20,
)
# Larger than the 4 MiB default block: one crosses a block boundary by a little, one is exactly two blocks.
_SHARD_SIZES = (5 * (1 << 20) + 123, 8 << 20)
_LABELS = ("cat", "dog", "bird", "fish")


def demo_objects() -> list[DemoObject]:
    samples = [DemoObject(f"train/sample-{i:03d}.bin", size) for i, size in enumerate(_SAMPLE_SIZES)]
    shards = [DemoObject(f"train/shard-{i}.bin", size) for i, size in enumerate(_SHARD_SIZES)]
    labels = "key,label\n" + "".join(
        f"{obj.key},{_LABELS[i % len(_LABELS)]}\n" for i, obj in enumerate(samples + shards)
    )
    readme = (
        "Shoal demo dataset\n\n"
        "Seeded by `shoal up` into the embedded SeaweedFS. train/ holds generated binary files of varied sizes\n"
        "(bytes derived from each key, so every run seeds the same content); labels.csv maps them to labels.\n"
    )
    texts = [DemoObject("README.txt", len(readme.encode()), readme),
             DemoObject("labels.csv", len(labels.encode()), labels)]
    return texts + samples + shards


def rebase_tier_paths(docs: list[dict[str, Any]], state_dir: Path) -> list[dict[str, Any]]:
    """Copies of ``docs`` whose relative tier paths under ``.shoal/`` point into ``state_dir`` instead.

    The demo manifest is written for the default state directory; a run with ``--state-dir`` keeps its cache
    there too. Other relative paths become absolute against the working directory, which is what the services
    (started in it) would make of them, so every reader sees the same path.
    """
    rebased = []
    for doc in docs:
        levels = ((doc.get("spec") or {}).get("tieredstore") or {}).get("levels")
        if not isinstance(levels, list):
            rebased.append(doc)
            continue
        new_levels = []
        for level in levels:
            path = level.get("path") if isinstance(level, dict) else None
            if isinstance(path, str) and path and not Path(path).is_absolute():
                parts = Path(path).parts
                target = state_dir.joinpath(*parts[1:]) if parts[0] == DEFAULT_STATE_DIR else Path.cwd() / path
                level = {**level, "path": str(target)}
            new_levels.append(level)
        spec = {**doc["spec"], "tieredstore": {**doc["spec"]["tieredstore"], "levels": new_levels}}
        rebased.append({**doc, "spec": spec})
    return rebased


def applied_by(commands: Sequence[tuple[str, msgspec.Struct]]) -> list[Applied]:
    """The Datasets and Runtimes the commands apply, in order."""
    applied = []
    for _, command in commands:
        if isinstance(command, DatasetApply):
            meta = command.dataset.metadata
            applied.append(Applied("Dataset", meta.namespace, meta.name))
        elif isinstance(command, RuntimeApply):
            meta = command.runtime.metadata
            applied.append(Applied("Runtime", meta.namespace, meta.name))
    return applied


def demo_commands(docs: list[Any], state_dir: Path,
                  manifest: Path = DEMO_MANIFEST) -> tuple[list[tuple[str, msgspec.Struct]], list[str]]:
    """(subject, command) for each document of ``manifest``, and notes on ignored fields.

    Raises UpError when a document is invalid, or gives a secret in clear text (as ``shoal apply`` refuses it: the
    command would stay in the command stream): ``shoal up`` starts nothing for a broken manifest.
    """
    dicts = [doc for doc in docs if isinstance(doc, dict)]
    commands, notes, errors = documents_to_commands(rebase_tier_paths(dicts, state_dir))
    if len(dicts) != len([doc for doc in docs if doc is not None]):
        errors = errors or ["every document must be a mapping"]
    errors += [f"{command.resource}: {reason}" for command in commands if isinstance(command.event, DatasetApply)
               for reason in exposed_secret_errors(command.event.dataset)]
    if errors:
        raise UpError(f"{manifest} is invalid:\n  " + "\n  ".join(errors))
    return [(command.subject, command.event) for command in commands], notes


# --- I/O ---


async def seed_demo_bucket(s3: S3Access, objects: Sequence[DemoObject]) -> int:
    """Create the demo bucket and upload what is missing or of the wrong size; returns how many were uploaded."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    client_context = get_session().create_client(
        "s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key, config=AioConfig(s3={"addressing_style": "path"}),
    )
    async with client_context as client:
        try:
            await client.create_bucket(Bucket=DEMO_BUCKET)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        present: dict[str, int] = {}
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=DEMO_BUCKET):
            for item in page.get("Contents", []):
                present[item["Key"]] = int(item["Size"])
        missing = [obj for obj in objects if present.get(obj.key) != obj.size]
        for obj in missing:
            await client.put_object(Bucket=DEMO_BUCKET, Key=obj.key, Body=obj.body())
        return len(missing)


def _reachable(url: str) -> bool | None:
    """Whether a TCP connection to a nats:// or tls:// URL opens; None for schemes not checked here."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        return None
    try:
        with socket.create_connection((parts.hostname, parts.port or 4222), timeout=2.0):
            return True
    except OSError:
        return False


async def prepare(nats: NatsSettings, s3: S3Access, commands: Sequence[tuple[str, msgspec.Struct]]) -> None:
    """Provision JetStream, seed the demo bucket (embedded S3 only) and publish the demo commands."""
    from libs.bus import connect

    shown = strip_userinfo(",".join(nats.urls))  # NATS_URL may hold a user and password
    # nats-py retries a refused connection forever, logging a traceback each time: ask the sockets first.
    if all(_reachable(url) is False for url in nats.urls):
        raise UpError(f"cannot reach NATS at {shown} (connection refused or no route); check NATS_URL")
    nats_log = logging.getLogger("nats.aio.client")
    saved_propagate, nats_log.propagate = nats_log.propagate, False
    try:
        bus = await asyncio.wait_for(connect(nats, "shoal-up"), CONNECT_TIMEOUT_SECONDS)
    except (TimeoutError, OSError) as err:
        raise UpError(f"cannot reach NATS at {shown}: {err or f'no answer within {CONNECT_TIMEOUT_SECONDS:g} s'}"
                      ) from err
    finally:
        nats_log.propagate = saved_propagate
    try:
        await bus.provision()
        if s3.embedded:
            await seed_demo_bucket(s3, demo_objects())
        for subject, command in commands:
            await bus.publish(subject, command)
    finally:
        await bus.close()
