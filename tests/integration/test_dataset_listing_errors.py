"""What a listing that meets something odd leaves in the dataset's status (real nats-server, real local folders
and a real web server): the sync finishes, entries that cannot be in the tree are reported as left out with a
reason, and a listing that cannot go on fails the dataset with a message. Never a sync that raises and is relisted
every few seconds with an empty message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from libs import subjects
from libs.bus import Bus, Delivery, RetryLater, kv_load, kv_save
from libs.events.common import ObjectMeta
from libs.events.dataset import (
    Dataset,
    DatasetApply,
    DatasetRecord,
    DatasetResync,
    DatasetSpec,
    EncryptOption,
    Mount,
)
from libs.manifest import ManifestStore
from libs.ufs import open_store
from libs.ufs.base import Location, ObjectInfo, ObjectStore
from services.dataset.domain import (
    CONDITION_SKIPPED,
    CONDITION_SYNCED,
    REASON_FAILED,
    REASON_UNREACHABLE,
    apply_dataset,
    not_bound_message,
)
from services.dataset.handlers import DatasetHandlers
from tests import web_source
from tests.conftest import NatsServer, SeaweedServer, put_objects
from tests.faults import HttpProxy, StoreWrapper
from tests.helpers import make_settings
from tests.secrets import credentials_from
from tests.web_source import WebSource

KEY = subjects.resource_key("default", "odd")


class ChangingTree(StoreWrapper):
    """A listing that runs ``change`` once its first entry is out (one entry a page, so the rest is not read yet)."""

    def __init__(self, store: ObjectStore, change: Callable[[], None]) -> None:
        super().__init__(store)
        self.change = change

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        first = True
        async for info in self.store.list(1):
            yield info
            if first:
                first = False
                self.change()


class Broken(StoreWrapper):
    """A listing that fails with an error no store turns into a UfsError (a bug, say)."""

    async def list(self, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        raise RuntimeError("something no store expected")
        yield  # an async generator


def tree(root: Path) -> None:
    root.mkdir()
    (root / "a.txt").write_bytes(b"a")
    (root / "good.txt").write_bytes(b"good")


def replace_folder_with_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_bytes(b"now a file")


async def sync_of(bus: Bus, nats_server: NatsServer, mount_point: str,
                  wrap: Callable[[ObjectStore], ObjectStore] = lambda store: store,
                  options: dict[str, str] | None = None, encrypt_options: list[EncryptOption] | None = None,
                  s3: SeaweedServer | None = None, **service: object) -> DatasetRecord:
    def opener(location: Location) -> ObjectStore:
        return wrap(open_store(location))

    # Credentials for s3:// mounts: the real store's (``s3``), else any (the endpoints these tests give take any).
    settings = (make_settings(nats_server.url, s3.endpoint, s3.config.access_key_id, s3.config.secret_access_key,
                              **service) if s3 is not None
                else make_settings(nats_server.url, "", "listing-test-key", "listing-test-secret", **service))
    handlers = DatasetHandlers(bus, settings, opener=opener)
    mount = Mount(mount_point=mount_point, options=options or {}, encrypt_options=encrypt_options or [])
    dataset = Dataset(metadata=ObjectMeta(name="odd"), spec=DatasetSpec(mounts=[mount]))
    await handlers.apply(DatasetApply(id="odd.apply", dataset=dataset),
                         Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1, stream_sequence=1))
    with contextlib.suppress(RetryLater):  # an unreachable store: its status is written, then retried later
        await handlers.sync(KEY)  # raises anything else if the sync does not finish
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord)
    assert record is not None and record.status.synced_generation == 1, record
    return record


# No error to tell: the message says only that no runtime binds the dataset (these tests apply none).
NO_RUNTIME = not_bound_message("default", "odd", "NotReady", "")


def condition(record: DatasetRecord, kind: str) -> tuple[str, str]:
    found = next((c for c in record.status.conditions if c.type == kind), None)
    return (found.status, found.message) if found is not None else ("", "")


def replace_folder_with_link(folder: Path, target: Path) -> None:
    shutil.rmtree(folder)
    folder.symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize("trigger", ["symlink-loop", "non-utf8-name", "folder-replaced-by-file",
                                     "folder-replaced-by-link-out", "links-not-followed"])
async def test_odd_entries_of_a_local_folder_are_left_out_and_reported(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, trigger: str) -> None:
    root = tmp_path / "data"
    tree(root)
    wrap: Callable[[ObjectStore], ObjectStore] = lambda store: store  # noqa: E731
    reported = ""
    if trigger == "symlink-loop":
        (root / "loop").symlink_to("loop")
        (root / "ring-a").symlink_to("ring-b")
        (root / "ring-b").symlink_to("ring-a")
        reported = "'loop' (mount 0): is a symbolic link that loops"
    elif trigger == "non-utf8-name":
        os.close(os.open(os.fsencode(root) + b"/bad\xff.txt", os.O_CREAT | os.O_WRONLY, 0o644))
        reported = "'bad\\udcff.txt' (mount 0): is not valid UTF-8"
    elif trigger == "links-not-followed":
        # Each used to be left out in silence: files missing from the mount with no reason anywhere.
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "private.key").write_bytes(b"not for the dataset")
        (root / "out").symlink_to(outside / "private.key")
        (root / "again").symlink_to(root, target_is_directory=True)
        (root / "dangling").symlink_to(tmp_path / "nowhere")
        reported = ("'again' (mount 0): is a symbolic link to a folder (not followed: it could loop); "
                    "'dangling' (mount 0): is a symbolic link to nothing; "
                    "'out' (mount 0): leads out of the mounted folder (a symbolic link, not followed)")
    elif trigger == "folder-replaced-by-file":
        (root / "z").mkdir()
        (root / "z" / "inner.txt").write_bytes(b"inner")

        def wrap(store: ObjectStore) -> ObjectStore:
            return ChangingTree(store, lambda: replace_folder_with_file(root / "z"))
    else:
        # Read as a folder, then swapped for a link out of the root before the listing enters it: nothing of
        # what the link leads to (names, sizes) may reach the manifest.
        (root / "z").mkdir()
        (root / "z" / "inner.txt").write_bytes(b"inner")
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "private.key").write_bytes(b"not for the dataset")

        def wrap(store: ObjectStore) -> ObjectStore:
            return ChangingTree(store, lambda: replace_folder_with_link(root / "z", outside))

    record = await sync_of(bus, nats_server, f"local://{root}", wrap)
    assert record.status.message == NO_RUNTIME and condition(record, CONDITION_SYNCED)[0] == "True", record.status
    assert record.status.file_num == 2, record.status
    entries = await (await ManifestStore.of(bus)).load(record.status.manifest)
    assert sorted(e.key for e in entries) == ["a.txt", "good.txt"]
    skipped = condition(record, CONDITION_SKIPPED)
    if reported:
        assert skipped[0] == "True" and reported in skipped[1], skipped
    if trigger in ("symlink-loop", "links-not-followed"):
        assert skipped[1].startswith("3 of 5 listed objects are not in the tree"), skipped
    assert "outside" not in skipped[1] and "private.key" not in skipped[1], skipped


async def test_a_web_page_the_html_parser_cannot_read_fails_the_dataset_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "site"
    tree(root)
    monkeypatch.setitem(web_source.PAGES, "marked", lambda path, folder: web_source.nginx_page(path, folder)
                        + "<![foo]>")
    async with WebSource(root, style="marked") as site:
        record = await sync_of(bus, nats_server, site.url)
    assert record.status.phase == "Failed", record.status
    assert "is HTML that cannot be parsed" in record.status.message, record.status
    assert condition(record, CONDITION_SYNCED) == ("False", record.status.message)


async def test_an_unexpected_listing_error_fails_the_dataset_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    root = tmp_path / "data"
    tree(root)
    record = await sync_of(bus, nats_server, f"local://{root}", Broken)
    assert record.status.phase == "Failed", record.status
    assert record.status.message == (f"cannot list local://{root}: RuntimeError: something no store expected")


class ClosesBadly(StoreWrapper):
    """A store that lists, then fails to close with an error no store expects (a bug, say)."""

    async def close(self) -> None:
        await self.store.close()
        raise RuntimeError("close went wrong")


def refuses_to_open(location: Location) -> ObjectStore:
    # As botocore refuses an endpoint it cannot use, before any listing.
    raise ValueError("Invalid endpoint: nowhere")


async def sync_stored(bus: Bus, nats_server: NatsServer, mount_point: str,
                      opener: Callable[[Location], ObjectStore] = open_store,
                      ) -> tuple[DatasetRecord, list[MutableMapping[str, Any]]]:
    """Sync a record stored as it is, with no apply's checks: one an older version accepted. The record, and the
    log lines of the sync."""
    dataset = Dataset(metadata=ObjectMeta(name="odd"), spec=DatasetSpec(mounts=[Mount(mount_point=mount_point)]))
    stored, _ = apply_dataset(None, dataset, 1, "before-the-check")
    await kv_save(await bus.kv(subjects.KV_DATASETS), KEY, stored, None)
    handlers = DatasetHandlers(bus, make_settings(nats_server.url, "", "listing-test-key", "listing-test-secret"),
                               opener=opener)
    with structlog.testing.capture_logs() as logs:
        await handlers.sync(KEY)  # used to raise, and the reconciler to run it again every 5 s, for ever
    record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord)
    assert record is not None and record.status.synced_generation == 1, record
    return record, logs


async def test_a_stored_local_mount_holding_a_nul_byte_fails_the_dataset_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """Refused at apply now, but a record stored before keeps its mountPoint: checking its folder raised a bare
    ValueError outside the listing's own error handling, so the dataset stayed NotBound with no reason."""
    mount_point = f"local://{tmp_path}/a\x00b"
    record, logs = await sync_stored(bus, nats_server, mount_point)
    message = f"cannot list {mount_point}: ValueError: embedded null byte"
    assert record.status.phase == "Failed", record.status
    assert record.status.message == message, record.status.message
    found = next(c for c in record.status.conditions if c.type == CONDITION_SYNCED)
    assert (found.status, found.reason, found.message) == ("False", REASON_FAILED, message), found
    assert [(line["event"], line["error"]) for line in logs if line["log_level"] == "warning"] == [
        ("listing failed unexpectedly", message)], logs


