"""The web folder object store (libs.ufs.http) against real web servers on loopback: aiohttp serving nginx- and
Apache-style autoindex pages (Range, ETag, If-Match as a static server answers them) and Python's http.server
(no Range, no ETag)."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import threading
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from libs.embedded import LOOPBACK
from libs.natssecure import TlsFiles, make_certs
from libs.ufs import http as http_ufs
from libs.ufs.base import (
    EndpointUnreachable,
    HttpLocation,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    ObjectInfo,
    UfsError,
    source_tag,
)
from libs.ufs.http import HttpObjectStore, ListingLoop, ListingTooLarge
from tests.faults import answering
from tests.web_source import PythonSource, WebSource, rewrite

FILES = {
    "a.txt": b"alpha\n",
    "sub dir/b.bin": bytes(range(256)) * 40,
    "sub dir/deeper/c.txt": b"c" * 3000,
    "\u00fc name.txt": b"umlaut\n",
    "z/empty": b"",
}


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


async def listing(store: HttpObjectStore) -> list[ObjectInfo]:
    return [info async for info in store.list(page_size=2)]


@pytest.mark.parametrize("style", ["nginx", "apache"])
async def test_lists_every_file_below_with_sizes_and_pins_and_reads_ranges(tmp_path: Path, style: str) -> None:
    root = tree(tmp_path / "site" / "data", FILES)
    (root / "sub dir" / "deeper" / "up").symlink_to("../../z")  # a link to a folder elsewhere, not a loop
    (root / "dangling").symlink_to("nowhere")  # listed, but 404: left out like a file removed while listing
    async with WebSource(tmp_path / "site", style=style, etags=style == "nginx") as web, \
            HttpObjectStore(HttpLocation(url=web.url + "data")) as store:
        infos = await listing(store)
        assert [i.key for i in infos] == sorted(["a.txt", "sub dir/b.bin", "sub dir/deeper/c.txt",
                                                 "sub dir/deeper/up/empty", "\u00fc name.txt", "z/empty"])
        by_key = {i.key: i for i in infos}
        assert {key: by_key[key].size for key in FILES} == {key: len(data) for key, data in FILES.items()}
        pin = by_key["sub dir/b.bin"].etag
        assert pin.startswith('"') if style == "nginx" else pin.startswith("last-modified:")
        assert by_key["a.txt"].mtime == pytest.approx(os.stat(root / "a.txt").st_mtime, abs=1)
        data = FILES["sub dir/b.bin"]
        assert await store.get_range("sub dir/b.bin", 1000, 3000, pin) == data[1000:4000]
        assert await store.get_range("sub dir/b.bin", len(data) - 5, 100, pin) == data[-5:]
        assert await store.get_range("sub dir/b.bin", len(data), 10, pin) == b""
        assert (await store.head("\u00fc name.txt")).size == len(FILES["\u00fc name.txt"])
        assert ("HEAD", "/data/dangling") in web.calls  # listed, asked about, left out


@pytest.mark.parametrize("etags", [True, False], ids=["if-match", "if-unmodified-since"])
async def test_a_file_changed_under_us_is_never_mixed(tmp_path: Path, etags: bool) -> None:
    root = tree(tmp_path / "site", {"f.bin": b"1" * 5000})
    async with WebSource(root, etags=etags) as web, HttpObjectStore(HttpLocation(url=web.url)) as store:
        (info,) = await listing(store)
        assert await store.get_range("f.bin", 0, 100, info.etag) == b"1" * 100
        rewrite(root / "f.bin", b"2" * 5000)  # same size, new version
        with pytest.raises(ObjectChanged, match=r"f\.bin changed"):
            await store.get_range("f.bin", 100, 100, info.etag)
        with pytest.raises(ObjectChanged):
            await store.get_range("f.bin", 5000, 100, info.etag)  # past the end: still the wrong version


async def test_a_server_without_range_is_read_whole_and_cut(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    root = tree(tmp_path / "site", {"big.bin": data, "d/small.txt": b"small"})
    with PythonSource(root) as web:
        async with HttpObjectStore(HttpLocation(url=web.url)) as store:
            infos = {i.key: i for i in await listing(store)}
            assert set(infos) == {"big.bin", "d/small.txt"}
            pin = infos["big.bin"].etag
            assert pin.startswith("last-modified:") and infos["big.bin"].size == len(data)
            assert await store.get_range("big.bin", 123_456, 70_000, pin) == data[123_456:193_456]
            assert await store.get_range("big.bin", 299_990, 100, pin) == data[299_990:]
            rewrite(root / "big.bin", os.urandom(300_000))
            with pytest.raises(ObjectChanged):  # http.server ignores If-Unmodified-Since; the answer tells
                await store.get_range("big.bin", 0, 10, pin)


@asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """An aiohttp server answering every GET with ``handler``; yields the URL of its folder /data/."""
    async with answering(handler) as url:
        yield f"{url}/data/"


def lying_server(content_range: str, endless: bool) -> AbstractAsyncContextManager[str]:
    """A server answering every GET with 206 and ``content_range``: the body 100 bytes, or never ending."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=206, headers={"Content-Range": content_range})
        await response.prepare(request)
        await response.write(bytes(range(100)))
        while endless:
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    return serving(answer)


