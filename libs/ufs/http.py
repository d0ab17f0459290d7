"""The web-server object store (Fluid's WebUFS): the files below an ``http://`` or ``https://`` folder, read
through aiohttp.

This module owns all HTTP I/O of such a mount and decides three things:

- **What the folder holds.** The folder's autoindex page (nginx ``autoindex``, Apache ``mod_autoindex`` in its
  table, ``<pre>`` and list forms, Python's ``http.server``) is parsed for links (``parse_listing``, pure); a link
  to a name directly below the page is a file, or a sub-folder when it ends in '/', which is followed depth first.
  Every other link (parents, the page itself, sort links with a query, other hosts, deeper paths) is left out. The
  walk stops with ``ListingLoop`` when it goes deeper than ``max_depth`` folders, a folder lists exactly what one
  of its ancestors lists (a symlink back up the tree makes ever-deeper URLs of the same pages), or a folder
  redirects to one above it; and with ``ListingTooLarge`` past ``max_pages`` pages or ``max_files`` files.
- **What pins a file's version.** Each listed file gets a HEAD (or, where HEAD is refused, a one-byte GET): its
  size (else the exact byte count the listing shows) and a validator kept in the manifest's ``etag`` field
  (``pin_of``): a strong ETag as sent (``"abc"``), else ``last-modified:<date>``, else a weak ETag, else
  ``size:<n>``; then `` mount:<digest>`` naming the mount (``source_tag``: nginx's ETag is the file's time and
  size, so two mounts' files could share one).
- **How a read stays on that version.** A ranged GET carries ``If-Match`` (strong ETag) or
  ``If-Unmodified-Since`` (Last-Modified); whatever the server does with them, the validator of the answer is
  compared with the pin, so a file changed under us raises ``ObjectChanged`` and bytes of two versions are never
  mixed. A server that ignores Range (200 with the whole body) is still readable: the body is streamed from its
  start and cut at the end of the asked range, so each block read downloads the file up to that block.

Errors name the folder URL (never credentials) and say what to check; an unreachable server is retryable.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import html.parser
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from urllib.parse import quote, unquote, urljoin, urlsplit

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from libs.paths import quoted_key
from libs.redact import strip_userinfo
from libs.ufs.base import (
    AccessDenied,
    EndpointUnreachable,
    HttpLocation,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    UfsError,
    error_chain,
    out_of_files,
    source_tag,
)
from libs.ufs.bodies import read_part


class ListingLoop(UfsError):
    """The folder's links lead back into themselves (a link or symlink up the tree)."""


class ListingTooLarge(UfsError):
    """More listing pages or files than the mount's limits allow."""


# A listing page is a few hundred bytes per entry; 32 MiB holds ~100k entries, far more than autoindex pages of
# real mirrors, and stops a link that is not a listing (a large file ending in '/') from filling memory.
MAX_PAGE_BYTES = 32 * 1024 * 1024
# HEADs in flight during a listing: a web server serves many small requests at once, but a sync should not look
# like a flood to it.
HEAD_CONCURRENCY = 16
# Pin prefixes (see pin_of).
LAST_MODIFIED = "last-modified:"
SIZE_ONLY = "size:"
# A byte count as HTTP and listings write it: ASCII digits only (str.isdigit() and \d also take '²', which int()
# refuses, and other scripts' digits).
_BYTE_COUNT = re.compile(r"[0-9]+")
# Files are asked for as stored: a compressed answer would have another size than the one listed, and ranges of
# it would be ranges of the compressed bytes.
IDENTITY = {"Accept-Encoding": "identity"}


# --- The listing page, pure ---