async def test_a_store_that_cannot_be_opened_fails_the_dataset_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    root = tmp_path / "data"
    tree(root)
    record, _ = await sync_stored(bus, nats_server, f"local://{root}", refuses_to_open)
    assert record.status.phase == "Failed", record.status
    assert record.status.message == f"cannot list local://{root}: ValueError: Invalid endpoint: nowhere"


async def test_an_unexpected_error_after_the_listing_fails_the_dataset_with_a_message(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """Whatever fails in a sync, outside the listing too, ends in the status with a reason and a log line."""
    root = tmp_path / "data"
    tree(root)
    record, logs = await sync_stored(bus, nats_server, f"local://{root}",
                                     lambda location: ClosesBadly(open_store(location)))
    message = "metadata sync failed: RuntimeError: close went wrong"
    assert record.status.phase == "Failed", record.status
    assert record.status.message == message, record.status.message
    assert [(line["event"], line["error"]) for line in logs if line["log_level"] == "warning"] == [
        ("sync failed unexpectedly", message)], logs


@pytest.mark.parametrize("slash", ["", "/"])
async def test_an_s3_mount_naming_one_object_fails_the_dataset_with_how_to_mount_it(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str, slash: str) -> None:
    """Fluid users write ``s3://bucket/dir/model.bin``: read as the folder ``dir/model.bin/``, it bound with no
    files and no word why. An empty listing whose prefix is itself an object fails the dataset, saying what to
    mount; the trailing '/' changes nothing (the prefix is a folder either way)."""
    await put_objects(seaweedfs, bucket, {"dir/model.bin": b"weights", "dir/other.txt": b"other"})
    mount_point = f"s3://{bucket}/dir/model.bin{slash}"
    record = await sync_of(bus, nats_server, mount_point, s3=seaweedfs)
    assert record.status.phase == "Failed", record.status
    assert record.status.message == (
        f"mount {mount_point} names an object, not a folder: mount its folder s3://{bucket}/dir/ instead (a "
        "mount is always a folder, every object below it in the dataset; to have this object alone, put it in "
        "a folder of its own and mount that)"), record.status.message
    assert condition(record, CONDITION_SYNCED) == ("False", record.status.message)
    assert not record.status.manifest and record.status.file_num == 0


# "dir/model" is the start of an object's name, not an object.
@pytest.mark.parametrize("prefix", ["empty/", "dir/model"])
async def test_an_empty_s3_prefix_that_is_no_object_is_an_empty_dataset(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str, prefix: str) -> None:
    """Nothing below the prefix, and no object of its name: a folder with nothing in it yet, which is no error."""
    await put_objects(seaweedfs, bucket, {"dir/model.bin": b"weights"})
    record = await sync_of(bus, nats_server, f"s3://{bucket}/{prefix}", s3=seaweedfs)
    assert record.status.phase != "Failed" and record.status.message == NO_RUNTIME, record.status
    # No error, but where it looked and what to check: "listed 0 files" left an empty mount and no clue.
    assert condition(record, CONDITION_SYNCED) == (
        "True", f"listed 0 files: nothing under s3://{bucket}/{prefix}; check the path and prefix (objects written "
        "there later appear at the next sync: shoal resync dataset, or the runtime's autoSync)"), record.status
    assert record.status.file_num == 0 and record.status.manifest, record.status


async def test_an_empty_s3_prefix_costs_no_head_per_listing_once_its_spec_was_listed(
        bus: Bus, nats_server: NatsServer, seaweedfs: SeaweedServer, bucket: str) -> None:
    """Whether an empty mount names one object is asked (a HEAD) at the first listing of a spec; the resyncs and
    autoSync passes after it list the prefix alone (it was a folder then), and a changed spec is asked again."""
    await put_objects(seaweedfs, bucket, {"dir/model.bin": b"weights"})
    proxy = HttpProxy(seaweedfs.endpoint)
    await proxy.start()
    try:
        settings = make_settings(nats_server.url, proxy.endpoint, seaweedfs.config.access_key_id,
                                 seaweedfs.config.secret_access_key)
        handlers = DatasetHandlers(bus, settings)

        def heads() -> list[str]:
            return [call.path for call in proxy.calls if call.method == "HEAD"]

        async def apply(mount_point: str, sequence: int) -> None:
            spec = DatasetSpec(mounts=[Mount(mount_point=mount_point)])
            dataset = Dataset(metadata=ObjectMeta(name="odd"), spec=spec)
            await handlers.apply(DatasetApply(id=f"odd.apply.{sequence}", dataset=dataset),
                                 Delivery(subject=subjects.DATASET_APPLY, headers={}, deliveries=1,
                                          stream_sequence=sequence))
            await handlers.sync(KEY)

        async def resync(sequence: int) -> DatasetRecord:
            await handlers.resync(DatasetResync(id=f"odd.resync.{sequence}", name="odd"),
                                  Delivery(subject=subjects.DATASET_RESYNC, headers={}, deliveries=1,
                                           stream_sequence=sequence))
            await handlers.sync(KEY)
            record, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord)
            assert record is not None and record.status.synced_requests == record.sync_requests, record
            return record

        await apply(f"s3://{bucket}/empty/", 1)
        assert heads() == [f"/{bucket}/empty"]  # the first listing of the spec asks
        for sequence in (2, 3, 4):
            record = await resync(sequence)
        assert heads() == [f"/{bucket}/empty"], proxy.calls  # three more listings, no HEAD
        assert record.status.phase != "Failed" and record.status.file_num == 0 and record.status.manifest
        # A changed spec is asked again: the mount naming an object is still refused.
        await apply(f"s3://{bucket}/dir/model.bin", 5)
        assert heads() == [f"/{bucket}/empty", f"/{bucket}/dir/model.bin"]
        refused, _ = await kv_load(await bus.kv(subjects.KV_DATASETS), KEY, DatasetRecord)
        assert refused is not None and refused.status.phase == "Failed", refused
        assert "names an object, not a folder" in refused.status.message
        # A failed listing of the spec is no proof it was a folder: a resync asks again, and refuses again.
        failed = await resync(6)
        assert heads()[2:] == [f"/{bucket}/dir/model.bin"]
        assert failed.status.phase == "Failed" and "names an object, not a folder" in failed.status.message
    finally:
        await proxy.stop()


