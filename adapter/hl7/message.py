"""The parsed HL7 v2 message every later stage reads: segments, fields, repetitions, components.

Values are split lazily and unescaped on access (HL7 v2 chapter 2.7 escape sequences), so a
message costs what its mapping reads, not what it carries. Field numbers follow the standard:
for MSH, MSH-1 is the field separator and MSH-2 the encoding characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators one message declared in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


_HIGHLIGHT = re.compile(r"^[HN]$")


def unescape(text: str, d: Delimiters) -> str:
    """Resolve \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\ escapes; drop \\H\\ \\N\\ highlighting."""
    if not d.escape or d.escape not in text:
        return text
    parts = text.split(d.escape)
    # parts alternates literal, escape body, literal, ...; an odd count means every escape closed.
    if len(parts) % 2 == 0:
        return text  # an unclosed escape: keep the text as sent rather than guess
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        out.append(_resolve_escape(parts[i], d))
        out.append(parts[i + 1])
    return "".join(out)


def _resolve_escape(body: str, d: Delimiters) -> str:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
    if body in simple:
        return simple[body]
    if body == ".br":
        return "\n"
    if _HIGHLIGHT.match(body):
        return ""
    if body.startswith("X") and len(body) % 2 == 1:
        try:
            return bytes.fromhex(body[1:]).decode("latin-1")
        except ValueError:
            pass
    # Unknown escapes (\Zxx\ site-defined, \C..\ / \M..\ charset switches) are kept as sent.
    return d.escape + body + d.escape


class Repetition:
    """One repetition of a field: components and subcomponents, 1-based as in HL7."""

    __slots__ = ("_components", "_d", "raw")

    def __init__(self, raw: str, d: Delimiters):
        self.raw = raw
        self._d = d
        self._components: list[str] | None = None

    def component(self, n: int = 1, sub: int = 1) -> str:
        """The unescaped text of component `n`, subcomponent `sub` ("" when absent)."""
        d = self._d
        if not d.component:  # MSH-1 / MSH-2: the delimiters themselves, never split
            return self.raw if n == 1 and sub == 1 else ""
        components = self._components
        if components is None:
            components = self._components = self.raw.split(d.component)
        if n > len(components):
            return ""
        value = components[n - 1]
        if d.subcomponent in value:
            subs = value.split(d.subcomponent)
            value = subs[sub - 1] if sub <= len(subs) else ""
        elif sub > 1:
            return ""
        # Most values carry no escape: the test is made here rather than by a call to unescape().
        return unescape(value, d) if d.escape and d.escape in value else value

    @property
    def is_empty(self) -> bool:
        """True when the repetition carries no data at all."""
        return not self.raw.strip(self._d.component + self._d.subcomponent)


# MSH-1 and MSH-2 hold the delimiters themselves: never split.
_UNSPLIT = Delimiters("", "", "", "", "")


@dataclass(slots=True)
class Segment:
    """One segment; `fields[n]` is the raw text of field n (fields[0] is the segment name)."""

    fields: list[str]
    delimiters: Delimiters = field(default_factory=Delimiters)
    # Split repetitions by field number: a mapping reads the same field many times (MSH-4 a dozen
    # times a message), and segments are never changed after parsing.
    _repetitions: dict[int, list[Repetition]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.fields[0]

    def raw(self, n: int) -> str:
        """Raw text of field `n`, "" when absent."""
        return self.fields[n] if n < len(self.fields) else ""

    def repetitions(self, n: int) -> list[Repetition]:
        """Every non-empty repetition of field `n` (MSH-2 is never split)."""
        cached = self._repetitions.get(n)
        if cached is None:
            cached = self._repetitions[n] = self._split(n)
        return cached

    def _split(self, n: int) -> list[Repetition]:
        fields = self.fields
        raw = fields[n] if n < len(fields) else ""
        if not raw:
            return []
        if n <= 2 and fields[0] == "MSH":
            return [Repetition(raw, _UNSPLIT)]
        d = self.delimiters
        blank = d.component + d.subcomponent  # what Repetition.is_empty strips, tested before building one
        return [Repetition(r, d) for r in raw.split(d.repetition) if r.strip(blank)]

    def get(self, n: int, component: int = 1, sub: int = 1, repetition: int = 1) -> str:
        """Unescaped value at field `n`, repetition, component and subcomponent ("" when absent)."""
        reps = self.repetitions(n)
        if repetition > len(reps):
            return ""
        return reps[repetition - 1].component(component, sub)

    @property
    def used_fields(self) -> list[int]:
        """Field numbers that carry data."""
        return [i for i, f in enumerate(self.fields) if i and f]


@dataclass(slots=True)
class Hl7Message:
    """A decoded HL7 v2 message: its text, its segments, and the MSH fields every stage needs."""

    text: str
    segments: list[Segment]
    delimiters: Delimiters
    charset: str = "utf-8"
    # Segments by name, built on first use: a mapping looks segments up ~30 times a message, and
    # segments are never added or removed after parsing.
    _by_name: dict[str, list[Segment]] | None = field(default=None, repr=False, compare=False)
    # MSH values read again and again (MSH-4 a dozen times a message), by field and component.
    _header: dict[tuple[int, int], str] = field(default_factory=dict, repr=False, compare=False)

    def _msh(self, n: int, component: int = 1) -> str:
        key = (n, component)
        value = self._header.get(key)
        if value is None:
            value = self._header[key] = self.segments[0].get(n, component)
        return value

    def _index(self) -> dict[str, list[Segment]]:
        index: dict[str, list[Segment]] = {}
        for seg in self.segments:
            index.setdefault(seg.fields[0], []).append(seg)
        self._by_name = index
        return index

    def segment(self, name: str) -> Segment | None:
        """The first segment called `name`, or None."""
        found = (self._by_name or self._index()).get(name)
        return found[0] if found else None

    def all(self, name: str) -> list[Segment]:
        """Every segment called `name`, in order."""
        return list((self._by_name or self._index()).get(name, ()))

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_control_id(self) -> str:
        """MSH-10."""
        return self._msh(10)

    @property
    def sending_application(self) -> str:
        """MSH-3.1."""
        return self._msh(3)

    @property
    def sending_facility(self) -> str:
        """MSH-4.1 (in England usually the ODS code of the trust)."""
        return self._msh(4)

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. ADT."""
        return self._msh(9)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. A03."""
        return self._msh(9, 2)

    @property
    def message_structure(self) -> str:
        """MSH-9.3, e.g. ADT_A03 (absent before v2.3.1)."""
        return self._msh(9, 3)

    @property
    def event(self) -> str:
        """Message type and trigger event as one name, e.g. ADT^A03."""
        return f"{self.message_type}^{self.trigger_event}"

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. 2.5.1."""
        return self._msh(12)

    @property
    def processing_id(self) -> str:
        """MSH-11.1: P production, T training, D debugging."""
        return self._msh(11)

    @property
    def message_datetime(self) -> str:
        """MSH-7 as sent (a v2 DTM)."""
        return self._msh(7)

    @property
    def segment_names(self) -> list[str]:
        return [seg.name for seg in self.segments]
