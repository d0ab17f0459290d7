"""S3ObjectStore against a real SeaweedFS S3 gateway: listing, HEAD, ranged reads, and the errors people see."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import time
import traceback
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from libs.config import Secret
from libs.ufs import (
    AccessDenied,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    S3Clients,
    S3Location,
    S3ObjectStore,
    UfsError,
    open_store,
    s3,
)
from services.agent.reader import StoreGate
from tests.conftest import SeaweedServer, put_objects
from tests.faults import FaultyStoreProxy, HttpProxy, answering
from tests.helpers import spans_in_memory

WRONG_SECRET = "wrong-secret-Zq9xK2vLp"


async def collect(store: S3ObjectStore, page_size: int = 1000) -> list[ObjectInfo]:
    return [info async for info in store.list(page_size)]


def md5(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


async def test_list_pages_through_every_object(seaweedfs: SeaweedServer, bucket: str) -> None:
    objects = {f"data/part-{i:04d}.bin": bytes([i % 256]) * (i + 1) for i in range(250)}
    await put_objects(seaweedfs, bucket, objects)
    async with S3ObjectStore(seaweedfs.location(bucket, "data")) as store:
        # Count the requests, so a server ignoring MaxKeys cannot pass for pagination.
        client = await store._s3()
        calls: list[dict[str, Any]] = []
        original = client.list_objects_v2

        async def counting(**kwargs: Any) -> Any:
            calls.append(kwargs)
            return await original(**kwargs)

        client.list_objects_v2 = counting
        listed = await collect(store, page_size=100)

    assert len(calls) == 3
    assert all(call["MaxKeys"] == 100 for call in calls)
    assert sorted(info.key for info in listed) == sorted(key.removeprefix("data/") for key in objects)
    assert len(listed) == 250
    for info in listed:
        body = objects["data/" + info.key]
        assert info.size == len(body)
        assert info.etag == md5(body)
        assert abs(info.mtime - time.time()) < 600


async def test_prefix_is_a_folder_and_markers_are_listed_as_folders(seaweedfs: SeaweedServer, bucket: str) -> None:
    # Markers first, as a console's "Create folder" comes before the uploads: SeaweedFS may drop a marker PUT at
    # the same moment as a PUT below it (the folder it creates for the object wins; seen once in CI).
    await put_objects(seaweedfs, bucket, {"train/": b"", "train/sub/": b""}, concurrency=1)
    await put_objects(seaweedfs, bucket, {"train/a.txt": b"a", "train/sub/b.txt": b"bb", "trainx/c": b"c", "top": b"t"})
    # The prefix's own marker is the mount's folder, not something in it; other markers end in '/'.
    for prefix in ("train", "train/", "/train"):
        async with S3ObjectStore(seaweedfs.location(bucket, prefix)) as store:
            assert sorted(info.key for info in await collect(store)) == ["a.txt", "sub/", "sub/b.txt"], prefix
    async with S3ObjectStore(seaweedfs.location(bucket)) as store:
        everything = sorted(info.key for info in await collect(store))
    assert everything == ["top", "train/", "train/a.txt", "train/sub/", "train/sub/b.txt", "trainx/c"]


async def test_empty_bucket_lists_nothing(seaweedfs: SeaweedServer, bucket: str) -> None:
    async with S3ObjectStore(seaweedfs.location(bucket, "nothing-here")) as store:
        assert await collect(store) == []


async def test_awkward_key_characters_round_trip(seaweedfs: SeaweedServer, bucket: str) -> None:
    keys = ["p/a b+c%25.txt", "p/ünï.txt", "p/x?y&z=1#h"]
    await put_objects(seaweedfs, bucket, {key: key.encode() for key in keys})
    async with S3ObjectStore(seaweedfs.location(bucket, "p")) as store:
        listed = {info.key: info for info in await collect(store)}
        assert sorted(listed) == sorted(key.removeprefix("p/") for key in keys)
        for key, info in listed.items():
            assert (await store.head(key)).etag == info.etag
            assert await store.get_range(key, 0, 100, etag=info.etag) == ("p/" + key).encode()


async def test_pages_ending_on_a_key_xml_cannot_carry_lose_nothing(seaweedfs: SeaweedServer, bucket: str) -> None:
    # SeaweedFS writes such a key into its continuation token as U+FFFD (the rest of the folder was skipped).
    # "p/\x01c" is a file and a folder: SeaweedFS resumes after it in its folder only when told "p/\x01c/" (its
    # token says so); StartAfter "p/\x01c" skipped "p/\x01c/d", without a word.
    keys = ["p/\x01a", "p/\x01b", "p/\x01c", "p/\x01c/d", "p/\x7f", "p/\x1f/x", "p/a", "p/z", "q/\x0b", "q/y"]
    await put_objects(seaweedfs, bucket, dict.fromkeys(keys, b"x"))
    for page_size in (1, 2, 3):
        async with S3ObjectStore(seaweedfs.location(bucket)) as store:
            listed = [info.key async for info in store.list(page_size=page_size)]
        assert sorted(listed) == sorted(keys), page_size


async def test_head(seaweedfs: SeaweedServer, bucket: str) -> None:
    body = b"hello world"
    await put_objects(seaweedfs, bucket, {"set/greeting.txt": body})
    async with S3ObjectStore(seaweedfs.location(bucket, "set")) as store:
        info = await store.head("greeting.txt")
        assert (info.key, info.size, info.etag) == ("greeting.txt", len(body), md5(body))
        assert abs(info.mtime - time.time()) < 600
        listed = await collect(store)
        assert [(item.key, item.size, item.etag) for item in listed] == [(info.key, info.size, info.etag)]
        with pytest.raises(NoSuchKey, match=re.escape(f"'set/missing.txt' does not exist in bucket '{bucket}'")):
            await store.head("missing.txt")
        # A key with quotes and a line break is named quoted, as every message names keys: one unambiguous token.
        odd = 'a "b"\nc\'d'
        with pytest.raises(NoSuchKey) as raised:
            await store.head(odd)
        assert str(raised.value).startswith(f"object {'set/' + odd!r} does not exist in bucket '{bucket}'")
        assert "\n" not in str(raised.value)


async def test_ranged_reads(seaweedfs: SeaweedServer, bucket: str) -> None:
    body = bytes(range(256)) * 4
    await put_objects(seaweedfs, bucket, {"blob": body, "empty": b""})
    async with S3ObjectStore(seaweedfs.location(bucket)) as store:
        etag = (await store.head("blob")).etag
        assert await store.get_range("blob", 100, 50) == body[100:150]
        assert await store.get_range("blob", 100, 50, etag=etag) == body[100:150]
        assert await store.get_range("blob", 0, len(body), etag=etag) == body
        assert await store.get_range("blob", 1000, 100, etag=etag) == body[1000:]  # tail past the end
        assert await store.get_range("blob", len(body), 10, etag=etag) == b""  # starts at the end
        assert await store.get_range("blob", len(body) + 5, 10) == b""
        assert await store.get_range("blob", 10, 0, etag=etag) == b""
        assert await store.get_range("empty", 0, 10) == b""
        with pytest.raises(NoSuchKey):
            await store.get_range("missing", 0, 10)
        with pytest.raises(ValueError):
            await store.get_range("blob", -1, 10)


async def test_ranged_reads_into_a_buffer(seaweedfs: SeaweedServer, bucket: str) -> None:
    body = os.urandom(3 * 1024 * 1024 + 5)  # several pieces of aiohttp's buffer
    await put_objects(seaweedfs, bucket, {"big": body, "x/obj": b"first version"})
    async with S3ObjectStore(seaweedfs.location(bucket)) as store:
        etag = (await store.head("big")).etag
        into = bytearray(len(body) + 7)
        assert await store.get_range_into("big", 0, memoryview(into)[:len(body)], etag=etag) == len(body)
        assert bytes(into[:len(body)]) == body
        view = memoryview(into)[3:3 + 1000]
        assert await store.get_range_into("big", 12345, view, etag=etag) == 1000
        assert bytes(view) == body[12345:13345]
        # The tail: fewer bytes than asked for.
        assert await store.get_range_into("big", len(body) - 10, memoryview(into)[:100], etag=etag) == 10
        assert bytes(into[:10]) == body[-10:]
        old = (await store.head("x/obj")).etag
        await put_objects(seaweedfs, bucket, {"x/obj": b"second version"})
        with pytest.raises(ObjectChanged):
            await store.get_range_into("x/obj", 0, memoryview(into)[:5], etag=old)


async def test_overwritten_object_is_object_changed(seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"x/obj": b"first version"})
    async with S3ObjectStore(seaweedfs.location(bucket, "x")) as store:
        old = (await store.head("obj")).etag
        await put_objects(seaweedfs, bucket, {"x/obj": b"second, longer version"})
        new = (await store.head("obj")).etag
        assert new != old
        changed = re.escape(f"'x/obj' in bucket '{bucket}'") + ".*" + re.escape(f"no longer {old}")
        with pytest.raises(ObjectChanged, match=changed):
            await store.get_range("obj", 0, 5, etag=old)
        # Past the end the server answers 416 before looking at If-Match; the ETag is still checked.
        with pytest.raises(ObjectChanged):
            await store.get_range("obj", 1000, 5, etag=old)
        assert await store.get_range("obj", 0, 6, etag=new) == b"second"


def count_full_client_gets(client: Any) -> list[dict[str, Any]]:
    """Record calls of the botocore client's get_object: reads should not need it (pre-signed URLs)."""
    calls: list[dict[str, Any]] = []
    original = client.get_object

    async def counting(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return await original(**kwargs)

    client.get_object = counting
    return calls


async def test_overwritten_between_listing_and_read_is_object_changed(seaweedfs: SeaweedServer,
                                                                      bucket: str) -> None:
    body = b"listed version " * 100
    await put_objects(seaweedfs, bucket, {"d/obj": body})
    async with S3ObjectStore(seaweedfs.location(bucket, "d")) as store:
        full_client_gets = count_full_client_gets(await store._s3())
        (listed,) = await collect(store)
        assert await store.get_range("obj", 0, 100, etag=listed.etag) == body[:100]
        await put_objects(seaweedfs, bucket, {"d/obj": b"overwritten after the listing " * 100})
        for start, length in ((0, 100), (500, 700), (0, len(body))):
            with pytest.raises(ObjectChanged, match=re.escape(f"no longer {listed.etag}")):
                await store.get_range("obj", start, length, etag=listed.etag)
        # Answered on the pre-signed path, from the server's 412, not by falling back to the full client.
        assert full_client_gets == []


async def test_keys_with_reserved_characters_are_read_on_the_presigned_path(seaweedfs: SeaweedServer,
                                                                          bucket: str) -> None:
    # Hive-style partitions ("year=2024/") and the other characters botocore percent-encodes in a signed path but
    # a URL library may decode again before sending it (which breaks the signature).
    keys = ["year=2024/month=01/part-0.parquet", *(f"odd{char}name.bin" for char in "!$&'()*,;=@:+ ~%#?")]
    objects = {key: f"body of {key}".encode() * 50 for key in keys}
    await put_objects(seaweedfs, bucket, objects)
    async with S3ObjectStore(seaweedfs.location(bucket)) as store:
        full_client_gets = count_full_client_gets(await store._s3())
        listed = {info.key: info.etag for info in await collect(store)}
        assert listed.keys() == objects.keys()
        for key, body in objects.items():
            assert await store.get_range(key, 3, 100, etag=listed[key]) == body[3:103], key
            into = memoryview(bytearray(len(body)))
            assert await store.get_range_into(key, 0, into, etag=listed[key]) == len(body), key
            assert bytes(into) == body, key
        # Each read was one GET of the pre-signed URL, none refused and sent again through the full client.
        assert [call["Key"] for call in full_client_gets] == []


def count_client_presigns(client: Any) -> list[str]:
    """Record the keys the botocore client pre-signs."""
    keys: list[str] = []
    original = client.generate_presigned_url

    async def counting(operation: str, Params: dict[str, Any], **kwargs: Any) -> Any:
        keys.append(Params["Key"])
        return await original(operation, Params=Params, **kwargs)

    client.generate_presigned_url = counting
    return keys


async def test_hot_reads_sign_their_urls_without_the_client_once_it_agreed_on_one(seaweedfs: SeaweedServer,
                                                                                  bucket: str) -> None:
    # The client's presign costs ~0.4 ms of CPU per key, paid once per small file a cold read touches. The client
    # signs one probe key; keys after it are signed by libs.ufs.presign, and the server takes every one of them.
    keys = ["year=2024/part-0.parquet", "dir/with space/ü.bin", "plus+sign", "pct%20.bin", *(f"k{i}" for i in range(9))]
    objects = {key: f"body of {key}".encode() * 20 for key in keys}
    async with S3ObjectStore(seaweedfs.location(bucket, prefix="pre fix")) as store:
        presigned = count_client_presigns(await store._s3())
        await put_objects(seaweedfs, bucket, {f"pre fix/{key}": body for key, body in objects.items()})
        for key, body in objects.items():
            info = await store.head(key)
            assert await store.get_range(key, 1, 50, etag=info.etag) == body[1:51], key
        assert [key.split("/")[0] for key in presigned] == ["shoal-presign-probe"], presigned


async def test_credentials_from_the_environment_are_left_to_the_client_to_sign(
        seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore's chain may refresh such credentials (roles, IRSA): only the client knows when, so it signs each key.
    await put_objects(seaweedfs, bucket, {"a": b"alpha", "b": b"beta"})
    location = seaweedfs.location(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", location.access_key_id.reveal())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", location.secret_access_key.reveal())
    chained = dataclasses.replace(location, access_key_id=Secret(""), secret_access_key=Secret(""))
    async with S3ObjectStore(chained) as store:
        presigned = count_client_presigns(await store._s3())
        for key, body in {"a": b"alpha", "b": b"beta"}.items():
            assert await store.get_range(key, 0, len(body)) == body
        assert presigned == ["a", "b"]


@pytest.fixture
async def if_match_ignored(seaweedfs: SeaweedServer):
    """SeaweedFS behind a proxy that drops If-Match: a store that ignores conditional GETs."""
    proxy = HttpProxy(seaweedfs.endpoint, strip_if_match=True)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def test_object_changed_even_if_the_server_ignores_if_match(seaweedfs: SeaweedServer, bucket: str,
                                                                  if_match_ignored: HttpProxy) -> None:
    await put_objects(seaweedfs, bucket, {"obj": b"one"})
    location = dataclasses.replace(seaweedfs.location(bucket), endpoint_url=if_match_ignored.endpoint)
    async with S3ObjectStore(location) as store:
        old = (await collect(store))[0].etag
        assert await store.get_range("obj", 0, 3, etag=old) == b"one"
        await put_objects(seaweedfs, bucket, {"obj": b"two"})
        full_client_gets = count_full_client_gets(await store._s3())
        with pytest.raises(ObjectChanged):
            await store.get_range("obj", 0, 3, etag=old)
        assert full_client_gets == []
    # Every ranged GET asked for the ETag it expected, even though this server does not look.
    gets = [headers for headers in if_match_ignored.requests if "Range" in headers]
    assert len(gets) == 2
    assert all(headers.get("If-Match") == f'"{old}"' for headers in gets)


async def test_missing_bucket(seaweedfs: SeaweedServer) -> None:
    location = seaweedfs.location("no-such-bucket-here")
    async with S3ObjectStore(location) as store:
        expected = re.escape(f"bucket 'no-such-bucket-here' does not exist at {seaweedfs.endpoint}")
        with pytest.raises(NoSuchBucket, match=expected):
            await collect(store)
        with pytest.raises(NoSuchBucket, match=expected):
            await store.head("key")
        with pytest.raises(NoSuchBucket, match=expected):
            await store.get_range("key", 0, 10)


@pytest.mark.parametrize("bad_key_id", [False, True], ids=["wrong-secret", "unknown-key-id"])
async def test_bad_credentials_are_access_denied_without_leaking(
    seaweedfs: SeaweedServer, bucket: str, bad_key_id: bool
) -> None:
    await put_objects(seaweedfs, bucket, {"obj": b"data"})
    location = dataclasses.replace(seaweedfs.location(bucket), secret_access_key=Secret(WRONG_SECRET))
    if bad_key_id:
        location = dataclasses.replace(location, access_key_id=Secret("nobody-knows-this-key"))
    async with S3ObjectStore(location) as store:
        assert WRONG_SECRET not in repr(store)
        assert WRONG_SECRET not in repr(location)
        errors: list[AccessDenied] = []
        for call in (lambda: collect(store), lambda: store.head("obj"), lambda: store.get_range("obj", 0, 2)):
            with pytest.raises(AccessDenied) as caught:
                await call()
            errors.append(caught.value)
    for err in errors:
        assert f"access denied to bucket '{bucket}' at {seaweedfs.endpoint}" in str(err)
        for secret in (WRONG_SECRET, "nobody-knows-this-key", seaweedfs.config.secret_access_key):
            assert secret not in str(err)
            assert secret not in repr(err)
            assert secret not in str(err.__cause__)
        assert not err.retryable
    hint = "access key id" if bad_key_id else "secret access key"
    assert hint in str(errors[0])


@pytest.mark.timeout(30)
async def test_unreachable_endpoint(seaweedfs: SeaweedServer, refused_port: int) -> None:
    endpoint = f"http://127.0.0.1:{refused_port}"
    location = dataclasses.replace(seaweedfs.location("any-bucket"), endpoint_url=endpoint)
    async with S3ObjectStore(location) as store:
        with pytest.raises(EndpointUnreachable) as caught:
            await collect(store)
        with pytest.raises(EndpointUnreachable):
            await store.get_range("key", 0, 1)
    assert str(caught.value) == f"cannot reach S3 endpoint {endpoint}: connection refused"
    assert caught.value.retryable
    assert seaweedfs.config.secret_access_key not in str(caught.value)


async def test_open_store_and_reuse_after_close(seaweedfs: SeaweedServer, bucket: str) -> None:
    await put_objects(seaweedfs, bucket, {"k": b"v"})
    location = seaweedfs.location(bucket)
    store = open_store(location)
    assert isinstance(store, S3ObjectStore)
    assert "Secret" not in repr(store) and seaweedfs.config.secret_access_key not in repr(store)
    try:
        assert (await store.head("k")).size == 1
        await store.close()
        await store.close()  # idempotent
        assert await store.get_range("k", 0, 1) == b"v"  # a new client after close
    finally:
        await store.close()


def test_errors_are_ufs_errors() -> None:
    for kind in (AccessDenied, EndpointUnreachable, NoSuchBucket, NoSuchKey, ObjectChanged):
        assert issubclass(kind, UfsError)
    assert S3Location(bucket="b").secret_access_key == Secret("")


async def test_a_ranged_get_cut_mid_answer_is_sent_again_and_never_marks_the_store_unreachable(
        seaweedfs: SeaweedServer, bucket: str) -> None:
    body = os.urandom(3 * 1024 * 1024)
    await put_objects(seaweedfs, bucket, {"blob": body})
    proxy = FaultyStoreProxy(seaweedfs.endpoint)
    await proxy.start()
    try:
        async with S3ObjectStore(seaweedfs.location(bucket)) as direct:  # the proxy is for block reads only
            etag = (await direct.head("blob")).etag
        location = dataclasses.replace(seaweedfs.location(bucket), endpoint_url=proxy.endpoint)
        async with S3ObjectStore(location) as store:
            proxy.cuts = 1
            assert await store.get_range("blob", 1000, 2_000_000, etag=etag) == body[1000:2_001_000]
            proxy.cuts = 1
            into = bytearray(2_000_000)
            assert await store.get_range_into("blob", 5, memoryview(into), etag=etag) == len(into)
            assert bytes(into) == body[5:2_000_005]
            assert proxy.injected == 2
            proxy.cuts = 2  # cut twice in a row: that read fails, as a retryable error of that read
            with pytest.raises(UfsError) as raised:
                await store.get_range("blob", 0, 1_000_000, etag=etag)
            assert not isinstance(raised.value, EndpointUnreachable) and raised.value.retryable
            assert "cut mid-answer" in str(raised.value)
            assert await store.get_range("blob", 0, 10, etag=etag) == body[:10]  # the next read just works
    finally:
        await proxy.stop()


async def test_a_ranged_get_answered_with_more_than_the_range_reads_only_the_range() -> None:
    # An endpoint that ignores Range (200 with the whole object) or never ends its body: a 10-byte read used to
    # read (and hold) the whole body first; it now reads up to its range. More than asked in a 206 is refused.
    async def answer(request: web.Request) -> web.StreamResponse:
        status = 206 if "partial" in request.path else 200
        response = web.StreamResponse(status=status, headers={"ETag": '"e"'})
        await response.prepare(request)
        await response.write(bytes(range(100)))
        while True:
            await response.write(b"x" * 65536)

    async with answering(answer) as url:
        location = S3Location(bucket="b", endpoint_url=url, access_key_id=Secret("AKIDEXAMPLE"),
                              secret_access_key=Secret("not-a-real-secret"))
        async with S3ObjectStore(location) as store:
            assert await asyncio.wait_for(store.get_range("whole", 5, 10, etag="e"), 10) == bytes(range(5, 15))
            into = bytearray(10)
            assert await asyncio.wait_for(store.get_range_into("whole", 5, memoryview(into), etag="e"), 10) == 10
            assert bytes(into) == bytes(range(5, 15))
            with pytest.raises(UfsError, match="more than the 10 bytes asked for"):
                await asyncio.wait_for(store.get_range("partial", 5, 10, etag="e"), 10)


async def test_prepare_readies_the_client_so_the_first_read_opens_none(
        seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A mount calls prepare while it starts: botocore's import and model parsing (about half a second of CPU) must
    # not wait for the first read or load. Every store of the process opens its client from the one session.
    await put_objects(seaweedfs, bucket, {"model.bin": bytes(range(256)) * 64})
    session = s3.shared_session()
    opened: list[str] = []
    create_client = session.create_client

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0] if args else kwargs["service_name"])
        return create_client(*args, **kwargs)

    monkeypatch.setattr(session, "create_client", counting)
    async with S3ObjectStore(seaweedfs.location(bucket)) as first, S3ObjectStore(seaweedfs.location(bucket)) as second:
        await first.prepare()
        assert opened == ["s3"]
        info = await first.head("model.bin")
        assert await first.get_range("model.bin", 10, 20, etag=info.etag) == (bytes(range(256)) * 64)[10:30]
        assert opened == ["s3"], "the first read opened another client"
        assert await second.get_range("model.bin", 0, 4, etag=info.etag) == bytes(range(4))
        assert opened == ["s3", "s3"], "a store's client comes from the process's one session"


async def test_stores_of_one_location_share_a_pooled_client_until_it_is_idle(
        seaweedfs: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await put_objects(seaweedfs, bucket, {"a/x": b"x", "b/y": b"yy"})
    now = [0.0]
    clients = S3Clients(clock=lambda: now[0])
    made: list[object] = []
    session = s3.shared_session()
    create_client = session.create_client

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs.get("aws_access_key_id"))
        return create_client(*args, **kwargs)

    monkeypatch.setattr(session, "create_client", counting)
    try:
        # Two stores of the bucket (prefixes differ: the client is the endpoint's and the credentials'), at once.
        first = S3ObjectStore(seaweedfs.location(bucket, "a"), clients=clients)
        second = S3ObjectStore(seaweedfs.location(bucket, "b"), clients=clients)
        assert [i.key for i in await collect(first)] == ["x"]
        assert [i.key for i in await collect(second)] == ["y"]
        assert len(made) == 1 and len(clients) == 1
        await first.close()
        await second.close()
        # Given back, kept for the next store (the dataset's next sync) while not idle for long.
        third = S3ObjectStore(seaweedfs.location(bucket, "a"), clients=clients)
        assert [i.key for i in await collect(third)] == ["x"]
        assert len(made) == 1
        await third.close()
        # Other credentials are another client, and a wrong secret is told as before, never shared.
        wrong = dataclasses.replace(seaweedfs.location(bucket), secret_access_key=Secret(WRONG_SECRET))
        async with S3ObjectStore(wrong, clients=clients) as store:
            with pytest.raises(AccessDenied):
                await collect(store)
        assert len(made) == 2 and len(clients) == 2
        # Idle past IDLE_CLIENT_SECONDS: closed at the next lease or return; a store in use keeps its own.
        now[0] += s3.IDLE_CLIENT_SECONDS
        async with S3ObjectStore(seaweedfs.location(bucket, "b"), clients=clients) as store:
            assert [i.key for i in await collect(store)] == ["y"]
            assert len(clients) == 1 and len(made) == 3
    finally:
        await clients.close()
    assert len(clients) == 0


async def test_the_full_clients_ranged_get_reads_only_the_range_too() -> None:
    # An answer the pre-signed GET does not take (a 503 here: any status but 200, 206 and 412) sends the read
    # through the S3 client, which used to read the whole body: from a store that ignores Range, a 100 KB read
    # of a 64 MiB object took all 64 MiB into memory. It now reads up to its range, as the pre-signed GET does.
    size, start, length = 64 * 1024 * 1024, 1000, 100_000
    piece = bytes(range(256)) * 256  # 64 KiB: the object's byte at offset i is i % 256
    sent: dict[str, int] = {}
    done = {name: asyncio.Event() for name in ("whole", "partial")}

    async def answer(request: web.Request) -> web.StreamResponse:
        if "Authorization" not in request.headers:  # the pre-signed GET (signed in its query)
            return web.Response(status=503, text="the pre-signed GET is not answered")
        name = request.path.rsplit("/", 1)[-1]
        partial = name == "partial"
        headers = {"ETag": '"e"'}
        if partial:  # a 206 for the range, then more than the range (chunked: no length to stop the client)
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
        else:
            headers["Content-Length"] = str(size)
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        await response.prepare(request)
        sent[name] = 0
        try:
            offset = start if partial else 0
            while sent[name] < size:
                await response.write(piece[offset % 256:] + piece[:offset % 256])
                sent[name] += len(piece)
                offset += len(piece)
        except (ConnectionError, OSError):
            pass  # the client closed the connection: it read what it wanted
        finally:
            done[name].set()
        return response

    async with answering(answer) as url:
        location = S3Location(bucket="b", endpoint_url=url, access_key_id=Secret("AKIDEXAMPLE"),
                              secret_access_key=Secret("not-a-real-secret"))
        async with S3ObjectStore(location, max_attempts=1) as store:
            data = await asyncio.wait_for(store.get_range("whole", start, length, etag="e"), 30)
            assert data == bytes((start + i) % 256 for i in range(length))
            await asyncio.wait_for(done["whole"].wait(), 30)
            # What the range needs, plus what loopback's socket buffers and aiohttp's took before the close.
            assert sent["whole"] <= 24 * 1024 * 1024, f"{sent['whole']:,} bytes sent for a {length:,}-byte read"
            with pytest.raises(UfsError, match=f"more than the {length} bytes asked for"):
                await asyncio.wait_for(store.get_range("partial", start, length, etag="e"), 30)
            await asyncio.wait_for(done["partial"].wait(), 30)
            assert sent["partial"] <= 24 * 1024 * 1024


def traced(spans: tuple[ReadableSpan, ...]) -> str:
    """Every attribute of every span and span event (an exception event's message and traceback among them)."""
    every = [attributes for span in spans for attributes in (span.attributes, *(e.attributes for e in span.events))]
    return "\n".join(str(value) for attributes in every for value in (attributes or {}).values())


async def read_in_a_trace(store: S3ObjectStore) -> tuple[UfsError, str]:
    """A failing read through the agent's store gate inside a trace: the error, and what the trace and a logged
    traceback of it would show."""
    with spans_in_memory() as exporter:
        with trace.get_tracer(__name__).start_as_current_span("read"), pytest.raises(UfsError) as caught:
            await asyncio.wait_for(StoreGate(store).get_range("data.bin", 0, 10, etag="e"), 20)
        shown = traced(exporter.get_finished_spans())
    assert "Traceback" in shown, "the store GET span recorded the exception"
    return caught.value, shown + "".join(traceback.format_exception(caught.value))


@pytest.mark.parametrize("failure", ["redirected for ever", "connection timeout"])
async def test_a_failed_presigned_get_leaves_no_signed_url_in_a_trace_or_traceback(failure: str) -> None:
    """aiohttp's error for a pre-signed GET quotes its URL ("Connection timeout to host http://...?X-Amz-...",
    TooManyRedirects' url=...): the UfsError's message never did, but it chained aiohttp's error as its cause, which
    the store GET span's exception event and any logged traceback write whole: a ticket to the object, and the
    access key id, in the trace."""
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(str(request.rel_url))

    async with answering(redirect) as url:
        location = S3Location(bucket="b", endpoint_url=url, access_key_id=Secret("AKIDPLANTED123"),
                              secret_access_key=Secret("not-a-real-secret"))
        # A connection within a nanosecond never opens: aiohttp's own connect timeout, as a store that drops SYNs.
        connect_timeout = 1e-9 if failure == "connection timeout" else 2.0
        async with S3ObjectStore(location, max_attempts=1, connect_timeout=connect_timeout) as store:
            err, shown = await read_in_a_trace(store)
    assert isinstance(err, EndpointUnreachable)
    assert ("TooManyRedirects" if failure == "redirected for ever" else "ConnectionTimeoutError") in shown
    if failure == "connection timeout":  # aiohttp's connect timeout said as one, not as a read's
        assert "no connection within" in str(err) and "no answer within" not in str(err), str(err)
    assert "AKIDPLANTED123" not in shown
    assert re.findall(r"(?:Signature|Credential|AWSAccessKeyId)=[^*]", shown) == []


async def test_a_store_quoting_the_request_leaves_no_signature_in_a_trace_or_traceback(
        seaweedfs: SeaweedServer, bucket: str) -> None:
    """A store (or proxy) whose error message quotes the request, its Authorization header included: the UfsError's
    message hid the signing values, but the ClientError it chained (shown in the span's exception event and any
    logged traceback) quoted them as the store sent them."""
    await put_objects(seaweedfs, bucket, {"data.bin": b"0123456789" * 10})
    proxy = FaultyStoreProxy(seaweedfs.endpoint)
    await proxy.start()
    try:
        proxy.quote, proxy.always = "and nothing else", 400
        location = dataclasses.replace(seaweedfs.location(bucket), endpoint_url=proxy.endpoint)
        async with S3ObjectStore(location, max_attempts=1) as store:
            err, shown = await read_in_a_trace(store)
    finally:
        await proxy.stop()
    assert "Authorization" in str(err) and "ClientError" in shown  # the quote, and its cause's kind, are kept
    assert seaweedfs.config.secret_access_key not in shown  # its key id ("shoal") is too short to look for
    assert re.findall(r"(?:Signature|Credential|AWSAccessKeyId)=[^*]", shown) == []
