"""The read streams of one file when reads name the file but not the reader (no opens: ``services.agent.fs``).

Decides which read state (read-ahead, the block held, the blocks fetched ahead) a read of the file uses: the state
of the stream whose next offset the read starts at (it continues that reader), else a new stream's, and when a
stream is idle. Two processes reading one file at once, or threads of one process reading different parts of it,
so keep a read-ahead each, as they did with an open handle each; one state for the file would see their reads
interleave as random reads and drop its read-ahead at every one.

At most ``STREAMS_PER_FILE`` are kept (a loader's workers reading one large file each at its own place): a new
stream then takes the place of the one read least lately that has no read in flight, one that is not reading
sequentially first (a random reader makes a stream at most every read, and must not push out the sequential
readers' streams). Each holds at most the block it last read and its blocks ahead (the node's read-ahead budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.agent.reader import OpenFile

STREAMS_PER_FILE = 16


@dataclass(eq=False)
class Stream:
    state: OpenFile
    last_read: float  # when its last read ended (or it was made)
    reading: int = 0  # reads in flight: never idle meanwhile, however long they take


@dataclass
class FileStreams:
    streams: list[Stream] = field(default_factory=list)  # least lately read first

    def pick(self, offset: int, now: float, new_state: Callable[[], OpenFile]) -> tuple[Stream, list[OpenFile]]:
        """The stream a read at ``offset`` belongs to (made with ``new_state`` when it continues none), and the
        states of the streams it displaced, for the caller to close."""
        for at, stream in enumerate(self.streams):
            if stream.state.readahead.next_offset == offset:
                self.streams.append(self.streams.pop(at))
                return stream, []
        stream = Stream(new_state(), now)
        displaced = []
        while len(self.streams) >= STREAMS_PER_FILE:
            resting = [s for s in self.streams if not s.reading]
            if not resting:  # every one is mid-read: keep them all until some are done
                break
            victim = next((s for s in resting if not s.state.readahead.sequential), resting[0])
            self.streams.remove(victim)
            displaced.append(victim.state)
        self.streams.append(stream)
        return stream, displaced

    def idle(self, now: float, idle_seconds: float) -> list[OpenFile]:
        """Remove the streams nothing read for ``idle_seconds`` and that have no read in flight; their states."""
        gone = []
        for stream in list(self.streams):
            if now < stream.last_read:
                # The wall clock was set back: idle from now on, not until the clock is back where it was (an
                # hour's step would hold the stream's blocks ahead, and their budget, for an hour).
                stream.last_read = now
            elif now - stream.last_read >= idle_seconds and not stream.reading:
                self.streams.remove(stream)
                gone.append(stream.state)
        return gone

    def states(self) -> list[OpenFile]:
        return [stream.state for stream in self.streams]
