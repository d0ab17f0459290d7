"""Ordinary tools against a real FUSE mount of odd object layouts: names no one would choose, sizes on block
boundaries, writes of every kind, and listings read while the tree is reloaded underneath them.

Services and the node agent run in-process on a real nats-server over SeaweedFS; each mount is a real process.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import gzip
import os
import struct
import subprocess
import unicodedata
from pathlib import Path

import pytest

from libs.bus import Bus
from libs.config import Settings
from tests.conftest import SeaweedServer, put_objects
from tests.helpers import eventually
from tests.integration.agent_stack import NODE, md5, node_stack, run_tool, scrape, series, target_port

MiB = 1024 * 1024

pytestmark = pytest.mark.needs("fuse")


def getdents(fd: int, buffer_bytes: int) -> list[str]:
    """One getdents64 call on the open folder ``fd``: the names it returns (few with a small buffer), [] at the end.
    Python's listdir and scandir read a whole folder in large batches; this reads it a little at a time, the way
    a program paging through a huge folder does."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(buffer_bytes)
    got = libc.getdents64(fd, buffer, buffer_bytes)
    if got < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    names, at = [], 0
    while at < got:
        # struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, then the name (NUL-terminated).
        reclen = struct.unpack_from("<H", buffer.raw, at + 16)[0]
        names.append(buffer.raw[at + 19:at + reclen].split(b"\0", 1)[0].decode())
        at += reclen
    return names


async def test_a_listing_read_across_a_resync_repeats_and_skips_nothing(bus: Bus, settings: Settings,
                                                                         seaweedfs: SeaweedServer, bucket: str,
                                                                         tmp_path: Path) -> None:
    names = [f"f{i:03d}" for i in range(200)]
    await put_objects(seaweedfs, bucket, {f"big/{name}": b"x" for name in names})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("paged", bucket)
        root = await node.wait_mounted("paged", expect="big/f199")
        fd = await asyncio.to_thread(os.open, root / "big", os.O_RDONLY | os.O_DIRECTORY)
        try:
            seen = await asyncio.to_thread(getdents, fd, 1024)
            assert 0 < len(seen) < 100, seen
            # Meanwhile the folder changes and the mount reloads its tree: three names before the reader's position
            # (each would shift the position of every later name) and one after it gone.
            await put_objects(seaweedfs, bucket, {f"big/a-new-{i}": b"new" for i in range(3)})
            async with seaweedfs.client() as client:
                await client.delete_object(Bucket=bucket, Key="big/f199")
            await node.resync("paged")
            await eventually(lambda: asyncio.to_thread(os.path.exists, root / "big/a-new-0"), what="the reload")
            while batch := await asyncio.to_thread(getdents, fd, 1024):
                seen += batch
        finally:
            os.close(fd)
        # The listing goes on after the last name it gave: none twice, none skipped, the deleted one not shown.
        assert seen == names[:-1]


