"""Sans-IO MLLP: feed() bytes in any chunking, get whole frames out; wrap() a payload for the wire.

MLLP (HL7 v2 Appendix C): <VT> payload <FS><CR>. No sockets here, so the rules are testable with
byte lists: junk before a start block is counted and skipped, a start block inside an open frame
means the previous frame lost its end block, and a frame past `max_frame_bytes` is cut to its head
(kept for the record and for the MSH an ACK needs) while the rest is discarded up to its end block.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"

# How much of an oversize frame is kept: enough for the MSH segment and the first segments.
OVERSIZE_HEAD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete payload between a start block and an end block."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class OversizeFrame:
    """A frame longer than the limit: its first bytes and its total size."""

    head: bytes
    size: int


@dataclass(frozen=True, slots=True)
class UnterminatedFrame:
    """A frame cut short by a new start block (the sender dropped its end block)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Junk:
    """Bytes outside any frame, skipped."""

    size: int


Event = Frame | OversizeFrame | UnterminatedFrame | Junk


def wrap(payload: bytes) -> bytes:
    """Frame one payload for the wire."""
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


class FrameReader:
    """Incremental MLLP decoder: feed(data) returns the events completed by that data."""

    def __init__(self, max_frame_bytes: int = 1_048_576):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._in_frame = False
        self._discarding = False  # inside an oversize frame, skipping to its end block
        self._oversize_head = b""
        self._oversize_size = 0
        self._after_end_block = False  # swallow the CR that follows FS

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished frame held so far (0 between frames)."""
        return self._oversize_size if self._discarding else len(self._buffer)

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended."""
        return self._in_frame

    def take_partial(self) -> bytes:
        """Return and forget what an unfinished frame held (at EOF or idle time-out)."""
        data = self._oversize_head if self._discarding else bytes(self._buffer)
        self._reset()
        return data

    def feed(self, data: bytes) -> list[Event]:
        """Consume `data`; return every event it completes, in order."""
        events: list[Event] = []
        view = memoryview(data)
        pos = 0
        junk = 0
        while pos < len(view):
            if self._after_end_block:
                self._after_end_block = False
                if view[pos] == CARRIAGE_RETURN[0]:
                    pos += 1
                    continue
            if not self._in_frame:
                start = data.find(START_BLOCK, pos)
                if start < 0:
                    junk += len(view) - pos
                    break
                junk += start - pos
                pos = start + 1
                self._in_frame = True
                continue
            pos = self._consume_frame_bytes(data, pos, events)
        if junk:
            events.insert(0, Junk(junk))
        return events

    def _consume_frame_bytes(self, data: bytes, pos: int, events: list[Event]) -> int:
        end = data.find(END_BLOCK, pos)
        restart = data.find(START_BLOCK, pos)
        if restart >= 0 and (end < 0 or restart < end):
            # A new frame began before this one ended: report what we had, start afresh.
            self._append(data[pos:restart])
            events.append(UnterminatedFrame(self.take_partial()))
            self._in_frame = True
            return restart + 1
        chunk_end = len(data) if end < 0 else end
        self._append(data[pos:chunk_end])
        if end < 0:
            return len(data)
        events.append(self._finish())
        self._after_end_block = True
        return end + 1

    def _append(self, chunk: bytes) -> None:
        if self._discarding:
            self._oversize_size += len(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > self.max_frame_bytes:
            self._discarding = True
            self._oversize_head = bytes(self._buffer[:OVERSIZE_HEAD_BYTES])
            self._oversize_size = len(self._buffer)
            self._buffer = bytearray()

    def _finish(self) -> Event:
        event: Event
        if self._discarding:
            event = OversizeFrame(self._oversize_head, self._oversize_size)
        else:
            event = Frame(bytes(self._buffer))
        self._reset()
        return event

    def _reset(self) -> None:
        self._buffer = bytearray()
        self._in_frame = False
        self._discarding = False
        self._oversize_head = b""
        self._oversize_size = 0
