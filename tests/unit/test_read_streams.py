"""``FileStreams``: which read stream of a file a read belongs to when reads name no reader (no opens), how many
are kept, which one a new stream displaces, and which are idle."""

from __future__ import annotations

from libs.events.dataset import ManifestEntry
from services.agent.readahead import ReadAhead
from services.agent.reader import OpenFile
from services.agent.streams import STREAMS_PER_FILE, FileStreams

ENTRY = ManifestEntry(path="/f", mount=0, key="f", size=1 << 30, etag="e", mtime=0.0)
MiB = 1 << 20


def new_state() -> OpenFile:
    return OpenFile(entry=ENTRY, readahead=ReadAhead())


def read(streams: FileStreams, offset: int, length: int = 4096, now: float = 0.0) -> tuple[OpenFile, list[OpenFile]]:
    """A read as ``DatasetFS.read`` makes it: pick its stream, then the reader records it on that stream's state."""
    stream, displaced = streams.pick(offset, length, now, new_state)
    stream.state.readahead.on_read(offset, length)
    return stream.state, displaced


def test_readers_from_the_start_each_get_a_stream_and_keep_it() -> None:
    streams = FileStreams()
    first, _ = read(streams, 0)
    second, _ = read(streams, 0)  # another reader from the start
    assert second is not first
    assert read(streams, 4096)[0] in (first, second)  # both are at 4096 next: either serves
    assert read(streams, 4096)[0] in (first, second)
    assert first.readahead.sequential and second.readahead.sequential
    assert read(streams, 8192)[0].readahead.sequential


def test_random_reads_share_one_state_and_a_reader_going_on_from_one_gets_its_own() -> None:
    streams = FileStreams()
    randoms = {id(read(streams, offset * MiB)[0]) for offset in (7, 3, 11, 5)}
    assert len(randoms) == 1 and streams.streams == []  # one state for all, as before, and no stream made
    shared = streams.random
    assert shared is not None and not shared.state.readahead.sequential
    # A reader that began at 3 MiB reads on from there: a stream of its own, sequential at once.
    mine, _ = read(streams, 3 * MiB + 4096)
    assert mine is not shared.state and mine.readahead.sequential
    assert read(streams, 3 * MiB + 8192)[0] is mine
    # Random reads go on without touching it.
    assert read(streams, 20 * MiB)[0] is shared.state and mine.readahead.sequential


def test_new_readers_displace_streams_not_sequential_first_and_never_one_mid_read() -> None:
    streams = FileStreams()
    sequential = [read(streams, 0)[0] for _ in range(2)]
    for _ in sequential:
        read(streams, 4096)  # each continued: both sequential
    once = [read(streams, 0, length=10)[0] for _ in range(STREAMS_PER_FILE - 2)]  # read once from the start
    for state in once:
        state.readahead.window = 0  # their readers went elsewhere (a read that continued none reset them)
    reading = streams.streams[-1]
    reading.reading = 1
    displaced: list[OpenFile] = []
    for _ in range(STREAMS_PER_FILE - 3):  # as many new readers as streams neither sequential nor reading
        displaced += read(streams, 0, length=7)[1]
    assert len(streams.streams) == STREAMS_PER_FILE
    assert all(state in streams.states() for state in sequential) and reading in streams.streams
    assert displaced == [state for state in once if state is not reading.state]


def test_idle_streams_go_and_a_stream_mid_read_is_never_idle() -> None:
    streams = FileStreams()
    reading, _ = streams.pick(0, 4096, 0.0, new_state)
    reading.reading = 1
    other, _ = streams.pick(0, 4096, 0.0, new_state)
    random, _ = streams.pick(5 * MiB, 4096, 0.0, new_state)  # the random reads' state
    assert random is streams.random
    assert streams.idle(100.0, 5.0) == [other.state, random.state]
    assert streams.streams == [reading] and streams.random is None and streams.candidates == {}
    reading.reading, reading.last_read = 0, 100.0  # its read ended at 100 (``DatasetFS.read`` dates it)
    assert streams.idle(100.0, 5.0) == [] and streams.idle(105.0, 5.0) == [reading.state]
    assert streams.empty()