@dataclass(frozen=True)
class Link:
    """One link of a listing page: its href as written and the text around it up to the next link (where
    nginx and Apache show the date and size)."""

    href: str
    detail: str


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, list[str]]] = []  # (href, pieces of text after it)
        self._in_anchor = False
        self._open = False  # whether text still belongs to the last link's row

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.links.append((href, []))
                self._in_anchor = True
                self._open = True
        elif tag in ("tr", "li", "br", "p", "div"):
            self._open = False  # a new row: what follows is not about the last link

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._in_anchor = False
        elif tag in ("tr", "li", "p", "div"):
            self._open = False

    def handle_data(self, data: str) -> None:
        if not self.links or self._in_anchor or not self._open:
            return
        pieces = self.links[-1][1]
        seen = "".join(pieces).strip()
        if seen and "\n" in data:
            # A <pre> listing: the row ends at its line break.
            data = data[: data.index("\n")]
            self._open = False
        elif not seen and "\n" in data.strip():
            data = data.strip().split("\n")[0]
            self._open = False
        pieces.append(data)


def parse_links(page: str) -> list[Link]:
    """Every ``<a href>`` of an HTML page with the text after it on its row."""
    if "<" in page[page.rfind(">") + 1:]:
        # A tag (or comment) still open at the end of the page is closed there. Left open, html.parser (before
        # CPython's fix for CVE-2025-6069) gives it up one '<' at a time, rescanning the rest of the page each
        # time: quadratic, a hostile 60 KB page held the listing for minutes.
        page += ">"
    parser = _LinkParser()
    parser.feed(page)
    parser.close()
    return [Link(href, " ".join("".join(pieces).split())) for href, pieces in parser.links]


@dataclass(frozen=True)
class Entry:
    """A name directly below a listed folder: a file, or a folder when ``folder``; ``size`` when the listing
    shows an exact byte count."""

    name: str
    folder: bool
    size: int | None = None
    detail: str = ""


def exact_size(detail: str) -> int | None:
    """The byte count a row shows (nginx's default ``autoindex_exact_size``), or None when it shows none or a
    rounded one ("1.2K", "-")."""
    tokens = detail.split()
    return _byte_count(tokens[-1]) if tokens else None


def _byte_count(text: str) -> int | None:
    return int(text) if _BYTE_COUNT.fullmatch(text) else None


def parse_listing(page: str, page_url: str) -> list[Entry]:
    """The entries directly below ``page_url`` that a listing page links to, sorted by name; each name once.

    A link counts when it resolves (relative or absolute) to ``page_url`` plus one path segment, with or without
    a trailing '/', and has no query or fragment. Names are decoded ('%20' → ' '); one that decodes to '.', '..'
    or contains '/' is left out. A page the HTML parser cannot read raises ``UfsError`` (the dataset fails with it).
    """
    if not urlsplit(page_url).path.endswith("/"):
        page_url += "/"  # the page of a folder: its links are relative to the folder, as after the server's redirect
    base = urlsplit(page_url)
    folder = base.path
    found: dict[str, Entry] = {}
    try:
        links = parse_links(page)
    except AssertionError as err:
        # html.parser asserts on some malformed markup ('<![foo' declarations): a page it cannot read is the
        # server's to fix, said as such, not a crash of the listing.
        raise UfsError(f"listing page {strip_userinfo(page_url)} is HTML that cannot be parsed ({err}): serve "
                       "a plain autoindex page") from err
    for link in links:
        target = urlsplit(urljoin(page_url, link.href))
        if target.query or target.fragment or (target.scheme, target.netloc) != (base.scheme, base.netloc):
            continue
        if not target.path.startswith(folder):
            continue
        rest = target.path[len(folder):]
        is_folder = rest.endswith("/")
        segment = rest[:-1] if is_folder else rest
        if not segment or "/" in segment:
            continue
        name = unquote(segment)
        if name in (".", "..") or "/" in name or "\0" in name:
            continue
        previous = found.get(name)
        detail = link.detail or (previous.detail if previous else "")
        found[name] = Entry(name, is_folder, None if is_folder else exact_size(detail), detail)
    return [found[name] for name in sorted(found)]