async def test_a_range_answer_longer_than_asked_is_cut_not_read_whole() -> None:
    # A server whose 206 body goes on past the range (or never ends) costs the asked bytes, not all of its body.
    async with lying_server("bytes 0-9/100", endless=True) as url, HttpObjectStore(HttpLocation(url=url)) as store:
        assert await asyncio.wait_for(store.get_range("f", 0, 10), 10) == bytes(range(10))


@pytest.mark.parametrize("content_range", ["bytes 0-9/\u00b2", "bytes 0-9/\u0661\u0660\u0660"])
async def test_a_size_in_odd_digits_is_no_size_not_a_crash(content_range: str) -> None:
    # str.isdigit() holds for '²', which int() refuses; Arabic-Indic digits int() reads but HTTP does not have.
    async with lying_server(content_range, endless=False) as url, HttpObjectStore(HttpLocation(url=url)) as store:
        assert await store.get_range("f", 0, 10, listed("size:100", url)) == bytes(range(10))


# How long the parse waits for another task of the loop before it ends anyway (only a stalled loop waits so long).
PARSE_WAIT_SECONDS = 10.0


async def test_a_page_slow_to_parse_does_not_stall_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing page is parsed in pure Python: ~5 s per million tags. On the event loop, a large (or hostile) page
    stopped every other task of the process (the dataset service's other syncs and commands) meanwhile.

    Shown by what runs, not by how long things take: once the parse (a real one, of a large page) has begun, it
    asks the loop to run a callback and waits for it before it ends. Off the loop the callback runs at once,
    whatever the machine's speed; on the loop it cannot run until the parse ends, which then gives up waiting
    after PARSE_WAIT_SECONDS."""
    page = '<a href="f">f</a> 1\n' + "<b>" * 300_000
    parse = http_ufs.parse_listing
    loop = asyncio.get_running_loop()
    ran = threading.Event()  # the loop ran the parse's callback
    waits: list[bool] = []

    def parse_then_wait_for_the_loop(page: str, page_url: str) -> list[http_ufs.Entry]:
        loop.call_soon_threadsafe(ran.set)
        entries = parse(page, page_url)
        waits.append(ran.wait(PARSE_WAIT_SECONDS))
        return entries

    monkeypatch.setattr(http_ufs, "parse_listing", parse_then_wait_for_the_loop)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async with serving(answer) as url, HttpObjectStore(HttpLocation(url=url)) as store:
        assert [info.key for info in await listing(store)] == ["f"]
    assert waits == [True], "the loop ran nothing while the page was parsed"


async def test_a_listed_file_gone_is_no_such_key_and_a_missing_folder_no_such_bucket(tmp_path: Path) -> None:
    root = tree(tmp_path / "site", {"f.txt": b"x"})
    async with WebSource(root) as web, HttpObjectStore(HttpLocation(url=web.url)) as store:
        (info,) = await listing(store)
        (root / "f.txt").unlink()
        with pytest.raises(NoSuchKey, match="does not exist"):
            await store.get_range("f.txt", 0, 1, info.etag)
        async with HttpObjectStore(HttpLocation(url=web.url + "nope/")) as missing:
            with pytest.raises(NoSuchBucket, match="nope/ does not exist"):
                await listing(missing)


def listed(pin: str, url: str) -> str:
    """The version a listing of the mount at ``url`` gives a file whose validator is ``pin`` (``source_tag``)."""
    return f"{pin} mount:{source_tag(url)}"


async def test_a_version_listed_for_another_mount_is_not_this_ones(tmp_path: Path) -> None:
    """Two web mounts whose server gives one file the same ETag (nginx's: its time and size): the version one
    mount's listing gave is ObjectChanged on the other, so no cached block of one is taken for the other's."""
    root = tree(tmp_path / "site", {"a/f": b"version A", "b/f": b"version B"})
    for folder in ("a", "b"):
        os.utime(root / folder / "f", ns=(10**18, 10**18))
    async with WebSource(root, style="nginx", etags=True) as web, \
            HttpObjectStore(HttpLocation(url=web.url + "a/")) as first, \
            HttpObjectStore(HttpLocation(url=web.url + "b/")) as second:
        a, b = await first.head("f"), await second.head("f")
        assert a.etag.split(" ")[0] == b.etag.split(" ")[0]  # the server's ETag: one for both
        assert a.etag != b.etag
        assert await second.get_range("f", 0, 9, b.etag) == b"version B"
        with pytest.raises(ObjectChanged):
            await second.get_range("f", 0, 9, a.etag)


async def test_an_unreachable_server_is_retryable(refused_port: int) -> None:
    url = f"http://{LOOPBACK}:{refused_port}/data/"
    async with HttpObjectStore(HttpLocation(url=url)) as store:
        with pytest.raises(EndpointUnreachable, match="unreachable") as err:
            await listing(store)
        assert err.value.retryable and url in err.value.message
        with pytest.raises(EndpointUnreachable):
            await store.get_range("f", 0, 1, listed('"x"', url))


async def test_listings_that_loop_are_stopped(tmp_path: Path) -> None:
    root = tree(tmp_path / "site", {"data/a/f.txt": b"f", "deep/1/2/3/4/f.txt": b"f", "up/x.txt": b"x"})
    (root / "data" / "a" / "again").symlink_to("..")  # a symlink cycle: ever-deeper URLs of the same pages
    async with WebSource(root, redirects={"/up/back/": "/up/"}) as web:
        (root / "up" / "back").mkdir()
        async with HttpObjectStore(HttpLocation(url=web.url + "data/")) as store:
            with pytest.raises(ListingLoop, match="lists the same entries as"):
                await listing(store)
        async with HttpObjectStore(HttpLocation(url=web.url + "up/")) as store:
            with pytest.raises(ListingLoop, match=r"redirects to .*/up/, above it"):
                await listing(store)
        async with HttpObjectStore(HttpLocation(url=web.url + "deep/", max_depth=2)) as store:
            with pytest.raises(ListingLoop, match=r"deeper than 2 folders.*maxDepth"):
                await listing(store)
        async with HttpObjectStore(HttpLocation(url=web.url, max_pages=3)) as store:
            with pytest.raises(ListingTooLarge, match="more than 3 listing pages"):
                await listing(store)
        async with HttpObjectStore(HttpLocation(url=web.url + "deep/1/2/3/4/", max_files=0)) as store:
            with pytest.raises(ListingTooLarge, match="more than 0 files"):
                await listing(store)


async def test_a_server_refusing_head_is_asked_with_a_one_byte_range(tmp_path: Path) -> None:
    root = tree(tmp_path / "site", {"f.bin": b"x" * 5000})  # Apache pages show "4.9K": no exact size to take
    async with WebSource(root, style="apache", head=False) as web, HttpObjectStore(HttpLocation(url=web.url)) as store:
        (info,) = await listing(store)
        assert (info.key, info.size) == ("f.bin", 5000) and info.etag.startswith('"')
        assert ("HEAD", "/f.bin") in web.calls and ("GET", "/f.bin") in web.calls


# Lists the folder and reads a range in a fresh process, so SSL_CERT_FILE (read when the TLS defaults load, at
# aiohttp's import) decides which CA is trusted, as it does for the services and mount processes.
_LIST_AND_READ = """
import asyncio, sys
from libs.ufs.base import HttpLocation
from libs.ufs.http import HttpObjectStore

async def main():
    async with HttpObjectStore(HttpLocation(url=sys.argv[1])) as store:
        infos = [info async for info in store.list()]
        print(sorted(info.key for info in infos))
        print((await store.get_range("a.txt", 1, 3, infos[0].etag)).decode())

asyncio.run(main())
"""


def https_site(tmp_path: Path) -> tuple[Path, TlsFiles, ssl.SSLContext]:
    """A web folder ``data`` (a.txt, sub/b.txt), a CA and its certificate for 127.0.0.1, and a server context."""
    root = tree(tmp_path / "site" / "data", {"a.txt": b"alpha\n", "sub/b.txt": b"b"})
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certs.cert, certs.key)
    return root, certs, server_tls


async def list_and_read(url: str, certs: TlsFiles) -> tuple[int, str, str]:
    """``_LIST_AND_READ`` in a process trusting ``certs``' CA: exit code, output, errors."""
    env = {**os.environ, "SSL_CERT_FILE": str(certs.ca), "PYTHONPATH": os.getcwd()}
    # Not subprocess.run: the servers answer from this event loop.
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", _LIST_AND_READ, url, env=env,
                                                   stdout=PIPE, stderr=PIPE)
    out, errors = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), errors.decode()


