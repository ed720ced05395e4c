"""Bad input never crashes the mapping: seeded mutations of the golden messages give a valid bundle or a clear refusal."""

from __future__ import annotations

import random
from zoneinfo import ZoneInfo

import pytest

from adapter.errors import InboundError
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.loader import load_mappings
from adapter.mapping.validate import validate_bundle
from tests.conftest import GOLDEN, MAPPINGS

# Values real feeds get wrong: stray delimiters, bad escapes, impossible dates and offsets, huge or odd text.
JUNK = ["", "^", "~", "&", "\\", "\\X0\\", "\\F\\", "99999999999999", "2026", "20261301", "20261124101500+9999"]
JUNK += ["A" * 300, "^^^^^", "~~", "é", "-1", "24HR~~BRIDGING", "0000000000^^^NHS^NH"]


def mutate(text: str, rnd: random.Random) -> bytes:
    """Replace or extend one field of one non-MSH segment with junk."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n").split("\n")
    i = rnd.randrange(1, len(lines))
    fields = lines[i].split("|")
    j = rnd.randrange(1, len(fields) + 3)
    fields.extend([""] * (j + 1 - len(fields)))
    fields[j] = rnd.choice(JUNK) if rnd.random() < 0.6 else fields[j] + rnd.choice(JUNK)
    lines[i] = "|".join(fields)
    return "\r".join(lines).encode()


@pytest.mark.parametrize("seed", range(4))
def test_mutated_messages_map_or_are_refused(seed: int) -> None:
    """300 mutated messages per seed: each maps to a bundle that passes R4B validation, or raises InboundError."""
    mappings = load_mappings(MAPPINGS)
    tz = ZoneInfo("Europe/London")
    cases = sorted(GOLDEN.glob("*/*.hl7"))
    rnd = random.Random(seed)
    mapped = 0
    for _ in range(300):
        raw = mutate(rnd.choice(cases).read_text(encoding="utf-8"), rnd)
        try:
            result = map_message(parse(raw), mappings, tz)
        except InboundError:
            continue
        validate_bundle(result.bundle)  # raises MappingError: the engine let an invalid value through
        mapped += 1
    assert mapped > 100  # most mutations land in fields that map fine: the test exercises the happy path too
