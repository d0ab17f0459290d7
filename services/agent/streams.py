"""The read streams of one file when reads name the file but not the reader (no opens: ``services.agent.fs``).

Decides which read state (read-ahead, the block held, the blocks fetched ahead) a read of the file uses, and when a
stream is idle. Two processes reading one file at once, or threads of one process reading different parts of it,
so keep a read-ahead each, as they did with an open handle each; one state for the file saw their reads interleave
as random reads and dropped its read-ahead at every one.

- A read that starts where a stream's last read ended continues that stream.
- A read from offset 0 starts a stream: a new reader, as an open was.
- Any other read is taken for a random read and served by the file's one state for those (``random``), as every
  read was before; where it ended is remembered (``candidates``), and a read that starts there later is a reader
  going on from where it began: it gets a stream of its own. So a random read costs no new state, and a reader
  that starts in the middle of the file is told apart at its second read.

At most ``STREAMS_PER_FILE`` streams are kept (a loader's workers reading one large file each at its own place): a
new one then takes the place of the one read least lately that has no read in flight, one that is not reading
sequentially first. Each holds at most the block it last read (the mount holds at most ``reader.MAX_HELD_BLOCKS`` of
those) and its blocks ahead (the node's read-ahead budget).
"""

from __future__ import annotations

from collections import OrderedDict
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
    random: Stream | None = None
    # Where the last random reads ended, oldest first (at most STREAMS_PER_FILE).
    candidates: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def pick(self, offset: int, length: int, now: float,
             new_state: Callable[[], OpenFile]) -> tuple[Stream, list[OpenFile]]:
        """The stream a read of ``length`` bytes at ``offset`` belongs to (made with ``new_state`` when needed), and
        the states of the streams it displaced, for the caller to close."""
        for at, stream in enumerate(self.streams):
            if stream.state.readahead.next_offset == offset:
                self.streams.append(self.streams.pop(at))
                return stream, []
        if offset in self.candidates:
            # A reader going on from where a read taken for a random one ended: its own stream, which takes this
            # read as the one that continues (its read-ahead opens now).
            del self.candidates[offset]
            stream, displaced = self._new(now, new_state)
            stream.state.readahead.next_offset = offset
            return stream, displaced
        if offset:
            if self.random is None:
                self.random = Stream(new_state(), now)
            self.candidates[offset + length] = None
            if len(self.candidates) > STREAMS_PER_FILE:
                self.candidates.popitem(last=False)
            return self.random, []
        return self._new(now, new_state)

    def _new(self, now: float, new_state: Callable[[], OpenFile]) -> tuple[Stream, list[OpenFile]]:
        displaced = []
        while len(self.streams) >= STREAMS_PER_FILE:
            resting = [s for s in self.streams if not s.reading]
            if not resting:  # every one is mid-read: keep them all until some are done
                break
            victim = next((s for s in resting if not s.state.readahead.sequential), resting[0])
            self.streams.remove(victim)
            displaced.append(victim.state)
        stream = Stream(new_state(), now)
        self.streams.append(stream)
        return stream, displaced

    def idle(self, now: float, idle_seconds: float) -> list[OpenFile]:
        """Remove the streams nothing read for ``idle_seconds`` and that have no read in flight; their states."""
        gone = []
        for stream in [*self.streams, *([self.random] if self.random is not None else [])]:
            if now < stream.last_read:
                # The wall clock was set back: idle from now on, not until the clock is back where it was (an
                # hour's step would hold the stream's blocks ahead, and their budget, for an hour).
                stream.last_read = now
            elif now - stream.last_read >= idle_seconds and not stream.reading:
                if stream is self.random:
                    self.random = None
                    self.candidates.clear()
                else:
                    self.streams.remove(stream)
                gone.append(stream.state)
        return gone

    def empty(self) -> bool:
        return not self.streams and self.random is None

    def states(self) -> list[OpenFile]:
        return [stream.state for stream in self.streams] + ([self.random.state] if self.random is not None else [])

    def entry_state(self) -> OpenFile:
        """A state of any stream (they all read one entry)."""
        stream = self.streams[0] if self.streams else self.random
        assert stream is not None, "a file whose streams are all gone is dropped (DatasetFS.close_idle)"
        return stream.state