# --- Pins, pure ---


def pin_of(headers: CIMultiDictProxy[str] | dict[str, str], size: int) -> str:
    """The manifest's ``etag`` for a file answered with ``headers``: its strong ETag as sent, else
    ``last-modified:<date>``, else its weak ETag, else ``size:<n>`` (no validator: only a size change is seen)."""
    etag = headers.get("ETag", "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    modified = headers.get("Last-Modified", "").strip()
    if modified:
        return LAST_MODIFIED + modified
    if etag.startswith('W/"'):
        return etag
    return f"{SIZE_ONLY}{size}"


def conditions(pin: str) -> dict[str, str]:
    """The request headers that ask the server to answer only for the pinned version."""
    if pin.startswith('"'):
        return {"If-Match": pin}
    if pin.startswith(LAST_MODIFIED):
        return {"If-Unmodified-Since": pin[len(LAST_MODIFIED):]}
    return {}  # a weak ETag never matches If-Match; the answer's own ETag is checked instead


def answer_matches(pin: str, headers: CIMultiDictProxy[str] | dict[str, str], total: int | None) -> bool:
    """Whether an answer (``total``: the file's full size when known) is of the pinned version. A validator the
    answer leaves out is not held against it: the conditional request asked for that version already."""
    if pin.startswith(LAST_MODIFIED):
        modified = headers.get("Last-Modified")
        return modified is None or modified.strip() == pin[len(LAST_MODIFIED):]
    if pin.startswith(SIZE_ONLY):
        return total is None or str(total) == pin[len(SIZE_ONLY):]
    etag = headers.get("ETag")
    if etag is None:
        return True
    if pin.startswith("W/"):  # weak comparison: the opaque tags are equal
        return etag.strip().removeprefix("W/") == pin.removeprefix("W/")
    return etag.strip() == pin


def _mtime(headers: CIMultiDictProxy[str] | dict[str, str]) -> float:
    modified = headers.get("Last-Modified")
    if not modified:
        return 0.0
    try:
        return parsedate_to_datetime(modified).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _total_of_content_range(value: str | None) -> int | None:
    """The full size in ``Content-Range: bytes a-b/total`` (None when absent or '*')."""
    if not value or "/" not in value:
        return None
    return _byte_count(value.rpartition("/")[2].strip())


def _length(headers: CIMultiDictProxy[str]) -> int | None:
    return _byte_count(headers.get("Content-Length", "").strip())


def _range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+([0-9]+)-[0-9]+/", value or "")
    return int(match.group(1)) if match else None


# --- The store ---


@dataclass
class _Frame:
    """A folder on the current path of the walk: its URL, key prefix, signature and unvisited entries."""

    url: str
    prefix: str
    signature: str
    entries: list[Entry]


class HttpObjectStore:
    """Read-only access to the files below a web server folder; keys are paths relative to it ('/'-separated,
    decoded)."""

    def __init__(self, location: HttpLocation, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 max_connections: int = 64) -> None:
        self._location = location
        # Appended to every pin (``source_tag``): a file's blocks are never taken for another mount's. A space
        # cannot be in an ETag, and the whole suffix is compared, so a pin of another mount is simply not ours.
        self._mount_mark = f" mount:{source_tag(location.url)}"
        url = location.url if location.url.endswith("/") else location.url + "/"
        # As aiohttp spells it (host lower-cased, default port dropped), so answers' URLs compare with it.
        self._url = str(URL(url))
        self._where = strip_userinfo(url)
        self._timeouts = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HttpObjectStore(url={self._where!r})"

    async def __aenter__(self) -> HttpObjectStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; the store opens new ones if used again."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections), timeout=self._timeouts)
        return self._session

    def url_of(self, key: str) -> str:
        return self._url + quote(key, safe="/")

    # -- listing --

    async def list(self, page_size: int = 1000) -> AsyncGenerator[ObjectInfo, None]:
        """Every file below the folder, sorted by key like an S3 listing, one folder page at a time."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        location = self._location
        pages = 1
        files = 0
        root_url, root_entries, root_signature = await self._page(self._url)
        stack = [_Frame(root_url, "", root_signature, self._ordered(root_entries))]
        while stack:
            frame = stack[-1]
            batch: builtins.list[Entry] = []
            while frame.entries and not frame.entries[-1].folder and len(batch) < min(page_size, 1000):
                batch.append(frame.entries.pop())
            if batch:
                files += len(batch)
                if files > location.max_files:
                    raise ListingTooLarge(
                        f"web folder {self._where} lists more than {location.max_files} files: raise "
                        "options.maxFiles if that is right, or mount a sub-folder")
                for info in await self._heads(frame, batch):
                    yield info
                continue
            if not frame.entries:
                stack.pop()
                continue
            entry = frame.entries.pop()
            prefix = frame.prefix + entry.name + "/"
            url = frame.url + quote(entry.name) + "/"
            if len(stack) > location.max_depth:
                raise ListingLoop(
                    f"web folder {self._where} goes deeper than {location.max_depth} folders at "
                    f"{strip_userinfo(url)}: a link or symlink loops back up the tree, or the tree is that deep "
                    "(then raise options.maxDepth)")
            pages += 1
            if pages > location.max_pages:
                raise ListingTooLarge(
                    f"web folder {self._where} has more than {location.max_pages} listing pages: raise "
                    "options.maxPages if that is right, or mount a sub-folder")
            page_url, entries, signature = await self._page(url)
            looped = next((f for f in stack if f.signature == signature), None)
            if looped is not None and entries:
                raise ListingLoop(
                    f"web folder {self._where} loops: {strip_userinfo(page_url)} lists the same entries as "
                    f"{strip_userinfo(looped.url)} above it (a link or symlink back up the tree); fix the server "
                    "or mount a folder below the loop")
            stack.append(_Frame(page_url, prefix, signature, self._ordered(entries)))

    @staticmethod
    def _ordered(entries: builtins.list[Entry]) -> builtins.list[Entry]:
        # Last one next; a folder sorts as "name/" so the listing comes out in S3's key order.
        return sorted(entries, key=lambda e: e.name + "/" if e.folder else e.name, reverse=True)

    async def _page(self, url: str) -> tuple[str, builtins.list[Entry], str]:
        """(final URL, entries, signature) of the listing page at ``url``, after redirects."""
        try:
            async with self._http().get(url, headers={"Accept": "text/html"}) as response:
                final = str(response.url)
                if response.status != 200:
                    raise self._status_error(response.status, url, listing=True)
                kind = response.headers.get("Content-Type", "text/html").lower()
                if "html" not in kind:
                    raise UfsError(f"{strip_userinfo(url)} is not a directory listing (Content-Type {kind}): "
                                   "point the mountPoint at a folder served with autoindex, ending in '/'")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1024 * 1024):
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise ListingTooLarge(f"listing page {strip_userinfo(url)} is larger than "
                                              f"{MAX_PAGE_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise self._unreachable(err) from err
        if not final.endswith("/"):
            final += "/"
        if final != url:
            # A redirect: never back up to (or onto) a folder above, and never out of the mount.
            if url.startswith(final):
                raise ListingLoop(f"web folder {self._where} loops: {strip_userinfo(url)} redirects to "
                                  f"{strip_userinfo(final)}, above it; fix the server's links or redirects")
            if not final.startswith(self._url):
                raise UfsError(f"{strip_userinfo(url)} redirects to {strip_userinfo(final)}, outside the mounted "
                               f"folder {self._where}: mount that folder instead")
        # In a thread: html.parser takes seconds over a large page (~5 s per million tags), which on the event
        # loop would stop every other task of the process meanwhile.
        entries = await asyncio.to_thread(parse_listing, body.decode("utf-8", errors="replace"), final)
        signature = hashlib.sha256("\n".join(f"{e.name}\t{e.folder}\t{e.detail}" for e in entries).encode())
        return final, entries, signature.hexdigest()

    async def _heads(self, frame: _Frame, batch: builtins.list[Entry]) -> builtins.list[ObjectInfo]:
        slots = asyncio.Semaphore(HEAD_CONCURRENCY)

        async def one(entry: Entry) -> ObjectInfo | None:
            async with slots:
                try:
                    return await self._probe(frame.prefix + entry.name, entry.size, frame.url + quote(entry.name))
                except NoSuchKey:
                    return None  # removed while we listed, or a dangling link the server lists: nothing to serve

        return [info for info in await asyncio.gather(*(one(entry) for entry in batch)) if info is not None]

    # -- one file --

    async def head(self, key: str) -> ObjectInfo:
        self._check_key(key)
        return await self._probe(key, None, self.url_of(key))

    async def names_object(self) -> bool:
        """Never asked for here: a URL of a file already fails its listing, with why ("is not a directory
        listing": point the mountPoint at a folder)."""
        return False

    async def _probe(self, key: str, listed_size: int | None, url: str) -> ObjectInfo:
        """The file's size and pin from a HEAD; a server refusing HEAD, or answering it without a size the listing
        does not show either, gets a one-byte ranged GET instead."""
        try:
            async with self._http().head(url, headers=IDENTITY, allow_redirects=True) as response:
                self._refuse_downgrade(url, response)
                status, headers = response.status, response.headers
            if status in (405, 501) or (status == 200 and _length(headers) is None and listed_size is None):
                async with self._http().get(url, headers={"Range": "bytes=0-0", **IDENTITY}) as response:
                    self._refuse_downgrade(url, response)
                    status, headers = response.status, response.headers
                    if status == 206:
                        total = _total_of_content_range(headers.get("Content-Range"))
                        return self._info(key, headers, total if total is not None else listed_size)
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise self._unreachable(err) from err
        if status != 200:
            raise self._status_error(status, url, key=key)
        size = _length(headers)
        return self._info(key, headers, size if size is not None else listed_size)

    def _info(self, key: str, headers: CIMultiDictProxy[str], size: int | None) -> ObjectInfo:
        if size is None:
            raise UfsError(f"{strip_userinfo(self.url_of(key))}: the server tells no size (no Content-Length and "
                           "none in the listing), so the file cannot be served")
        return ObjectInfo(key=key, size=size, etag=pin_of(headers, size) + self._mount_mark, mtime=_mtime(headers))

    async def get_range(self, key: str, start: int, length: int, etag: str | None = None) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end); with ``etag`` (a pin), ObjectChanged when the
        file is no longer that version."""
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        self._check_key(key)
        if length == 0:
            return b""
        url = self.url_of(key)
        headers = {"Range": f"bytes={start}-{start + length - 1}", **IDENTITY}
        if etag is not None:
            # Without this mount's mark: another mount's version, which no answer matches (its mark is no part of
            # any validator), or one listed before versions named their mount, read until the next sync.
            etag = etag.removesuffix(self._mount_mark)
            headers.update(conditions(etag))
        try:
            # Never decoded: a server may label a pre-compressed file "Content-Encoding: gzip" even to a client
            # asking for identity (an S3 website, a CDN); its bytes are the file, of the size HEAD gave. (Folder
            # pages are still decoded: a server may compress those.)
            async with self._http().get(url, headers=headers, auto_decompress=False) as response:
                self._refuse_downgrade(url, response)
                status = response.status
                if status == 412 and etag is not None:
                    raise self._changed(key, etag)
                if status == 416:
                    # At or past the end: nothing to read, but the caller still learns whether it is its version.
                    total = _total_of_content_range(response.headers.get("Content-Range"))
                    if etag is not None and not answer_matches(etag, response.headers, total):
                        raise self._changed(key, etag)
                    return b""
                if status not in (200, 206):
                    raise self._status_error(status, url, key=key)
                if status == 206:
                    total = _total_of_content_range(response.headers.get("Content-Range"))
                    if _range_start(response.headers.get("Content-Range")) != start:
                        raise UfsError(f"{strip_userinfo(url)} answered another range than asked "
                                       f"({response.headers.get('Content-Range')}) for bytes from {start}")
                else:
                    total = _length(response.headers)
                if etag is not None and not answer_matches(etag, response.headers, total):
                    raise self._changed(key, etag)
                # A 206 body starts at ``start``; a 200 body at 0. Either may go on past the range (a server that
                # ignores its end, or never stops): only the range is read.
                data, _ = await read_part(response.content.read, 0 if status == 206 else start, length)
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise self._unreachable(err, key) from err

    # -- errors --

    @staticmethod
    def _refuse_downgrade(url: str, response: aiohttp.ClientResponse) -> None:
        """A file asked for over https is not taken over plain http (a redirect to ``http://``, a CDN's or an
        attacker's): its bytes and the headers that pin its version would travel where anyone on the way can
        change them. Redirects to other https hosts are followed (CDNs)."""
        if url.startswith("https://") and response.url.scheme != "https":
            raise UfsError(f"{strip_userinfo(url)} redirects to plain http ({strip_userinfo(str(response.url))}): "
                           "refused, the file would travel unprotected; fix the server's redirect")

    def _check_key(self, key: str) -> None:
        parts = key.split("/")
        if key.startswith("/") or "\0" in key or any(part in ("", ".", "..") for part in parts):
            raise NoSuchKey(f"key {quoted_key(key)} is not a relative path below web folder {self._where}")

    def _changed(self, key: str, etag: str) -> ObjectChanged:
        return ObjectChanged(f"file {strip_userinfo(self.url_of(key))} changed: it is no longer the version "
                             f"{etag} listed at the last sync (resync the dataset to serve the new one)")

    def _unreachable(self, err: BaseException, key: str | None = None) -> UfsError:
        what = strip_userinfo(self.url_of(key)) if key is not None else self._where
        if isinstance(err, aiohttp.TooManyRedirects):
            return ListingLoop(f"{what} redirects in a loop: fix the server's redirects")
        if isinstance(err, aiohttp.InvalidURL):
            return UfsError(f"{what} is not a valid URL")
        if isinstance(err, aiohttp.ClientSSLError):
            return UfsError(f"TLS with web server {what} failed ({type(err).__name__}): check its certificate")
        exhausted = out_of_files(error_chain(err), f"request to {what}")
        if exhausted is not None:  # no socket for the request: this process's limit, not an unreachable server
            return exhausted
        reason = str(err).strip() or type(err).__name__
        # aiohttp's message may carry the URL as written; keep credentials out of it.
        return EndpointUnreachable(f"web server of {what} is unreachable ({strip_userinfo(reason)}): check the "
                                   "mountPoint's host and port, and that the server is up")

    def _status_error(self, status: int, url: str, *, key: str | None = None, listing: bool = False) -> UfsError:
        shown = strip_userinfo(url)
        if status in (404, 410):
            if listing:
                return NoSuchBucket(f"web folder {shown} does not exist (HTTP {status}): check the mountPoint")
            return NoSuchKey(f"file {shown} does not exist (HTTP {status}) although it was listed: resync the "
                             "dataset")
        if status in (401, 403):
            return AccessDenied(f"web server refused {shown} (HTTP {status}): it needs credentials Shoal does not "
                                "send, or the folder is not public")
        if status in (429, 502, 503, 504):
            return EndpointUnreachable(f"web server of {shown} answered HTTP {status}: busy or down, tried again "
                                       "later")
        return UfsError(f"web server answered HTTP {status} for {shown}")

