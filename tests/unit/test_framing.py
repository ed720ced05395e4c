"""MLLP framing rules, fed as byte chunks (no sockets)."""

from __future__ import annotations

from adapter.mllp.framing import Frame, FrameReader, Junk, OversizeFrame, UnterminatedFrame, wrap


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


class TestFrameReader:
    def test_one_frame(self) -> None:
        """A wrapped payload comes back as exactly that payload."""
        assert FrameReader().feed(wrap(b"MSH|x")) == [Frame(b"MSH|x")]

    def test_split_across_every_byte(self) -> None:
        """A frame delivered one byte per read is reassembled whole."""
        data = wrap(b"MSH|^~\\&|A\rPID|1")
        events = feed_all(FrameReader(), [data[i : i + 1] for i in range(len(data))])
        assert events == [Frame(b"MSH|^~\\&|A\rPID|1")]

    def test_two_frames_in_one_read(self) -> None:
        """Two frames merged in one TCP read yield two frames, in order."""
        assert FrameReader().feed(wrap(b"one") + wrap(b"two")) == [Frame(b"one"), Frame(b"two")]

    def test_junk_before_start_block_is_counted(self) -> None:
        """Bytes before a start block are reported as junk and skipped."""
        events = FrameReader().feed(b"hello" + wrap(b"MSH"))
        assert events == [Junk(5), Frame(b"MSH")]

    def test_end_block_without_carriage_return(self) -> None:
        """A sender that omits the CR after FS still has its frame read."""
        assert FrameReader().feed(b"\x0bone\x1c\x0btwo\x1c\r") == [Frame(b"one"), Frame(b"two")]

    def test_missing_end_block_is_reported(self) -> None:
        """A start block inside an open frame reports the unterminated frame and starts the new one."""
        events = FrameReader().feed(b"\x0bfirst" + wrap(b"second"))
        assert events == [UnterminatedFrame(b"first"), Frame(b"second")]

    def test_oversize_frame_keeps_head_and_discards_rest(self) -> None:
        """A frame past the limit yields its head and size; the next frame is read normally."""
        reader = FrameReader(max_frame_bytes=2048)
        big = b"MSH|" + b"x" * 10_000
        events = feed_all(reader, [wrap(big)[:3000], wrap(big)[3000:], wrap(b"next")])
        assert isinstance(events[0], OversizeFrame)
        assert events[0].size == len(big)
        assert events[0].head.startswith(b"MSH|xxx")
        assert events[1] == Frame(b"next")

    def test_partial_frame_is_held_until_taken(self) -> None:
        """An unfinished frame is held and can be taken at EOF."""
        reader = FrameReader()
        assert reader.feed(b"\x0bMSH|part") == []
        assert reader.in_frame and reader.pending_bytes == 8
        assert reader.take_partial() == b"MSH|part"
        assert not reader.in_frame
