"""The S3 object store: listing, HEAD and ranged GET of one bucket prefix through aiobotocore.

This module owns all S3 network I/O and decides how botocore's failures become ``UfsError``s: each message
names the bucket and endpoint and says what to check, and never contains a credential. One client per store
is opened on first use (or by ``prepare()``) and closed by ``close()``; every client of a process comes from one
aiobotocore session, whose loader keeps botocore's S3 model once parsed. Timeouts and retries are kept short, so
a wrong or dead endpoint fails in seconds; a retryable error is left to the caller's own redelivery rather than
hidden here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from xml.etree import ElementTree
from xml.parsers import expat

import aiohttp

# botocore.exceptions is cheap; aiobotocore's client and config pull in most of botocore (~0.2 s of CPU) and are
# imported when the first S3 client is opened (or ``preload`` runs), so a process that never talks to S3 (a mount
# of another store, most services) does not pay for them at start-up.
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from yarl import URL

from libs.paths import quoted_key
from libs.redact import cut_error, hide_signing, strip_userinfo
from libs.ufs.base import (
    AccessDenied,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    S3Location,
    UfsError,
    out_of_files,
)
from libs.ufs.bodies import read_part
from libs.ufs.presign import Presigner, learn_presigner

# Codes S3 and S3-compatible stores use for bad or missing credentials. SeaweedFS answers a wrong secret with
# SignatureDoesNotMatch and an unknown key id with InvalidAccessKeyId; HEAD has no body, so a bare 403 there.
_CREDENTIAL_HINTS = {
    "SignatureDoesNotMatch": "the signature does not match: check the secret access key",
    "InvalidAccessKeyId": "the access key id is not known there: check the access key id",
    "ExpiredToken": "the credentials have expired: renew them",
    "InvalidToken": "the session token is invalid: renew the credentials",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", *_CREDENTIAL_HINTS}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
# Server-side trouble that may pass: worth another delivery later, not a configuration problem.
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}


class LibraryError(Exception):
    """What botocore or aiohttp raised, as the cause a ``UfsError`` of this store chains: the error's type and text
    with signing values, URL credentials and the store's keys hidden (``S3ObjectStore._hidden``), without its frames.

    A cause is written whole wherever a traceback is: the exception event of each span a failed read leaves
    (OpenTelemetry records the traceback, causes included) and a logged exception. The library's own text may quote a
    pre-signed URL, a bearer ticket to the object for ``PRESIGN_SECONDS`` with the access key id in it (aiohttp's
    "Connection timeout to host <url>", ``TooManyRedirects``' ``url=``), or a store's message quoting the request's
    ``Authorization`` header (botocore's ``ClientError``)."""


def _etag(raw: str) -> str:
    return raw.strip('"')


def _mtime(value: datetime) -> float:
    return value.timestamp()


def _folder(prefix: str) -> str:
    """The prefix as a folder: "train" and "train/" both mean the keys below "train/"; "" means all keys."""
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


# Reads go to pre-signed GET URLs over a plain aiohttp session: botocore's per-request work (building, signing,
# parsing) was ~60 % of the agent's CPU per small file. A URL is signed once per key and reused well within its
# validity; anything but a plain answer (200, 206, 412) goes through the full client for its precise error.
PRESIGN_SECONDS = 900
PRESIGN_REUSE_SECONDS = 600
PRESIGNED_KEYS = 10_000
# A ranged GET whose connection was lost once the store had it (a keep-alive connection the server closed as the
# request went out, a body cut short) is sent once more on a fresh connection; after that it is a retryable error
# of that read alone, never "endpoint unreachable", which fails every uncached read of the mount for a while.
CUT_ATTEMPTS = 2
_CUT = (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError)

T = TypeVar("T")

# Characters XML 1.0 cannot carry (control characters but tab, newline and CR; U+FFFE, U+FFFF). A store whose
# continuation token is the page's last key (SeaweedFS) writes them into its XML answer as U+FFFD, and a listing that
# followed that token went on after "<folder>/\ufffd", leaving out the rest of the folder without a word. After
# such a key the next page is asked for with StartAfter, a query parameter, which carries any key.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _resume_after(last_key: str, token: str) -> str:
    """The StartAfter that goes on from where ``token`` (a continuation token the XML could not carry) would have:
    ``last_key``, the same place in a listing in key order (S3's). SeaweedFS's token is the key it resumes after,
    each character XML cannot carry written as U+FFFD; after a key that is also a folder ("a" beside "a/b") it is
    the folder ("a/"), and SeaweedFS, listing a folder's keys right after the file of its name, takes StartAfter
    "a" as "after a and all below it": the folder's keys were skipped without a word. Such a token is followed,
    with the key's own characters; an opaque one (AWS) never reads as the key."""
    written = _NOT_XML.sub("\ufffd", last_key)
    return last_key + "/" if token == written + "/" else last_key


# A listing answer that is not well-formed XML (cut short on the way, or no S3 API at all) reaches us as a bare
# "500 Internal Server Error": botocore turns such a 200 into a 500 to retry it, and keeps no word of the body.
# ``_note_unparsable`` reads the body first and leaves why under this key of the error response; the parser's
# reason is cut to this many characters (expat's are short: "no element found: line 1, column 312").
_UNPARSABLE = "ShoalUnparsableAnswer"
_UNPARSABLE_REASON_CHARS = 120
# An answer that starts a listing within this many bytes and whose parser ran out of input inside it (one of
# these errors) was cut short; any other parse error is a body that is not XML, or not S3's.
_LISTING_START_BYTES = 1024
_ENDED_EARLY = {expat.errors.codes[message] for message in (
    expat.errors.XML_ERROR_NO_ELEMENTS, expat.errors.XML_ERROR_UNCLOSED_TOKEN, expat.errors.XML_ERROR_PARTIAL_CHAR,
    expat.errors.XML_ERROR_UNCLOSED_CDATA_SECTION)}


def _note_unparsable(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """botocore's ``before-parse`` hook for ListObjectsV2: for a failed answer (a good listing is not parsed twice)
    whose body is not well-formed XML, note why in the error response botocore will build."""
    body = response_dict.get("body")
    if int(response_dict.get("status_code") or 0) < 300 or not isinstance(body, bytes) or not body:
        return
    try:
        parser = ElementTree.XMLParser(target=ElementTree.TreeBuilder())
        parser.feed(body)
        parser.close()
    except (ElementTree.ParseError, LookupError, ValueError) as err:  # an unknown encoding: LookupError
        customized_response_dict[_UNPARSABLE] = {
            "reason": str(err)[:_UNPARSABLE_REASON_CHARS],
            "bytes": len(body),
            "cut": getattr(err, "code", None) in _ENDED_EARLY and b"<ListBucketResult" in body[:_LISTING_START_BYTES],
        }


_shared: Any = None
_shared_lock = threading.Lock()


def shared_session() -> Any:
    """The process's aiobotocore session. Its loader parses botocore's S3 model and endpoint rules once: a client
    from a session that has them costs ~10 ms of CPU, one from a fresh session ~150 ms (measured), which a dataset
    service paid at every sync of an S3 dataset when each store had a session of its own."""
    global _shared
    with _shared_lock:
        if _shared is None:
            from aiobotocore.session import get_session

            _shared = get_session()
        return _shared


def preload() -> None:
    """Import aiobotocore and parse S3's model and endpoint data into the shared session. Blocking (about half a
    second of CPU on first use): ``S3ObjectStore.prepare`` runs it in a thread, so the event loop does not stall
    on it at the first request."""
    from aiobotocore.config import AioConfig  # noqa: F401  (the import is the work)

    loader = shared_session().get_component("data_loader")
    for kind in ("service-2", "endpoint-rule-set-1"):
        loader.load_service_model("s3", kind)
    for data in ("endpoints", "partitions", "sdk-default-configuration"):
        loader.load_data_with_path(data)


# A client no store uses is kept this long for the next store of the same location (a dataset's next sync).
IDLE_CLIENT_SECONDS = 60.0


class S3Clients:
    """S3 clients shared by the stores of one process (one event loop) that have the same location and options.

    Making a client costs ~50 ms of CPU even from the shared session (botocore builds its endpoint rules, and
    aiobotocore a TLS context with the CA bundle, for ``http://`` endpoints too), where a small listing with it
    costs ~3 ms (measured): a dataset service that opened a client per sync spent most of an S3 dataset's sync
    making it. Stores lease a client on first use and give it back on ``close``; one nobody used for
    ``IDLE_CLIENT_SECONDS`` is closed at the next lease or return, and ``close`` closes every one (the owner calls
    it when it stops). Rotated credentials are another key, so they get a client of their own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key → [client, its exit stack, stores using it, when the last one gave it back]
        self._clients: dict[str, list[Any]] = {}
        self._lock = asyncio.Lock()

    async def lease(self, key: str, make: Callable[[AsyncExitStack], Awaitable[Any]]) -> Any:
        async with self._lock:
            await self._close_idle()
            held = self._clients.get(key)
            if held is None:
                stack = AsyncExitStack()
                held = self._clients[key] = [await make(stack), stack, 0, 0.0]
            held[2] += 1
            return held[0]

    async def give_back(self, key: str) -> None:
        async with self._lock:
            held = self._clients.get(key)
            if held is not None:
                held[2] -= 1
                held[3] = self._clock()
            await self._close_idle()

    async def close(self) -> None:
        async with self._lock:
            held, self._clients = list(self._clients.values()), {}
            for _client, stack, _users, _since in held:
                await stack.aclose()

    def __len__(self) -> int:
        return len(self._clients)

    async def _close_idle(self) -> None:
        now = self._clock()
        for key, (_client, stack, users, since) in list(self._clients.items()):
            if users <= 0 and now - since >= IDLE_CLIENT_SECONDS:
                del self._clients[key]
                await stack.aclose()


class S3ObjectStore:
    """Read-only access to the objects below ``location.prefix`` in one bucket; keys are relative to it."""

    def __init__(
        self,
        location: S3Location,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        max_connections: int = 64,
        clients: S3Clients | None = None,
    ) -> None:
        self._location = location
        # Clients shared with the process's other stores of this location (None: one of its own).
        self._clients = clients
        self._leased: str | None = None
        self._bucket = location.bucket
        self._prefix = _folder(location.prefix)
        # Shown in errors and logs: never with credentials written into the URL.
        self._where = strip_userinfo(location.endpoint_url) or f"AWS S3 ({location.region})"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # AioConfig's arguments; the config itself is made with the client (see the imports).
        self._config_options: dict[str, Any] = dict(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Total attempts, the first included; standard mode retries throttling and connection errors.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            # Readers fetch many ranges at once; the default pool of 10 would queue them.
            max_pool_connections=max_connections,
            s3={"addressing_style": "path" if location.path_style else "auto"},
            # Newer botocore adds CRC checksums by default, which some S3-compatible stores reject; reads are
            # pinned by ETag instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        self._max_connections = max_connections
        self._timeouts = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._presigned: OrderedDict[str, tuple[URL, float]] = OrderedDict()
        # Signs hot GETs' URLs without the client (``libs.ufs.presign``); learned once per client, None: the client.
        self._presigner: Presigner | None = None
        self._presigner_learned = False

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self._bucket!r}, prefix={self._prefix!r}, endpoint={self._where!r})"

    async def __aenter__(self) -> S3ObjectStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client and its connections; the store opens a new one if used again."""
        async with self._lock:
            await self._stack.aclose()
            self._stack = AsyncExitStack()
            self._client = None
            if self._leased is not None and self._clients is not None:
                leased, self._leased = self._leased, None
                await self._clients.give_back(leased)
            if self._http is not None:
                await self._http.close()
                self._http = None
            self._presigned.clear()
            self._presigner, self._presigner_learned = None, False

    async def prepare(self) -> None:
        """Have the client and its connection pool ready before the first request, botocore's import and model
        parsing done in a thread: a mount that starts serving calls it, so its first read or load does not wait
        half a second for them. Failing here changes nothing: the first request opens the client again."""
        await asyncio.to_thread(preload)
        await self._s3()
        await self._learn_presigner()
        self._session()

    async def _s3(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    if self._clients is None:
                        self._client = await self._make_client(self._stack)
                    else:
                        key = self._client_key()
                        self._client = await self._clients.lease(key, self._make_client)
                        self._leased = key
        return self._client

    async def _make_client(self, stack: AsyncExitStack) -> Any:
        from aiobotocore.config import AioConfig

        location = self._location
        # Empty credentials fall through to botocore's chain (environment, IRSA, instance role).
        client = await stack.enter_async_context(
            shared_session().create_client(
                "s3",
                endpoint_url=location.endpoint_url or None,
                region_name=location.region,
                aws_access_key_id=location.access_key_id.reveal() or None,
                aws_secret_access_key=location.secret_access_key.reveal() or None,
                config=AioConfig(**self._config_options),
            )
        )
        client.meta.events.register("before-parse.s3.ListObjectsV2", _note_unparsable)
        return client

    def _client_key(self) -> str:
        """What a client is made of, hashed: the same for stores that may share one, never the secret itself."""
        location = self._location
        made_of = json.dumps([location.endpoint_url, location.region, location.access_key_id.reveal(),
                              location.secret_access_key.reveal(), self._config_options], sort_keys=True)
        return hashlib.sha256(made_of.encode()).hexdigest()

    async def list(self, page_size: int = 1000) -> AsyncGenerator[ObjectInfo, None]:
        """Every object below the prefix, one ListObjectsV2 page at a time. Folder markers ("train/sub/", made by
        consoles and tools) are listed as keys ending in '/' (libs.paths decides what they mean), except the
        prefix's own marker."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        client = await self._s3()
        request: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._prefix, "MaxKeys": page_size}
        while True:
            try:
                page = await client.list_objects_v2(**request)
            except (ClientError, BotoCoreError) as err:
                raise self._error(err, "list") from self._cause(err)
            if "IsTruncated" not in page:
                # Every S3 listing says whether it is complete. botocore reads any well-formed page without it (a
                # web server or console at that address answering 200 with HTML) as an empty listing, which would
                # sync the dataset, or replace its tree at an autoSync, with no files at all.
                raise self._not_a_listing(page)
            last_key = ""
            for item in page.get("Contents", ()):
                full_key: str = item["Key"]
                last_key = full_key
                if full_key == self._prefix or not full_key.startswith(self._prefix):
                    continue
                yield ObjectInfo(
                    key=full_key[len(self._prefix) :],
                    size=int(item["Size"]),
                    etag=_etag(item["ETag"]),
                    mtime=_mtime(item["LastModified"]),
                )
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                # Looping without a token would list the first page forever.
                raise UfsError(
                    f"S3 endpoint {self._where} returned a truncated listing of bucket '{self._bucket}' "
                    "without a continuation token"
                )
            if _NOT_XML.search(last_key):
                after = _resume_after(last_key, token)
                if request.get("StartAfter") == after:
                    # A store that ignores StartAfter would answer this page forever.
                    raise UfsError(f"S3 endpoint {self._where} listed bucket '{self._bucket}' from its start again "
                                   "when asked to start after a key")
                request.pop("ContinuationToken", None)
                request["StartAfter"] = after
            else:
                request.pop("StartAfter", None)
                request["ContinuationToken"] = token

    async def head(self, key: str) -> ObjectInfo:
        client = await self._s3()
        try:
            response = await client.head_object(Bucket=self._bucket, Key=self._prefix + key)
        except ClientError as err:
            if _status(err) == 404:
                # HEAD has no body, so a missing bucket and a missing key are the same bare 404.
                raise await self._missing(key) from self._cause(err)
            raise self._error(err, "head", key) from self._cause(err)
        except BotoCoreError as err:
            raise self._error(err, "head", key) from self._cause(err)
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=_etag(response["ETag"]),
            mtime=_mtime(response["LastModified"]),
        )

    async def names_object(self) -> bool:
        """A HEAD of the prefix without its '/' (the key a ``s3://bucket/dir/model.bin`` mount names). A 404 or 403
        is "no" (403: a HEAD of a missing key without ListBucket rights, or an object we may not read, which the
        listing would not have shown either); an unreachable store raises, so the caller retries later."""
        key = self._prefix.rstrip("/")
        if not key:
            return False  # the bucket itself
        client = await self._s3()
        try:
            await client.head_object(Bucket=self._bucket, Key=key)
        except ClientError as err:
            if _status(err) in (403, 404):
                return False
            raise self._error(err, "head", "") from self._cause(err)
        except BotoCoreError as err:
            raise self._error(err, "head", "") from self._cause(err)
        return True

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        """``length`` bytes from ``start``, fewer at the end; with ``etag``, ObjectChanged if it moved on."""
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        if length == 0:
            return b""
        fast = await self._fast_get(key, start, length, etag)
        if fast is not None:
            return fast
        client = await self._s3()
        request: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._prefix + key,
            "Range": f"bytes={start}-{start + length - 1}",
        }
        if etag is not None:
            request["IfMatch"] = f'"{etag}"'
        try:
            response = await client.get_object(**request)
        except ClientError as err:
            if _status(err) == 416:
                # The range starts at or past the end (or the object is empty): there is nothing to read,
                # but the caller still wants to know if the object is the one it expects.
                if etag is not None and (await self.head(key)).etag != etag:
                    raise self._changed(key, etag) from self._cause(err)
                return b""
            raise self._error(err, "get", key, etag) from self._cause(err)
        except BotoCoreError as err:
            raise self._error(err, "get", key, etag) from self._cause(err)
        # A 206 is the range; anything else the whole object (a store that ignores Range). Only the range is read,
        # as on the pre-signed path: leaving the block closes the connection on the rest of the body.
        partial = "ContentRange" in response
        async with response["Body"] as body:
            # Some stores ignore If-Match; the ETag of what came back is the final word.
            if etag is not None and _etag(response.get("ETag", "")) != etag:
                raise self._changed(key, etag)
            try:
                data, more = await read_part(body.read, 0 if partial else start, length)
            except (BotoCoreError, aiohttp.ClientError, TimeoutError) as err:
                raise self._error(err, "get", key, etag) from self._cause(err)
        if more and partial:
            raise self._too_long(key, length)
        return data

    async def get_range_into(self, key: str, start: int, into: memoryview, etag: str | None = None) -> int:
        """``get_range`` of ``len(into)`` bytes written into ``into`` as they arrive (each piece aiohttp hands over
        copied once, where ``get_range`` keeps the pieces and joins them); the count of bytes written."""
        if start < 0:
            raise ValueError("start must not be negative")
        length = len(into)
        if length == 0:
            return 0
        got = await self._fast_get_into(key, start, into, etag)
        if got is not None:
            return got
        data = await self.get_range(key, start, length, etag)
        into[:len(data)] = data
        return len(data)

    async def _fast_get_into(self, key: str, start: int, into: memoryview, etag: str | None) -> int | None:
        """``_fast_get`` into ``into``; None when the answer needs ``get_range`` (not a 206)."""
        return await self._cut_retried(lambda: self._fast_get_into_once(key, start, into, etag), key, etag)

    async def _fast_get_into_once(self, key: str, start: int, into: memoryview, etag: str | None) -> int | None:
        length = len(into)
        url, headers = await self._ranged(key, start, length, etag)
        try:
            async with self._session().get(url, headers=headers) as response:
                if response.status == 412 and etag is not None:
                    raise self._changed(key, etag)
                if response.status != 206:
                    return None
                if etag is not None and _etag(response.headers.get("ETag", "")) != etag:
                    raise self._changed(key, etag)
                got = 0
                content = response.content
                while True:
                    # readchunk: one piece of aiohttp's buffer as it is (readany/read join what is buffered).
                    piece, end_of_http_chunk = await content.readchunk()
                    if not piece:
                        if end_of_http_chunk:
                            continue
                        break
                    if got + len(piece) > length:
                        raise self._too_long(key, length)
                    into[got:got + len(piece)] = piece
                    got += len(piece)
        except _CUT:
            raise  # tried again on a fresh connection
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise self._error(err, "get", key, etag) from self._cause(err)
        return got

    async def _ranged(self, key: str, start: int, length: int, etag: str | None) -> tuple[URL, dict[str, str]]:
        """The pre-signed URL and headers of a ranged GET, pinned to ``etag`` when given."""
        # The object's own bytes, whatever its Content-Encoding: "identity" so a store never encodes them on the
        # way, and the session never decodes (``_session``).
        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        if etag is not None:
            headers["If-Match"] = f'"{etag}"'
        return await self._presigned_url(key), headers

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # auto_decompress off: an object stored with ``Content-Encoding: gzip`` (``aws s3 cp
            # --content-encoding``) is its gzip bytes, listed with their size; decoded, no read of it added up.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections), timeout=self._timeouts,
                auto_decompress=False,
            )
        return self._http

    async def _fast_get(self, key: str, start: int, length: int, etag: str | None) -> bytes | None:
        """The ranged GET on a pre-signed URL; None when the answer needs the full client to be explained."""
        return await self._cut_retried(lambda: self._fast_get_once(key, start, length, etag), key, etag)

    async def _cut_retried(self, get: Callable[[], Awaitable[T]], key: str, etag: str | None) -> T:
        """``get()``, sent again on a fresh connection if its connection was cut (``CUT_ATTEMPTS`` in all)."""
        for attempt in range(1, CUT_ATTEMPTS + 1):
            try:
                return await get()
            except _CUT as err:
                if attempt == CUT_ATTEMPTS:
                    raise self._error(err, "get", key, etag) from self._cause(err)
        raise AssertionError("CUT_ATTEMPTS must be at least 1")

    async def _fast_get_once(self, key: str, start: int, length: int, etag: str | None) -> bytes | None:
        url, headers = await self._ranged(key, start, length, etag)
        try:
            async with self._session().get(url, headers=headers) as response:
                if response.status == 412 and etag is not None:
                    raise self._changed(key, etag)
                if response.status not in (200, 206):
                    return None
                if etag is not None and _etag(response.headers.get("ETag", "")) != etag:
                    raise self._changed(key, etag)
                # A 206 is the range; a 200 the whole object (a store that ignores Range), of which only the range
                # is read.
                data, more = await read_part(response.content.read, 0 if response.status == 206 else start, length)
                if more and response.status == 206:
                    raise self._too_long(key, length)
        except _CUT:
            raise  # tried again on a fresh connection
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise self._error(err, "get", key, etag) from self._cause(err)
        return data

    async def _presigned_url(self, key: str) -> URL:
        """The pre-signed GET URL of ``key``, sent exactly as signed: aiohttp re-quotes a URL given as text, and
        decodes the sub-delimiters botocore encoded in the key (``=``, ``@``, ``:``, ``(``, ``!``...), so the path
        the server checks the signature against was not the one signed; every read of such a key (Hive partitions,
        ``year=2024/``) was refused and read again through the full client."""
        now = time.monotonic()
        cached = self._presigned.get(key)
        if cached is not None and cached[1] > now:
            self._presigned.move_to_end(key)
            return cached[0]
        await self._learn_presigner()
        if self._presigner is not None:
            url = URL(self._presigner.url(self._prefix + key), encoded=True)
        else:
            url = URL(await self._client_presign(self._prefix + key), encoded=True)
        self._presigned[key] = (url, now + PRESIGN_REUSE_SECONDS)
        if len(self._presigned) > PRESIGNED_KEYS:
            self._presigned.popitem(last=False)
        return url

    async def _learn_presigner(self) -> None:
        if not self._presigner_learned:
            self._presigner_learned = True
            location = self._location
            self._presigner = await learn_presigner(self._client_presign, self._bucket,
                                                    location.access_key_id.reveal(),
                                                    location.secret_access_key.reveal(), PRESIGN_SECONDS)

    async def _client_presign(self, full_key: str) -> str:
        """The client's pre-signed GET URL of ``full_key`` (the prefix included)."""
        client = await self._s3()
        url: str = await client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": full_key}, ExpiresIn=PRESIGN_SECONDS
        )
        return url

    async def _missing(self, key: str) -> UfsError:
        """NoSuchBucket or NoSuchKey after a bare 404, told apart by asking about the bucket itself."""
        client = await self._s3()
        try:
            await client.head_bucket(Bucket=self._bucket)
        except ClientError as err:
            if _status(err) == 404:
                return self._no_bucket()
        except BotoCoreError:
            pass
        return self._no_key(key)

    def _not_a_listing(self, page: dict[str, Any]) -> UfsError:
        content_type = str(page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-type", ""))[:80]
        sent = f" (it sent {content_type!r})" if content_type else ""
        return UfsError(f"S3 endpoint {self._where} did not answer the listing of bucket '{self._bucket}' with an S3 "
                        f"listing{sent}: check that the endpoint is the store's S3 API, not a web page or console")

    def _no_bucket(self) -> NoSuchBucket:
        return NoSuchBucket(f"bucket '{self._bucket}' does not exist at {self._where}")

    def _no_key(self, key: str) -> NoSuchKey:
        return NoSuchKey(
            f"object {quoted_key(self._prefix + key)} does not exist in bucket '{self._bucket}' at {self._where}"
        )

    def _too_long(self, key: str, length: int) -> UfsError:
        return UfsError(f"S3 get of {quoted_key(self._prefix + key)} in bucket '{self._bucket}' at {self._where} "
                        f"answered more than the {length} bytes asked for")

    def _changed(self, key: str, etag: str) -> ObjectChanged:
        return ObjectChanged(
            f"object {quoted_key(self._prefix + key)} in bucket '{self._bucket}' at {self._where} changed: "
            f"its ETag is no longer {etag}"
        )

    def _error(
        self, err: Exception, action: str, key: str | None = None, etag: str | None = None
    ) -> UfsError:
        """The UfsError for a botocore or aiohttp failure of ``action`` on ``key`` (None: the bucket)."""
        mapped = self._map(err, action, key, etag)
        message = self._hidden(mapped.message)
        if message != mapped.message:
            retryable = mapped.retryable
            mapped = type(mapped)(message)
            mapped.retryable = retryable
        return mapped

    def _hidden(self, text: str) -> str:
        """``text`` without a credential: no botocore or aiohttp text we pass on may carry the keys, a URL's user
        and password, nor the signing values of a request a store or proxy quotes back in its error message (a
        pre-signed URL, an Authorization header). (A key of a few characters would match ordinary words, and no real
        credential is that short.)"""
        text = hide_signing(strip_userinfo(text))
        for secret in (self._location.secret_access_key.reveal(), self._location.access_key_id.reveal()):
            if len(secret) >= 8:
                text = text.replace(secret, "***")
        return text

    def _cause(self, err: BaseException) -> LibraryError:
        """The cause to chain to the ``UfsError`` raised for ``err``: ``err`` itself would be shown whole."""
        return LibraryError(cut_error(self._hidden(f"{type(err).__module__}.{type(err).__qualname__}: {err}")))

    def _map(self, err: Exception, action: str, key: str | None, etag: str | None) -> UfsError:
        bucket = f"bucket '{self._bucket}' at {self._where}"
        what = f"S3 {action} of " + (f"{quoted_key(self._prefix + key)} in {bucket}" if key is not None else bucket)
        if isinstance(err, ClientError):
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = _status(err)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if key is not None and (code == "NoSuchKey" or status == 404):
                return self._no_key(key)
            if key is not None and etag is not None and (code == "PreconditionFailed" or status == 412):
                return self._changed(key, etag)
            if code in _DENIED_CODES or status == 403:
                hint = _CREDENTIAL_HINTS.get(code, "check the access key and secret, and the bucket's policy")
                return AccessDenied(f"access denied to {bucket}: {hint}")
            if code in _REGION_CODES or status == 301:
                headers = err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                region = headers.get("x-amz-bucket-region")
                found = f" (it is in '{region}')" if region else ""
                return UfsError(
                    f"{bucket} is not in region '{self._location.region}'{found}: set the mount's region"
                )
            unparsable = err.response.get(_UNPARSABLE)
            if isinstance(unparsable, dict):
                failure = UfsError(f"{what} failed: {self._unparsable(err, unparsable)}")
            else:
                failure = UfsError(f"{what} failed: {code or status} {error.get('Message', '')}".rstrip())
            if code in _TRANSIENT_CODES or status >= 500:
                failure.retryable = True
            return failure
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return AccessDenied(
                f"no usable S3 credentials for {bucket}: set the access key id and secret access key"
            )
        if isinstance(err, _CUT):  # the endpoint answered: one connection was lost, not the store
            failure = UfsError(f"{what} failed: the connection was cut mid-answer ({type(err).__name__})")
            failure.retryable = True
            return failure
        exhausted = out_of_files(_causes(err), what)
        if exhausted is not None:  # no socket for the request: this process's limit, not an unreachable store
            return exhausted
        if isinstance(err, EndpointConnectionError | HTTPClientError | aiohttp.ClientError | TimeoutError):
            return EndpointUnreachable(f"cannot reach S3 endpoint {self._where}: {self._reason(err)}")
        return UfsError(f"S3 {action} of {bucket} failed: {type(err).__name__}: {err}")

    def _unparsable(self, err: ClientError, noted: dict[str, Any]) -> str:
        """What a listing answer that is not well-formed XML was (``_note_unparsable``): cut short, or no listing."""
        size, reason = noted["bytes"], noted["reason"]
        if noted["cut"]:
            return (f"the store's listing answer could not be parsed: it stops mid-XML after {size} bytes "
                    f"({reason}), cut short on the way")
        # A 500 may be a 200 botocore changed (it keeps no other status); any other status is the store's own.
        status = _status(err)
        headers = err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        content_type = str(headers.get("content-type", ""))[:80]
        sent = (f"HTTP {status} with " if status != 500 else "") + f"{size} bytes"
        sent += f" of {content_type!r}" if content_type else ""
        return (f"the store's listing answer could not be parsed: {sent} that are not well-formed XML ({reason}): "
                "check that the endpoint is the store's S3 API")

    def _reason(self, err: Exception) -> str:
        # botocore's, or aiohttp's on a pre-signed GET (a TimeoutError too: asked first).
        if isinstance(err, ConnectTimeoutError | aiohttp.ConnectionTimeoutError):
            return f"no connection within {self._connect_timeout} s"
        if isinstance(err, ReadTimeoutError | TimeoutError):
            return f"no answer within {self._read_timeout} s"
        if isinstance(err, ConnectionClosedError):  # a listing's body cut short lands here too, not in _CUT
            return "the connection was closed before a whole answer came"
        for cause in _causes(err):
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            if type(cause).__name__ in ("gaierror", "ClientConnectorDNSError"):
                return "host name not found"
            if isinstance(cause, aiohttp.ClientConnectorCertificateError):
                return "TLS certificate not trusted"
        return f"connection failed ({type(err).__name__})"


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors under it: botocore keeps the aiohttp error in ``kwargs``, aiohttp the OS one."""
    cause: BaseException | None = err
    for _ in range(10):  # chains are short; the bound only guards against a cycle
        if cause is None:
            return
        yield cause
        inner = getattr(cause, "kwargs", {}).get("error") if isinstance(cause, BotoCoreError) else None
        os_error = getattr(cause, "os_error", None)
        if isinstance(inner, BaseException):
            cause = inner
        elif isinstance(os_error, BaseException):
            cause = os_error
        else:
            cause = cause.__cause__ or cause.__context__