async def test_a_local_mount_naming_a_file_fails_the_dataset_with_how_to_mount_it(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    root = tmp_path / "data"
    tree(root)
    record = await sync_of(bus, nats_server, f"local://{root}/good.txt")
    assert record.status.phase == "Failed", record.status
    assert record.status.message == (
        f"mount local://{root}/good.txt names a file, not a folder: mount its folder local://{root}/ instead (a "
        "mount is always a folder, every file below it in the dataset; to have this file alone, put it in a "
        "folder of its own and mount that)"), record.status.message


async def test_a_missing_secret_says_when_no_folder_of_secrets_is_set(bus: Bus, nats_server: NatsServer) -> None:
    """Without SHOAL_SECRETS_DIR no key can be found (`shoal up` sets none): "secret 's3-creds' has no key 'id'"
    alone sent a Fluid user looking for a typo in a Secret that was never read."""
    unset = await sync_of(bus, nats_server, "s3://bucket/", encrypt_options=credentials_from("s3-creds"))
    assert unset.status.phase == "Failed", unset.status
    assert unset.status.message == (
        "mount s3://bucket/: secret 's3-creds' has no key 'id' (needed for aws.accessKeyId); SHOAL_SECRETS_DIR is not "
        "set, so no secret is read: set it, for the dataset service and the agents, to the folder holding the "
        "secrets as <namespace>/<secret>/<key> files")


async def test_a_missing_secret_in_the_folder_of_secrets_says_where_it_was_looked_for(
        bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    """With SHOAL_SECRETS_DIR set, the key is what is missing: the message said only that, not where Shoal reads
    secrets from; it names the paths looked at and where to write the key (a path, never a secret's value)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    absent = await sync_of(bus, nats_server, "s3://bucket/", encrypt_options=credentials_from("s3-creds"),
                           secrets_dir=str(secrets))
    assert absent.status.message == (
        f"mount s3://bucket/: secret 's3-creds' has no key 'id' (needed for aws.accessKeyId); looked for "
        f"{secrets}/default/s3-creds/id and {secrets}/s3-creds/id and {secrets}/s3-creds.id: write the key to "
        f"{secrets}/default/s3-creds/id (SHOAL_SECRETS_DIR/<namespace>/<secret>/<key>)")


@contextlib.asynccontextmanager
async def answering(status: int, body: bytes, content_type: str = "application/xml") -> AsyncIterator[str]:
    """A web server at a loopback port that answers every request with ``status`` and ``body``: its URL."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [400, 503])
async def test_an_endpoint_answering_a_huge_error_fails_the_dataset_with_a_short_message(
        bus: Bus, nats_server: NatsServer, status: int) -> None:
    """A hostile or broken endpoint's error text (2 MB here) is cut: the status stays a record NATS accepts."""
    huge = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>Weird</Code><Message>' + b"A" * 2_000_000
            + b"</Message></Error>")
    async with answering(status, huge) as endpoint:
        record = await sync_of(bus, nats_server, "s3://bucket/data/", options={"endpoint": endpoint})
    assert record.status.phase == "Failed", record.status
    message = record.status.message
    assert message.startswith(f"cannot list s3://bucket/data/: S3 list of bucket 'bucket' at {endpoint} failed: "
                              "Weird AAAA"), message[:300]
    assert len(message) <= 2000 and message.endswith("…"), (len(message), message[-100:])
    assert condition(record, CONDITION_SYNCED) == ("False", message)


async def test_an_endpoint_answering_a_web_page_fails_the_dataset_rather_than_listing_nothing(
        bus: Bus, nats_server: NatsServer) -> None:
    """A web page at the endpoint (a console, a proxy's page) is no empty bucket: the dataset fails, with a hint."""
    page = b"<html><head><title>Console</title></head><body><p>Sign in</p></body></html>"
    async with answering(200, page, "text/html") as endpoint:
        record = await sync_of(bus, nats_server, "s3://bucket/data/", options={"endpoint": endpoint})
    assert record.status.phase == "Failed", record.status
    assert record.status.message == (
        f"cannot list s3://bucket/data/: S3 endpoint {endpoint} did not answer the listing of bucket 'bucket' with "
        "an S3 listing (it sent 'text/html'): check that the endpoint is the store's S3 API, not a web page or "
        "console"), record.status.message
    assert not record.status.manifest and record.status.file_num == 0


# A ListObjectsV2 answer cut short on the way: its first 263 bytes, ending inside a tag.
CUT_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
               b"<Name>bucket</Name><Prefix>data/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"
               b"<IsTruncated>false</IsTruncated><Contents><Key>data/a.txt</Key><LastModi")


