"""``FileStreams``: which read stream of a file a read continues when reads name no reader (no opens), how many
are kept and which one a new stream displaces."""

from __future__ import annotations

from libs.events.dataset import ManifestEntry
from services.agent.readahead import ReadAhead
from services.agent.reader import OpenFile
from services.agent.streams import STREAMS_PER_FILE, FileStreams

ENTRY = ManifestEntry(path="/f", mount=0, key="f", size=1 << 30, etag="e", mtime=0.0)


def new_state() -> OpenFile:
    return OpenFile(entry=ENTRY, readahead=ReadAhead())


def read(streams: FileStreams, offset: int, length: int = 4096, now: float = 0.0) -> tuple[OpenFile, list[OpenFile]]:
    stream, displaced = streams.pick(offset, now, new_state)
    stream.state.readahead.on_read(offset, length)
    return stream.state, displaced


def test_a_read_continues_the_stream_it_follows_and_any_other_read_starts_one() -> None:
    streams = FileStreams()
    first, _ = read(streams, 0)
    second, _ = read(streams, 0)  # another reader from the start
    assert second is not first
    assert read(streams, 4096)[0] is first  # both at 4096 next: the one read least lately is asked first
    assert read(streams, 4096)[0] is second
    assert read(streams, 8192)[0] is first
    elsewhere, _ = read(streams, 1 << 20)
    assert elsewhere not in (first, second) and len(streams.streams) == 3


def test_random_reads_displace_random_streams_before_sequential_ones() -> None:
    streams = FileStreams()
    sequential = [read(streams, 0)[0] for _ in range(2)]
    for _ in sequential:
        read(streams, 4096)  # each continued: both sequential now (their window open)
    assert all(state.readahead.sequential for state in sequential)
    displaced: list[OpenFile] = []
    for index in range(50):
        displaced += read(streams, (index + 7) * (1 << 20))[1]
    assert len(streams.streams) == STREAMS_PER_FILE
    assert all(state in streams.states() for state in sequential)
    assert len(displaced) == 52 - STREAMS_PER_FILE and not any(state in sequential for state in displaced)


def test_a_stream_mid_read_is_neither_displaced_nor_idle() -> None:
    streams = FileStreams()
    reading, _ = streams.pick(0, 0.0, new_state)
    reading.reading = 1
    for index in range(STREAMS_PER_FILE * 2):
        streams.pick((index + 1) * (1 << 20), 0.0, new_state)
    assert reading in streams.streams and len(streams.streams) == STREAMS_PER_FILE
    others = [s.state for s in streams.streams if s is not reading]
    assert streams.idle(100.0, 5.0) == others
    assert streams.streams == [reading]
    reading.reading, reading.last_read = 0, 100.0  # its read ended at 100 (``DatasetFS.read`` dates it)
    assert streams.idle(100.0, 5.0) == [] and streams.idle(105.0, 5.0) == [reading.state]
