"""The manifest writer keeps a small manifest in memory (uploaded as bytes) and moves a large one to a temporary
file, every entry kept in order either way."""

from __future__ import annotations

from libs import manifest
from libs.events.dataset import ManifestEntry
from libs.manifest import ManifestWriter, read_entries


def entries(count: int) -> list[ManifestEntry]:
    return [ManifestEntry(path=f"/dir/file-{i:06d}.bin", mount=0, key=f"dir/file-{i:06d}.bin", size=i, etag="e",
                          mtime=1.0) for i in range(count)]


def test_a_small_manifest_stays_in_memory() -> None:
    with ManifestWriter() as writer:
        for entry in entries(10):
            writer.add(entry)
        small = writer.in_memory()
        assert small is not None
        assert list(read_entries(writer.rewound())) == entries(10)
        assert small.count(b"\n") == 10 and writer.file_num == 10 and writer.total_bytes == sum(range(10))


def test_a_large_manifest_moves_to_a_file_with_every_entry() -> None:
    count = manifest.SPOOL_BYTES // 50  # each line is well over 50 bytes
    with ManifestWriter() as writer:
        for entry in entries(count):
            writer.add(entry)
        assert writer.in_memory() is None
        assert list(read_entries(writer.rewound())) == entries(count)
        assert writer.file_num == count
