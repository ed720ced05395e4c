"""`homeward map --explain`: which rule set each element, and what the message carried that no rule read."""

from __future__ import annotations

import contextlib
import os

from adapter.hl7.message import Hl7Message
from adapter.mapping.engine import MapResult

# MSH fields the adapter itself reads (parsing, ACK, dedup, event routing, Provenance), not mapping rules.
HEADER_FIELDS = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 18}


def unused_fields(message: Hl7Message, result: MapResult) -> list[str]:
    """Locations that carry data no rule read, in message order ("PID-19", "ZXX (whole segment)")."""
    read_segments = {name for name, _ in result.used_fields}
    unused: list[str] = []
    seen: set[str] = set()
    for segment in message.segments:
        if segment.name == "MSH":
            numbers = [n for n in _fields_with_data(segment.fields) if n not in HEADER_FIELDS]
        elif segment.name not in read_segments:
            if segment.name not in seen:
                unused.append(f"{segment.name} (whole segment)")
            seen.add(segment.name)
            continue
        else:
            numbers = _fields_with_data(segment.fields)
        for n in numbers:
            location = f"{segment.name}-{n}"
            if (segment.name, n) not in result.used_fields and location not in seen:
                seen.add(location)
                unused.append(location)
    return unused


def _fields_with_data(fields: list[str]) -> list[int]:
    # Segment.fields is numbered as HL7 numbers fields (the parser keeps MSH-1 as its own field).
    return [i for i, value in enumerate(fields) if i and value]


def _short(origin: str) -> str:
    """A rule's origin with its file relative to the working directory when it is below it."""
    path, sep, key = origin.partition(": ")
    with contextlib.suppress(ValueError):  # another drive (Windows): keep it absolute
        path = os.path.relpath(path)
    return f"{path}{sep}{key}" if not path.startswith("..") else origin


def explain(message: Hl7Message, result: MapResult) -> list[str]:
    """The --explain report as lines: element <- source [rule], then routing, notes and unused fields."""
    lines = [f"{message.event} {message.message_control_id} (v{message.version}): {result.resource_count} entries"]
    width = max((len(t.element) for t in result.trace), default=0)
    for t in result.trace:
        lines.append(f"  {t.element.ljust(width)}  <- {t.source:<12}  {_short(t.origin)}")
    route = result.route
    targets = ", ".join(route.targets) or "none: kept as unrouted"
    lines.append(f"routing: targets {targets}; matched {', '.join(route.matched) or 'no route'}")
    lines.extend(f"note: {flag}" for flag in result.flags)
    unused = unused_fields(message, result)
    lines.append("not used by any rule: " + (", ".join(unused) if unused else "nothing"))
    return lines
