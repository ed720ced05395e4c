"""`homeward import`: a backlog file taken into the store as if each message had arrived over MLLP.

Files are HL7 batch files (FHS/BHS ... BTS/FTS around the messages) or plain messages one after
another, with or without blank lines between them; CR, LF and CRLF all separate segments. Files
are read as a stream, so a 100,000-message file costs what one message costs in memory. Every
message goes through the same intake as a live one (parse, map, validate, store, audit), so it is
accepted, recognised as a duplicate, filtered or refused with a reason exactly as it would be live.

The position reached in each file (the byte offset after the last message whose outcome is
committed) is saved in a state file every few hundred messages and at the end; a second run
starts from there. A crash between two saves only replays messages the store already has, and
those are recognised as duplicates.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson
import structlog

from adapter.intake import Handled, Intake

log = structlog.get_logger("homeward.import")

ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_CHUNK = 1 << 20
# Save the position after this many messages (a crash replays at most these, as duplicates).
SAVE_EVERY = 500


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message (or a stray block of lines with no MSH) and where it ends in the file."""

    data: bytes
    end: int  # byte offset just after it: the position once it is committed


@dataclass
class Summary:
    """Counts by outcome, refusal reasons, and what the batch trailers declared."""

    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    declared: int | None = None  # sum of BTS-1 message counts, when the file has trailers
    stopped: str = ""  # why the import stopped early (store unavailable), "" when it ran to the end
    position: int = 0  # byte offset after the last message whose outcome is committed
    resumed_from: int = 0  # the saved position this run started at

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def lines(self, name: str) -> list[str]:
        o = self.outcomes
        out = [
            f"{name}: {self.total} messages: {o['accepted']} accepted, {o['duplicate']} duplicates, "
            f"{o['filtered']} filtered, {o['unrouted']} unrouted, {o['refused']} refused"
        ]
        if self.resumed_from:
            out.append(f"  resumed at byte {self.resumed_from} (the position saved by an earlier run)")
        out += [f"  refused {n} x {reason}" for reason, n in self.reasons.most_common()]
        if self.declared is not None and self.declared != self.total and not (self.stopped or self.resumed_from):
            out.append(
                f"  note: the batch trailers (BTS-1) declare {self.declared} messages, the file holds {self.total}"
            )
        if self.stopped:
            out.append(f"  stopped: {self.stopped}; run the same command again to go on from here")
        return out


def read_lines(stream: BinaryIO, start: int, chunk_size: int = _CHUNK) -> Iterator[tuple[bytes, int]]:
    """Yield (line without its end, offset just after the end) from `start`, reading 1 MiB at a time."""
    stream.seek(start)
    offset = start
    buffer = b""
    while True:
        chunk = stream.read(chunk_size)
        buffer += chunk
        if chunk and buffer.endswith(b"\r"):
            # Maybe the first half of a CRLF: decide once the next chunk is read.
            body, held = buffer[:-1], b"\r"
        else:
            body, held = buffer, b""
        position = 0
        for match in _LINE_END.finditer(body):
            offset += match.end() - position
            yield body[position : match.start()], offset
            position = match.end()
        buffer = body[position:] + held
        if not chunk:
            if buffer:
                offset += len(buffer)
                yield buffer, offset
            return


def split_messages(lines: Iterator[tuple[bytes, int]], on_trailer: Callable[[int], None]) -> Iterator[Chunk]:
    """Group lines into messages: each MSH starts one; envelope segments and blank lines end one.

    `on_trailer` gets the message count of every BTS (batch trailer) seen.
    """
    current: list[bytes] = []
    end = 0
    for line, after in lines:
        stripped = line.strip()
        head = stripped[:3]
        if not stripped or head in ENVELOPE or head == b"MSH":
            if current:
                yield Chunk(b"\r".join(current) + b"\r", end)
                current = []
            if head == b"BTS":
                on_trailer(_declared_count(stripped))
            if head != b"MSH":
                end = after
                continue
        current.append(line)
        end = after
    if current:
        yield Chunk(b"\r".join(current) + b"\r", end)


def _declared_count(bts: bytes) -> int:
    fields = bts.split(bts[3:4] or b"|")
    try:
        return int(fields[1]) if len(fields) > 1 and fields[1].strip() else 0
    except ValueError:
        return 0


class Positions:
    """The state file: for each imported file (by absolute path), the byte offset reached."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, int] = orjson.loads(path.read_bytes()) if path.exists() else {}
        except orjson.JSONDecodeError:
            self.data = {}

    def get(self, file: Path) -> int:
        return int(self.data.get(str(file.resolve()), 0))

    def set(self, file: Path, offset: int) -> None:
        self.data[str(file.resolve())] = offset
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(self.data, option=orjson.OPT_INDENT_2))
        temporary.replace(self.path)  # atomic: a crash leaves the old position or the new one


async def import_file(
    intake: Intake,
    file: Path,
    positions: Positions,
    *,
    window: int = 1,
    progress: Callable[[int], None] = lambda offset: None,
) -> Summary:
    """Take every message of `file` from the saved position on; return what became of them.

    Up to `window` messages are in the intake at once; they reach the store in file order, so
    `window` > 1 is only for a store that commits in submission order (SQLite's single writer).
    Stops, keeping the position before the failed message, if the store becomes unavailable.
    """
    summary = Summary(position=positions.get(file), resumed_from=positions.get(file))

    def trailer(count: int) -> None:
        summary.declared = (summary.declared or 0) + count

    peer = f"import:{file.name}"
    saved_at = 0
    in_flight: list[tuple[asyncio.Task[Handled], int]] = []
    if summary.position:
        log.info("import.resumed", file=file.name, offset=summary.position)
    with open(file, "rb") as stream:
        for chunk in split_messages(read_lines(stream, summary.position), trailer):
            in_flight.append((asyncio.create_task(intake.handle(chunk.data, peer)), chunk.end))
            if len(in_flight) >= window and not await _settle(in_flight.pop(0), summary, progress):
                break
            if summary.total - saved_at >= SAVE_EVERY:
                positions.set(file, summary.position)
                saved_at = summary.total
        while in_flight and not summary.stopped:
            await _settle(in_flight.pop(0), summary, progress)
        for task, _ in in_flight:  # after a stop: the rest finish (each is kept) and are read again next run
            await task
    positions.set(file, summary.position)
    return summary


async def _settle(entry: tuple[asyncio.Task[Handled], int], summary: Summary, progress: Callable[[int], None]) -> bool:
    """Count one message's outcome and move the position past it; False when the import must stop."""
    task, end = entry
    handled = await task
    if handled.outcome == "store_unavailable":
        summary.stopped = f"the store is unavailable ({handled.reason})"
        return False
    summary.outcomes[handled.outcome] += 1
    if handled.outcome == "refused":
        summary.reasons[handled.reason] += 1
    summary.position = end
    progress(end)
    return True