@pytest.mark.parametrize(("body", "content_type", "said"), [
    (CUT_LISTING, "application/xml",
     "it stops mid-XML after 263 bytes (unclosed token: line 2, column 215), cut short on the way"),
    (b"upstream connect error " * 100_000, "text/plain",
     "2300000 bytes of 'text/plain' that are not well-formed XML (syntax error: line 1, column 0): check that the "
     "endpoint is the store's S3 API"),
    (b'<?xml version="1.0" encoding="klingon"?><ListBucketResult>', "application/xml",
     "58 bytes of 'application/xml' that are not well-formed XML (unknown encoding: klingon): check that the "
     "endpoint is the store's S3 API"),
], ids=["cut-listing", "not-xml", "unknown-encoding"])
async def test_a_listing_answer_that_does_not_parse_says_so_rather_than_a_bare_500(
        bus: Bus, nats_server: NatsServer, body: bytes, content_type: str, said: str) -> None:
    """botocore turns such a 200 into a 500 to retry it and keeps no word of the body: the status said only
    "500 Internal Server Error". It says what the answer was, briefly, and is retried like any 500."""
    async with answering(200, body, content_type) as endpoint:
        record = await sync_of(bus, nats_server, "s3://bucket/data/", options={"endpoint": endpoint})
    assert record.status.phase == "Failed", record.status
    assert record.status.message == (f"cannot list s3://bucket/data/: S3 list of bucket 'bucket' at {endpoint} "
                                     f"failed: the store's listing answer could not be parsed: {said}")
    assert next(c for c in record.status.conditions if c.type == CONDITION_SYNCED).reason == REASON_UNREACHABLE
    assert "listing-test-secret" not in record.status.message


