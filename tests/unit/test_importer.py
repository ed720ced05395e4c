"""Reading backlog files: batch envelopes, blank lines, every line ending, positions that resume exactly."""

from __future__ import annotations

import io

import pytest

from adapter.importer import Chunk, read_lines, split_messages

M1 = b"MSH|^~\\&|PAS|RRK|||20261124103000||ADT^A03|M1|P|2.5.1\rPID|1||X\rPV1|1|I"
M2 = b"MSH|^~\\&|PAS|RRK|||20261124103000||ADT^A08|M2|P|2.5.1\rPID|1||Y"


def split(data: bytes, chunk_size: int = 1 << 20, start: int = 0) -> tuple[list[Chunk], list[int]]:
    trailers: list[int] = []
    chunks = list(split_messages(read_lines(io.BytesIO(data), start, chunk_size), trailers.append))
    return chunks, trailers


def batch(sep: bytes) -> bytes:
    lines = [b"FHS|^~\\&|PAS|RRK", b"BHS|^~\\&|PAS|RRK", *M1.split(b"\r"), *M2.split(b"\r"), b"BTS|2", b"FTS|1"]
    return sep.join(lines) + sep


class TestSplitMessages:
    @pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
    @pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
    def test_batch_envelope_any_line_end_any_read_size(self, sep: bytes, chunk_size: int) -> None:
        """FHS/BHS/BTS/FTS are dropped, each MSH starts a message, BTS-1 is reported, whatever the reads."""
        chunks, trailers = split(batch(sep), chunk_size)
        assert [c.data for c in chunks] == [M1 + b"\r", M2 + b"\r"]
        assert trailers == [2]

    def test_blank_lines_separate_messages_and_stray_lines_are_kept(self) -> None:
        """Blank-line separated messages split there; lines with no MSH before them come out as their own chunk."""
        data = b"ZZZ|stray\n\n" + M1.replace(b"\r", b"\n") + b"\n\n\n" + M2.replace(b"\r", b"\n") + b"\n"
        chunks, _ = split(data)
        assert [c.data for c in chunks] == [b"ZZZ|stray\r", M1 + b"\r", M2 + b"\r"]

    def test_end_offset_resumes_at_the_next_message(self) -> None:
        """Reading again from a chunk's end offset yields exactly the messages after it."""
        data = batch(b"\r\n")
        first, _ = split(data)
        rest, trailers = split(data, start=first[0].end)
        assert [c.data for c in rest] == [M2 + b"\r"] and trailers == [2]
        assert split(data, start=first[1].end)[0] == []

    def test_crlf_split_across_reads_is_one_line_end(self) -> None:
        """A CR at the end of one read and LF at the start of the next make one line end, not a blank line."""
        data = M1.replace(b"\r", b"\r\n") + b"\r\n"
        for size in range(1, 12):
            chunks, _ = split(data, size)
            assert [c.data for c in chunks] == [M1 + b"\r"] and chunks[0].end == len(data)
