"""The web folder listing parser and the version pins of http(s):// mounts (libs.ufs.http), pure.

The pages are as the servers write them, long lines included."""
# ruff: noqa: E501

from __future__ import annotations

import time

from libs.ufs.http import (
    Entry,
    answer_matches,
    conditions,
    exact_size,
    parse_listing,
    pin_of,
)

NGINX = """<html>
<head><title>Index of /data/</title></head>
<body>
<h1>Index of /data/</h1><hr><pre><a href="../">../</a>
<a href="sub%20dir/">sub dir/</a>                                          05-Dec-2026 10:00                   -
<a href="a.bin">a.bin</a>                                              05-Dec-2026 10:00                1234
<a href="a-very-long-file-name-that-nginx-shortens-in-its-page.tar.gz">a-very-long-file-name-that-nginx-shortens-i..&gt;</a> 05-Dec-2026 10:01   99
<a href="%C3%BC%20x.txt">\u00fc x.txt</a>                                            05-Dec-2026 10:02                   7
</pre><hr></body>
</html>
"""

APACHE_TABLE = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html>
 <head>
  <title>Index of /apache/zookeeper</title>
 </head>
 <body>
<h1>Index of /apache/zookeeper</h1>
  <table>
   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th><th><a href="?C=D;O=A">Description</a></th></tr>
   <tr><th colspan="5"><hr></th></tr>
<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="/apache/">Parent Directory</a></td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/folder.gif" alt="[DIR]"></td><td><a href="zookeeper-3.6.2/">zookeeper-3.6.2/</a></td><td align="right">2020-09-09 21:39  </td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><a href="KEYS"><img src="/icons/text.gif" alt="[TXT]"></a></td><td><a href="KEYS">KEYS</a></td><td align="right">2024-02-27 09:14  </td><td align="right"> 94K</td><td>&nbsp;</td></tr>
   <tr><th colspan="5"><hr></th></tr>