async def test_a_listing_answer_whose_connection_closes_mid_body_says_so(bus: Bus, nats_server: NatsServer) -> None:
    """The same cut listing with a Content-Length it never reaches, then a closed connection: not "connection
    failed (ConnectionClosedError)"."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: 5000\r\n\r\n"
                     + CUT_LISTING)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        record = await sync_of(bus, nats_server, "s3://bucket/data/", options={"endpoint": endpoint})
    finally:
        server.close()
        await server.wait_closed()
    assert record.status.message == (f"cannot list s3://bucket/data/: cannot reach S3 endpoint {endpoint}: the "
                                     "connection was closed before a whole answer came"), record.status.message
    assert next(c for c in record.status.conditions if c.type == CONDITION_SYNCED).reason == REASON_UNREACHABLE


@contextlib.asynccontextmanager
async def dripping() -> AsyncIterator[str]:
    """An endpoint that starts a 200 answer and then sends one byte every 0.2 s, for ever: no read ever waits long
    enough to time out, and the answer never ends. Its URL."""
    serving: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        serving.add(asyncio.current_task())  # type: ignore[arg-type]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: 1000000\r\n\r\n")
        try:
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.2)  # the pace of the drip, not a wait for anything
        except (ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await server.wait_closed()


async def test_an_endpoint_that_answers_a_byte_at_a_time_fails_the_sync_within_its_page_time(
        bus: Bus, nats_server: NatsServer) -> None:
    """Each read gets a byte in time, so no read timeout fires: the page time (SHOAL_SYNC_PAGE_SECONDS) ends the
    listing, the store counts as unreachable (tried again later) and the dataset says so."""
    async with dripping() as endpoint:
        record = await sync_of(bus, nats_server, "s3://bucket/data/", options={"endpoint": endpoint},
                               sync_page_seconds=1.0)
    assert record.status.phase == "Failed", record.status
    assert record.status.message == ("cannot list s3://bucket/data/: no listing page within 1 s "
                                     "(SHOAL_SYNC_PAGE_SECONDS): the store answers too slowly, or not at all")
    assert condition(record, CONDITION_SYNCED) == ("False", record.status.message)
    assert next(c for c in record.status.conditions if c.type == CONDITION_SYNCED).reason == REASON_UNREACHABLE