async def test_https_folders_are_read_when_their_ca_is_trusted_and_refused_with_a_reason_otherwise(
        tmp_path: Path) -> None:
    root, certs, server_tls = https_site(tmp_path)
    async with WebSource(root.parent, tls=server_tls) as web:
        assert web.url.startswith("https://")
        async with HttpObjectStore(HttpLocation(url=web.url + "data")) as store:  # this process trusts no such CA
            with pytest.raises(UfsError, match=r"TLS with web server .* failed .*check its certificate") as err:
                await listing(store)
            assert not err.value.retryable  # retrying cannot fix a certificate
        code, out, errors = await list_and_read(web.url + "data", certs)
    assert code == 0, errors[-2000:]
    assert out.splitlines() == ["['a.txt', 'sub/b.txt']", "lph"]


async def test_a_file_of_an_https_folder_redirected_to_plain_http_is_refused(tmp_path: Path) -> None:
    root, certs, server_tls = https_site(tmp_path)
    async with WebSource(root.parent) as plain, \
            WebSource(root.parent, tls=server_tls, redirects={"/data/a.txt": plain.url + "data/a.txt"}) as web:
        code, out, errors = await list_and_read(web.url + "data", certs)
    assert code != 0 and out == ""
    assert f"{web.url}data/a.txt redirects to plain http ({plain.url}data/a.txt): refused" in errors, errors[-2000:]
    assert ("GET", "/data/a.txt") not in plain.calls  # the HEAD was refused: its body never asked for
