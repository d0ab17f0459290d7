"""Web servers on loopback serving a folder with autoindex pages: the sources of ``http://`` mount tests.

- ``WebSource``: an aiohttp server whose folder pages look like nginx's ``autoindex`` or Apache's
  ``mod_autoindex`` table; files go through aiohttp's own ``FileResponse`` (Range, ETag, If-Match,
  If-Unmodified-Since, as a real static server answers). ``etags=False`` leaves ETag out (Last-Modified only);
  ``redirects`` maps a folder path to where it redirects; ``head=False`` refuses HEAD (405); every request's
  (method, path) is kept in ``calls``; files named in ``encoded`` are sent with ``Content-Encoding: gzip``
  whatever the client accepts, as an S3 website or CDN serves objects stored with that header (their bytes are
  already gzip).
- ``PythonSource``: Python's own ``http.server`` in a thread, which knows no Range (a 200 with the whole body),
  no ETag and no preconditions: only Last-Modified.
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from libs.embedded import LOOPBACK
from tests.helpers import ReservedPort


def nginx_page(path: str, folder: Path) -> str:
    rows = ['<a href="../">../</a>']
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        st = entry.stat() if entry.exists() else entry.lstat()  # a dangling link is listed, as nginx does
        date = time.strftime("%d-%b-%Y %H:%M", time.gmtime(st.st_mtime))
        if entry.is_dir():
            name, size = entry.name + "/", "-"
        else:
            name, size = entry.name, str(st.st_size)
        shown = html.escape(name if len(name) <= 50 else name[:47] + "..>")
        rows.append(f'<a href="{quote(name)}">{shown}</a>{" " * max(1, 51 - len(shown))}{date}{size:>20}')
    body = "\r\n".join(rows)
    return (f"<html>\r\n<head><title>Index of {path}</title></head>\r\n<body>\r\n<h1>Index of {path}</h1><hr><pre>"
            f"{body}\r\n</pre><hr></body>\r\n</html>\r\n")


def apache_page(path: str, folder: Path) -> str:
    head = ('<tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th>'
            '<th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th>'
            '<th><a href="?C=D;O=A">Description</a></th></tr>\n   <tr><th colspan="5"><hr></th></tr>\n'
            '<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="'
            f'{html.escape(path.rstrip("/").rpartition("/")[0] + "/")}">Parent Directory</a></td><td>&nbsp;</td>'
            '<td align="right">  - </td><td>&nbsp;</td></tr>\n')
    rows = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        st = entry.stat() if entry.exists() else entry.lstat()
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.st_mtime))
        name = entry.name + "/" if entry.is_dir() else entry.name
        size = "  - " if entry.is_dir() else f"{st.st_size / 1024:.1f}K"
        rows.append(f'<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td><td><a href="{quote(name)}">'
                    f'{html.escape(name)}</a></td><td align="right">{date}  </td><td align="right">{size}</td>'
                    '<td>&nbsp;</td></tr>\n')
    return (f'<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n<html>\n <head>\n  <title>Index of {path}'
            f"</title>\n </head>\n <body>\n<h1>Index of {path}</h1>\n  <table>\n   {head}{''.join(rows)}"
            '   <tr><th colspan="5"><hr></th></tr>\n</table>\n</body></html>\n')


PAGES = {"nginx": nginx_page, "apache": apache_page}


class WebSource:
    def __init__(self, root: Path, style: str = "nginx", etags: bool = True,
                 redirects: dict[str, str] | None = None, head: bool = True,
                 tls: ssl.SSLContext | None = None, encoded: tuple[str, ...] = ()) -> None:
        self.root = root
        self.encoded = encoded
        self.tls = tls
        self.head = head
        self.style = style
        self.etags = etags
        self.redirects = redirects or {}
        self._reserved = ReservedPort()  # held until it listens: see ReservedPort
        self.port = self._reserved.port
        self.calls: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}/"

    async def __aenter__(self) -> WebSource:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        if not self.etags:
            app.on_response_prepare.append(self._drop_etag)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._reserved.take(), ssl_context=self.tls).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @staticmethod
    async def _drop_etag(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.popall("ETag", None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if request.method == "HEAD" and not self.head:
            raise web.HTTPMethodNotAllowed("HEAD", ["GET"])
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        relative = request.match_info["tail"]
        if ".." in relative.split("/"):
            raise web.HTTPForbidden()
        path = self.root / relative
        if path.is_dir():
            if not request.path.endswith("/"):
                raise web.HTTPMovedPermanently(request.path + "/")
            page = PAGES[self.style](request.path, path)
            return web.Response(text=page, content_type="text/html")
        if not path.is_file():
            raise web.HTTPNotFound()
        response = web.FileResponse(path)
        if relative in self.encoded:
            response.headers["Content-Encoding"] = "gzip"
        return response


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class PythonSource:
    """``python -m http.server``, in a thread of the test process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/"

    def __enter__(self) -> PythonSource:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def rewrite(path: Path, data: bytes) -> None:
    """New content for a file, its modification time moved a few seconds on (Last-Modified has whole seconds)."""
    before = path.stat().st_mtime
    path.write_bytes(data)
    os.utime(path, (before + 5, before + 5))