</table>
</body></html>
"""

APACHE_PRE = """<html><body><h1>Index of /pub</h1>
<pre><img src="/icons/blank.gif" alt="Icon "> <a href="?C=N;O=D">Name</a>                    <a href="?C=M;O=A">Last modified</a>      <a href="?C=S;O=A">Size</a>  <a href="?C=D;O=A">Description</a><hr><img src="/icons/back.gif" alt="[PARENTDIR]"> <a href="/">Parent Directory</a>                             -
<img src="/icons/unknown.gif" alt="[   ]"> <a href="file.tar.gz">file.tar.gz</a>             2021-01-01 12:00  1.2M
<img src="/icons/folder.gif" alt="[DIR]"> <a href="docs/">docs/</a>                   2021-01-01 12:00    -
<hr></pre>
</body></html>
"""

APACHE_LIST = """<html><head><title>Index of /pub</title></head><body><h1>Index of /pub</h1>
<ul><li><a href="/"> Parent Directory</a></li>
<li><a href="notes.txt"> notes.txt</a></li>
<li><a href="img/"> img/</a></li>
</ul></body></html>
"""

PYTHON = """<!DOCTYPE HTML>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Directory listing for /</title>
</head>
<body>
<h1>Directory listing for /</h1>
<hr>
<ul>
<li><a href="a%20b.txt">a b.txt</a></li>
<li><a href="link%40/">link@/</a></li>
<li><a href="sub/">sub/</a></li>
</ul>
<hr>
</body>
</html>
"""

# aiohttp's show_index: absolute hrefs.
AIOHTTP = """<html>
<head>
<title>Index of /static/</title>
</head>
<body>
<h1>Index of /static/</h1>
<ul>
<li><a href="/static/x.bin">x.bin</a></li>
<li><a href="/static/y">y/</a></li>
</ul>
</body>
</html>"""


def test_nginx_page_gives_names_sizes_and_folders() -> None:
    entries = parse_listing(NGINX, "http://h/data/")
    assert [(e.name, e.folder, e.size) for e in entries] == [
        ("a-very-long-file-name-that-nginx-shortens-in-its-page.tar.gz", False, 99),
        ("a.bin", False, 1234),
        ("sub dir", True, None),
        ("\u00fc x.txt", False, 7),
    ]


def test_apache_table_skips_sort_links_and_parent_and_keeps_rounded_sizes_out() -> None:
    entries = parse_listing(APACHE_TABLE, "https://mirrors.example.org/apache/zookeeper/")
    assert [(e.name, e.folder, e.size) for e in entries] == [("KEYS", False, None), ("zookeeper-3.6.2", True, None)]
    keys = next(e for e in entries if e.name == "KEYS")
    assert "94K" in keys.detail  # the icon link before the name does not lose the row's text


def test_apache_page_without_trailing_slash_in_its_url() -> None:
    # The page's own URL without '/' still names the folder the links are relative to.
    entries = parse_listing(APACHE_TABLE, "https://mirrors.example.org/apache/zookeeper")
    assert [e.name for e in entries] == ["KEYS", "zookeeper-3.6.2"]


def test_apache_pre_and_list_forms() -> None:
    pre = parse_listing(APACHE_PRE, "http://h/pub/")
    assert [(e.name, e.folder, e.size) for e in pre] == [("docs", True, None), ("file.tar.gz", False, None)]
    listed = parse_listing(APACHE_LIST, "http://h/pub/")
    assert [(e.name, e.folder) for e in listed] == [("img", True), ("notes.txt", False)]


def test_python_http_server_page_decodes_names() -> None:
    entries = parse_listing(PYTHON, "http://127.0.0.1:8000/")
    assert entries == [Entry("a b.txt", False, None, ""), Entry("link@", True, None, ""),
                       Entry("sub", True, None, "")]


def test_absolute_links_below_the_page_count() -> None:
    entries = parse_listing(AIOHTTP, "http://h:8080/static/")
    assert [(e.name, e.folder) for e in entries] == [("x.bin", False), ("y", False)]


def test_links_that_lead_back_up_or_away_are_left_out() -> None:
    page = """<a href="../">up</a><a href="./">self</a><a href="/data/">self, absolute</a><a href="/">root</a>
    <a href="http://other.example/data/x">other host</a><a href="https://h/data/x">other scheme</a>
    <a href="deep/er/file">deeper</a><a href="x#frag">fragment</a><a href="x?download=1">query</a>
    <a href="%2e%2e/">encoded parent</a><a href="a%2Fb">encoded slash</a><a href="mailto:me@h">mail</a>
    <a name="anchor">no href</a><a href="ok.txt">ok</a>"""
    assert [e.name for e in parse_listing(page, "http://h/data/")] == ["ok.txt"]


def test_a_page_ending_inside_a_tag_is_read_in_linear_time() -> None:
    # html.parser (before the fix for CVE-2025-6069) gives up on a tag still open at the end of the page one '<'
    # at a time, rescanning the rest each time: a 60 KB page of "<a " took minutes, the listing (and the dataset
    # service's event loop) with it. An unclosed tag at the end of the page is closed; the links before it count.
    for tail in ("<a " * 20_000, "<a href=" * 20_000, "<!--<a " * 10_000, "<a b c" * 10_000):
        started = time.perf_counter()
        assert [e.name for e in parse_listing('<a href="ok.txt">ok</a> 1\n' + tail, "http://h/")] == ["ok.txt"]
        assert time.perf_counter() - started < 2.0, tail[:10]


def test_a_name_listed_twice_is_one_entry() -> None:
    page = '<a href="f">icon</a> <a href="f">f</a>  2024-01-01 10:00  12\n'
    assert parse_listing(page, "http://h/") == [Entry("f", False, 12, "2024-01-01 10:00 12")]


def test_exact_size_only_from_a_plain_byte_count() -> None:
    assert exact_size("05-Dec-2026 10:00 1234") == 1234
    assert exact_size("2021-01-01 12:00 1.2M") is None
    assert exact_size("05-Dec-2026 10:00 -") is None
    assert exact_size("") is None


def test_pin_prefers_a_strong_etag_then_last_modified_then_a_weak_etag_then_the_size() -> None:
    date = "Sat, 05 Dec 2026 10:00:00 GMT"
    assert pin_of({"ETag": '"abc"', "Last-Modified": date}, 3) == '"abc"'
    assert pin_of({"ETag": 'W/"abc"', "Last-Modified": date}, 3) == "last-modified:" + date
    assert pin_of({"ETag": 'W/"abc"'}, 3) == 'W/"abc"'
    assert pin_of({}, 3) == "size:3"


def test_conditions_and_answers_per_pin() -> None:
    date = "Sat, 05 Dec 2026 10:00:00 GMT"
    assert conditions('"abc"') == {"If-Match": '"abc"'}
    assert conditions("last-modified:" + date) == {"If-Unmodified-Since": date}
    assert conditions('W/"abc"') == {} and conditions("size:3") == {}
    assert answer_matches('"abc"', {"ETag": '"abc"'}, None)
    assert not answer_matches('"abc"', {"ETag": '"abd"'}, None)
    assert answer_matches('"abc"', {}, None)  # the If-Match asked for it
    assert not answer_matches("last-modified:" + date, {"Last-Modified": "Sun, 06 Dec 2026 10:00:00 GMT"}, None)
    assert answer_matches('W/"abc"', {"ETag": '"abc"'}, None)
    assert not answer_matches('W/"abc"', {"ETag": 'W/"x"'}, None)
    assert answer_matches("size:3", {}, 3) and not answer_matches("size:3", {}, 4)