async def test_the_mount_folder_has_the_time_of_its_newest_object(bus: Bus, settings: Settings,
                                                                 seaweedfs: SeaweedServer, bucket: str,
                                                                 tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"top.txt": b"top", "sub/below.txt": b"below"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("times", bucket)
        root = await node.wait_mounted("times", expect="sub/below.txt")
        times = {path: (await asyncio.to_thread(os.stat, root / path)).st_mtime
                 for path in (".", "top.txt", "sub", "sub/below.txt")}
        newest = max(times["top.txt"], times["sub/below.txt"])
        # A folder's time is the latest of what is below it, the mount's own folder too (it was the epoch: `ls -l`
        # of its parent and a copy made with `tar` showed 1970).
        assert times["."] == newest
        assert times["sub"] == times["sub/below.txt"]
        listed = await run_tool("tar", "-C", str(root), "-cf", str(tmp_path / "copy.tar"), ".")
        assert listed.returncode == 0
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        await run_tool("tar", "-C", str(extracted), "-xf", str(tmp_path / "copy.tar"))
        assert (await asyncio.to_thread(os.stat, extracted)).st_mtime == newest


ODD_NAMES = {
    unicodedata.normalize("NFC", "café.txt"): b"nfc",
    unicodedata.normalize("NFD", "café.txt"): b"nfd",
    "with space.txt": b"space",
    "pct%20.txt": b"percent",
    "hash#.txt": b"hash",
    "query?.txt": b"query",
    "plus+.txt": b"plus",
    "new\nline.txt": b"newline",
    "tab\tand\x01control.txt": b"control",
    "x" * 255: b"the longest name",
    "a": b"a file where a folder is",
    "a/b": b"below a",
    "marker/": b"",
    "deep/marker/": b"",
    "empty.bin": b"",
}


async def test_odd_names_and_block_edges_with_ordinary_tools(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                             bucket: str, tmp_path: Path) -> None:
    block = MiB  # the runtime's block size (node.apply's default)
    sized = {"one-block.bin": os.urandom(block), "block-and-a-byte.bin": os.urandom(block + 1)}
    await put_objects(seaweedfs, bucket, {**ODD_NAMES, **sized})
    files = {key: body for key, body in {**ODD_NAMES, **sized}.items() if not key.endswith("/") and key != "a"}
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("odd", bucket)
        root = await node.wait_mounted("odd", expect="block-and-a-byte.bin")
        # Every name byte for byte (NFC and NFD are two files); "a" is the folder, its file left out; markers are
        # empty folders.
        found = await run_tool("find", str(root), "-mindepth", "1", "-printf", r"%y %P\0")
        assert sorted(found.stdout.split("\0")[:-1]) == sorted(
            [f"f {key}" for key in files] + ["d a", "d marker", "d deep", "d deep/marker"])
        sums = await asyncio.to_thread(subprocess.run, ["bash", "-c", "find . -type f -print0 | xargs -0 md5sum -z"],
                                       cwd=root, capture_output=True, check=True, timeout=60)
        got = {}
        for line in sums.stdout.split(b"\0")[:-1]:
            digest, path = line.decode().split("  ./", 1)
            got[path] = digest
        assert got == {key: md5(body) for key, body in files.items()}
        du = await run_tool("du", "-sb", "--apparent-size", str(root))
        assert int(du.stdout.split()[0]) == sum(len(body) for body in files.values())
        tarred = await asyncio.to_thread(subprocess.run, ["bash", "-c", "tar cf - . | tar tf - | wc -l"], cwd=root,
                                         capture_output=True, check=True, timeout=60)
        assert int(tarred.stdout) == len(files) + 5  # ./, a/, marker/, deep/, deep/marker/
        copy = tmp_path / "copy"
        await run_tool("cp", "-r", str(root), str(copy))
        await run_tool("diff", "-r", str(root), str(copy))

        def around_block_edges() -> None:
            import mmap
            for name, body in sized.items():
                with open(root / name, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                    assert mapped[block - 1:] == body[block - 1:]
                fd = os.open(root / name, os.O_RDONLY)
                try:
                    assert os.pread(fd, 4096, block - 1) == body[block - 1:block + 4095]
                    assert os.pread(fd, 4096, len(body)) == b""
                    assert os.pread(fd, 4096, 2**62) == b""
                finally:
                    os.close(fd)

        await asyncio.to_thread(around_block_edges)
        dd = await run_tool("dd", f"if={root / 'block-and-a-byte.bin'}", "of=/dev/null", "bs=333333")
        assert f"{block + 1} bytes" in dd.stderr


async def test_what_ls_stat_df_and_o_direct_show_as_documented(bus: Bus, settings: Settings,
                                                                 seaweedfs: SeaweedServer, bucket: str,
                                                                 tmp_path: Path) -> None:
    # The deliberate choices of the agent README's "What ordinary tools see", each seen through the tool.
    body = os.urandom(MiB + 4321)
    await put_objects(seaweedfs, bucket, {"d/sub/deeper/f": b"f", "d/g": b"g", "blob": body, "empty/": b""})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("seen", bucket)
        root = await node.wait_mounted("seen", expect="blob")
        # No "." and ".." rows, yet both resolve; a folder's link count is 2 whatever it holds.
        listed = await run_tool("ls", "-a1", str(root / "d"))
        assert listed.stdout.splitlines() == ["g", "sub"]
        assert (await asyncio.to_thread(os.stat, root / "d/sub/..")).st_ino == (await asyncio.to_thread(
            os.stat, root / "d")).st_ino
        links = await run_tool("stat", "-c", "%h %n", str(root), str(root / "d"), str(root / "d/sub"),
                               str(root / "empty"), str(root / "blob"))
        assert [line.split()[0] for line in links.stdout.splitlines()] == ["2", "2", "2", "2", "1"]

        def direct() -> None:  # O_DIRECT at offsets and lengths no block device would take
            fd = os.open(root / "blob", os.O_RDONLY | os.O_DIRECT)
            try:
                for offset, length in ((0, 1), (777, 333_333), (MiB - 3, 10), (len(body) - 5, 4096)):
                    assert os.pread(fd, length, offset) == body[offset:offset + length], (offset, length)
            finally:
                os.close(fd)

        await asyncio.to_thread(direct)
        # df: the dataset's bytes all used, nothing free, the files and folders its inodes; read-only, NAME_MAX.
        fs = await asyncio.to_thread(os.statvfs, root)
        assert fs.f_flag & os.ST_RDONLY and fs.f_namemax == 255
        assert (fs.f_bfree, fs.f_bavail, fs.f_ffree) == (0, 0, 0)
        assert fs.f_blocks * fs.f_frsize >= len(body) + 2 > (fs.f_blocks - 1) * fs.f_frsize
        assert fs.f_files == 8  # folders: the root, d, d/sub, d/sub/deeper, empty; files: f, g, blob
        df = await run_tool("df", "-B1", "--output=size,used,avail", str(root))
        assert df.stdout.split()[-3:] == [str(fs.f_blocks * fs.f_frsize)] * 2 + ["0"]


async def test_names_with_control_characters_end_listing_pages_without_losing_the_rest(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # SeaweedFS's continuation token is the page's last key written into XML, where a control character (other than
    # tab, newline, CR) cannot go and becomes U+FFFD: followed, the next page started after "ctl/\ufffd", and every
    # later name of that folder was missing from the tree, reported nowhere. One object per page puts a page end
    # on each name.
    files = {"ctl/\x01one": b"1", "ctl/\x02two": b"2", "ctl/\x1bthree": b"3", "ctl/plain": b"4", "ctl/zeta": b"5",
             "top.txt": b"6"}
    await put_objects(seaweedfs, bucket, files)
    paged = dataclasses.replace(settings, service=dataclasses.replace(settings.service, list_page_size=1))
    async with node_stack(bus, paged, seaweedfs, tmp_path) as node:
        await node.apply("paged", bucket)
        root = await node.wait_mounted("paged", expect="top.txt")
        found = await run_tool("find", str(root), "-type", "f", "-printf", r"%P\0")
        assert sorted(found.stdout.split("\0")[:-1]) == sorted(files)
        assert (await node.record("paged")).status.file_num == len(files)


async def test_writes_are_erofs_reads_are_not_locks_work_and_xattrs_are_unsupported(bus: Bus, settings: Settings,
                                                                                seaweedfs: SeaweedServer, bucket: str,
                                                                                tmp_path: Path) -> None:
    await put_objects(seaweedfs, bucket, {"sub/f.txt": b"f", "g.txt": b"g"})
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("ro", bucket)
        root = await node.wait_mounted("ro", expect="sub/f.txt")
        for argv in (["touch", "new.txt"], ["touch", "g.txt"], ["mkdir", "d"], ["rm", "g.txt"], ["rm", "-rf", "sub"],
                     ["mv", "g.txt", "h.txt"], ["ln", "-s", "g.txt", "l"], ["fallocate", "-l", "10", "g.txt"],
                     ["truncate", "-s", "0", "g.txt"], ["chmod", "777", "g.txt"]):
            done = await asyncio.to_thread(subprocess.run, argv, cwd=root, capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and "Read-only file system" in done.stderr, (argv, done.stderr)
        assert (await run_tool("flock", str(root / "g.txt"), "true")).returncode == 0

        def syscalls() -> None:
            for flags in (os.O_WRONLY | os.O_CREAT, os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
                with pytest.raises(OSError) as raised:
                    os.open(root / "g.txt", flags, 0o644)
                assert raised.value.errno == errno.EROFS, flags
            # Not writes, as on any read-only filesystem: O_APPEND only matters to writes, O_CREAT of a file
            # that exists creates nothing (O_APPEND was EROFS).
            for flags in (os.O_RDONLY | os.O_APPEND, os.O_RDONLY | os.O_CREAT, os.O_RDONLY | os.O_APPEND | os.O_CREAT):
                fd = os.open(root / "g.txt", flags, 0o644)
                try:
                    assert os.read(fd, 10) == b"g", flags
                finally:
                    os.close(fd)
            for path in (root / "g.txt", root / "sub", root):
                assert os.listxattr(path) == []
                # The mount has no extended attributes (EOPNOTSUPP, answered by the kernel after the first), and so
                # no ACL: the kernel reads an ACL through getxattr and takes "not supported" as none (ENODATA).
                for name, code in (("user.x", errno.EOPNOTSUPP), ("security.selinux", errno.EOPNOTSUPP),
                                   ("system.posix_acl_access", errno.ENODATA)):
                    with pytest.raises(OSError) as raised:
                        os.getxattr(path, name)
                    assert raised.value.errno == code, name
                with pytest.raises(OSError) as raised:
                    os.setxattr(path, "user.x", b"1")
                assert raised.value.errno == errno.EROFS

        await asyncio.to_thread(syscalls)


async def test_files_copied_out_with_their_extended_attributes_and_acls_copy_without_a_word_and_du_weighs_them(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # The mount has no extended attributes: listxattr is empty and getxattr "not supported" (its first answer is
    # ENOSYS, so the kernel answers the rest: see the xattr test above). Tools that copy attributes list them first
    # and take "not supported" for an ACL as none, so nothing says a word, on a fresh mount or after `ls -l`.
    bodies = {"d/e/f.bin": os.urandom(5000), "d/g.txt": b"g", "h.txt": b"hh"}
    await put_objects(seaweedfs, bucket, bodies)
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("copied", bucket)
        root = await node.wait_mounted("copied", expect="h.txt")
        # du weighs the dataset, cached or not (as s3fs and rclone show it): nothing was read yet.
        du = await run_tool("du", "-s", "-B1", str(root))
        assert int(du.stdout.split()[0]) == sum((len(body) + 511) // 512 * 512 for body in bodies.values())
        out = tmp_path / "out"
        out.mkdir()
        for argv in (["cp", "-a", str(root / "h.txt"), str(out / "cp-h")],
                     ["cp", "--preserve=all", str(root / "d/g.txt"), str(out / "cp-g")],
                     ["cp", "-a", "--preserve=xattr", str(root / "d"), str(out / "cp-d")],
                     ["rsync", "-aAX", f"{root}/", str(out / "rsync")],
                     ["tar", "--xattrs", "--acls", "-cf", str(out / "all.tar"), "-C", str(root), "."],
                     ["getfattr", "-d", "-m", "-", str(root / "h.txt")],
                     ["ls", "-l", str(root)]):
            done = await run_tool(*argv, check=False)
            assert (done.returncode, done.stderr) == (0, ""), argv
        await run_tool("diff", "-r", str(root), str(out / "rsync"))
        await run_tool("diff", "-r", str(root / "d"), str(out / "cp-d"))
        assert (out / "cp-h").read_bytes() == bodies["h.txt"]
        listed = await run_tool("tar", "-tf", str(out / "all.tar"))
        assert "./d/e/f.bin" in listed.stdout.splitlines()


async def test_ls_l_of_a_large_folder_asks_the_mount_for_extended_attributes_once(
        bus: Bus, settings: Settings, seaweedfs: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    # `ls -l` asks every file for its ACL and security label (getxattr). Answered ENODATA, each question reached
    # the mount process, twice per file and on every `ls -l`: 7 s for a folder of 20k files, 93 % of it there.
    names = [f"f{i:03d}" for i in range(300)]
    await put_objects(seaweedfs, bucket, {f"many/{name}": b"x" for name in names})
    targets = tmp_path / "targets"
    async with node_stack(bus, settings, seaweedfs, tmp_path, prometheus_targets_dir=str(targets)) as node:
        await node.apply("xattrs", bucket)
        root = await node.wait_mounted("xattrs", expect="many/f299")
        for _ in range(2):
            listed = await run_tool("ls", "-l", str(root / "many"))
            assert len(listed.stdout.splitlines()) == len(names) + 1  # and the "total" line
        port = target_port(targets, "xattrs")
        assert port is not None
        samples = await scrape(port)
        asked = series(samples, "shoal_fuse_request_duration_seconds_count", node=NODE, dataset="default/xattrs",
                       operation="getxattr")
        assert asked == 1, asked


async def test_a_local_files_time_is_served_to_the_nanosecond(bus: Bus, settings: Settings, seaweedfs: SeaweedServer,
                                                              bucket: str, tmp_path: Path) -> None:
    # A float of seconds since 1970 is exact to ~250 ns only: every local file (and folder) showed a time up to that
    # far off its source's, so `stat`, `cp -p` and a comparison of st_mtime_ns against the source disagreed.
    source = tmp_path / "source"
    (source / "d").mkdir(parents=True)
    times = {"a.txt": 1_796_613_619_813_174_285, "d/b.txt": 1_796_613_619_815_811_913,
             "d/c.txt": 1_500_000_000_123_456_789}
    for name, ns in times.items():
        (source / name).write_bytes(name.encode())
        os.utime(source / name, ns=(ns, ns))
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("exact", bucket, mount_point=f"local://{source}")
        root = await node.wait_mounted("exact", expect="d/c.txt")
        served = {name: (await asyncio.to_thread(os.stat, root / name)).st_mtime_ns for name in times}
        assert served == times
        # A folder's time is the latest below it, exactly too.
        assert (await asyncio.to_thread(os.stat, root / "d")).st_mtime_ns == times["d/b.txt"]
        assert (await asyncio.to_thread(os.stat, root)).st_mtime_ns == times["d/b.txt"]
        listed = await run_tool("stat", "-c", "%n %.9Y", *[str(root / name) for name in sorted(times)])
        assert listed.stdout.splitlines() == [f"{root / name} {ns // 10**9}.{ns % 10**9:09d}"
                                              for name, ns in sorted(times.items())]


async def test_objects_stored_with_a_content_encoding_read_as_stored(bus: Bus, settings: Settings,
                                                                      seaweedfs: SeaweedServer, bucket: str,
                                                                      tmp_path: Path) -> None:
    # `aws s3 cp --content-encoding gzip` (web assets, compressed logs): the object's bytes are the gzip stream and
    # its size in the listing is theirs; S3 never decodes them, so neither may the mount (it read as EIO).
    bodies = {"page.html.gz": gzip.compress(b"<p>hello</p>\n" * 50_000),
              "noise.gz": gzip.compress(os.urandom(2 * MiB + 3)), "tiny.gz": gzip.compress(b"hi\n")}
    async with seaweedfs.client() as client:
        for key, body in bodies.items():
            await client.put_object(Bucket=bucket, Key=key, Body=body, ContentEncoding="gzip")
    async with node_stack(bus, settings, seaweedfs, tmp_path) as node:
        await node.apply("encoded", bucket)
        root = await node.wait_mounted("encoded", expect="tiny.gz")
        # Before anything is cached: a small read inside a block (a GET of just those bytes), one across a block
        # edge (whole blocks), then every file whole.
        fd = await asyncio.to_thread(os.open, root / "noise.gz", os.O_RDONLY)
        try:
            assert await asyncio.to_thread(os.pread, fd, 100, MiB + 12345) == bodies["noise.gz"][MiB + 12345:][:100]
            assert await asyncio.to_thread(os.pread, fd, 4096, MiB - 7) == bodies["noise.gz"][MiB - 7:][:4096]
        finally:
            os.close(fd)
        sums = await run_tool("md5sum", *(str(root / key) for key in bodies))
        assert sorted(line.split()[0] for line in sums.stdout.splitlines()) == sorted(map(md5, bodies.values()))
