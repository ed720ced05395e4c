"""Property tests: the lean parser agrees with hl7apy (the reference) and every bundle the adapter emits is valid R4.

Messages are generated with hypothesis: ADT segments laid out as real feeds send them (repeated
identifiers, names, addresses, locations), Z-segments of any shape, escape sequences anywhere,
CR / LF / CRLF separators. For each one the generator knows the true value of every leaf
(field, repetition, component, subcomponent); the lean parser must read exactly those values,
and hl7apy must find the same leaves holding the same text. Every golden message gets the same check.
Where hl7apy types a leaf NM (v2.3.1 CX-2) it hands back the number, not the text: such a leaf is
compared as hl7apy would render the lean parser's text (see as_hl7apy_numeric).
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapter.conformance.validator import Validator
from adapter.errors import InboundError
from adapter.hl7.message import Delimiters, Hl7Message, unescape
from adapter.hl7.parse import hl7apy_text, parse
from adapter.mapping.engine import map_message
from adapter.mapping.loader import load_mappings
from tests.conftest import GOLDEN, MAPPINGS, ROOT

Leaves = dict[tuple[int, int, int, int], str]  # (field, repetition, component, subcomponent) -> value
D = Delimiters()
# An escape sequence and the character it stands for (HL7 v2 chapter 2.7).
ESCAPES = {"\\F\\": "|", "\\S\\": "^", "\\T\\": "&", "\\R\\": "~", "\\E\\": "\\"}
PLAIN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,-/'()", max_size=12)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def leaf(draw: st.DrawFn) -> tuple[str, str]:
    """(text as sent, value meant): plain text with escape sequences mixed in."""
    parts = draw(st.lists(st.one_of(PLAIN, st.sampled_from(sorted(ESCAPES))), max_size=4))
    sent = "".join(parts).strip()
    # hl7apy and the lean parser both keep surrounding spaces; stripping keeps the generator simple.
    return sent, unescape(sent, D) if sent else ""


@st.composite
def field_value(
    draw: st.DrawFn, max_reps: int, max_comps: int, max_subs: int
) -> tuple[str, dict[tuple[int, int, int], str]]:
    """A field's text and its true leaves (repetition, component, subcomponent) -> value."""
    truth: dict[tuple[int, int, int], str] = {}
    reps = []
    for r in range(1, draw(st.integers(1, max_reps)) + 1):
        comps = []
        for c in range(1, draw(st.integers(1, max_comps)) + 1):
            subs = []
            for s in range(1, draw(st.integers(1, max_subs)) + 1):
                sent, meant = draw(leaf())
                subs.append(sent)
                if meant:
                    truth[(r, c, s)] = meant
            comps.append("&".join(subs))
        text = "^".join(comps)
        if not text.strip("^&"):  # an empty repetition is not sent (both parsers would drop it)
            text = "X"
            truth = {k: v for k, v in truth.items() if k[0] != r}
            truth[(r, 1, 1)] = "X"
        reps.append(text)
    return "~".join(reps), truth


# (segment, field, max repetitions, max components, max subcomponents): shapes the v2.5.1 datatypes allow.
LAYOUT = {
    "PID": [(3, 3, 5, 1), (5, 2, 5, 1), (11, 2, 6, 1), (13, 2, 4, 1), (18, 1, 1, 1)],
    "PV1": [(3, 1, 4, 1), (7, 1, 3, 1), (19, 1, 1, 1), (36, 1, 1, 1)],
    "NK1": [(2, 1, 3, 1), (3, 1, 2, 1)],
}


@st.composite
def message(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Leaves]]]:
    """A whole message as bytes, and the true leaves of every segment after MSH."""
    control_id = draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=20))
    version = draw(st.sampled_from(["2.3.1", "2.4", "2.5", "2.5.1", "2.6"]))
    event = draw(st.sampled_from(["A01", "A03", "A08", "A13", "A16"]))
    lines = [f"MSH|^~\\&|PAS|RRK|HW|LA|20261124103000||ADT^{event}|{control_id}|P|{version}"]
    truth: list[tuple[str, Leaves]] = []
    names = ["EVN", "PID", "PV1", *draw(st.lists(st.sampled_from(["NK1", "ZXY", "ZDS"]), max_size=3))]
    for name in names:
        fields: dict[int, str] = {}
        leaves: Leaves = {}
        if name == "EVN":
            lines.append(f"EVN|{event}")
            truth.append((name, {(1, 1, 1, 1): event}))
            continue
        shapes = LAYOUT.get(name) or [
            (n, 2, 3, 3) for n in sorted(draw(st.sets(st.integers(1, 8), min_size=1, max_size=4)))
        ]
        for n, max_reps, max_comps, max_subs in shapes:
            text, field_truth = draw(field_value(max_reps, max_comps, max_subs))
            fields[n] = text
            leaves.update({(n, *k): v for k, v in field_truth.items()})
        width = max(fields)
        lines.append("|".join([name] + [fields.get(i, "") for i in range(1, width + 1)]))
        truth.append((name, leaves))
    sep = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    return (sep.join(lines) + sep).encode(), truth


def lean_leaves(msg: Hl7Message, index: int) -> Leaves:
    """Every non-empty leaf of segment `index` as the lean parser reads it (unescaped)."""
    seg = msg.segments[index]
    out: Leaves = {}
    for n in range(1, len(seg.fields)):
        if seg.name == "MSH" and n <= 2:
            continue
        for r, rep in enumerate(seg.raw(n).split(D.repetition) if seg.raw(n) else [], start=1):
            for c, comp in enumerate(rep.split(D.component), start=1):
                for s in range(1, comp.count(D.subcomponent) + 2):
                    value = seg.repetitions(n)[r - 1].component(c, s)
                    if value:
                        out[(n, r, c, s)] = value
    return out


def _position(name: str | None, default: int) -> int:
    """A child's position from its hl7apy name (CX_4 -> 4); unnamed and primitive children count in order."""
    tail = (name or "").rsplit("_", 1)[-1]
    return int(tail) if "_" in (name or "") and tail.isdigit() else default


def _text(er7: str) -> str:
    # hl7apy keeps FT formatting commands (\.br\) as literal text and so escapes their escape
    # characters; HL7 v2 chapter 2.7.6 makes them commands, which the lean parser resolves.
    return er7.replace("\\E\\.br\\E\\", "\\.br\\")


def as_hl7apy_numeric(value: str) -> str:
    """A leaf's text as hl7apy gives back an NM leaf: a valid decimal in Python's canonical form, else as sent.

    hl7apy stores an NM value as decimal.Decimal and writes it back with str(), so "00" reads "0",
    "+5" "5", "1e2" "1E+2" and "nan" "NaN". HL7 v2.3.1 types CX-2 (check digit) as NM (2.3 and 2.4+ as ST).
    The lean parser keeps the text as sent, which is what Homeward needs: identifiers and check
    digits are compared and forwarded as the sender wrote them, never computed with.
    """
    try:
        return str(Decimal(value))
    except InvalidOperation:
        return value


def hl7apy_leaves(text: str) -> list[tuple[str, Leaves, set[tuple[int, int, int, int]]]]:
    """Every non-empty leaf of every segment as hl7apy reads it (escaped text, as hl7apy keeps it), and which are NM."""
    from hl7apy.parser import parse_message

    out = []
    for seg in parse_message(text, find_groups=False).children:
        leaves: Leaves = {}
        numeric: set[tuple[int, int, int, int]] = set()
        reps: dict[int, int] = defaultdict(int)
        n = 0
        for f in seg.children:
            # A field withdrawn from the version (v2.8 EVN-1) has no name; it comes after the last named one.
            n = _position(f.name, n + 1)
            if seg.name == "MSH" and n <= 2:
                continue
            reps[n] += 1
            for ci, comp in enumerate(f.children, start=1):
                c = _position(comp.name, ci)
                if D.subcomponent in comp.to_er7():
                    parts = [((n, reps[n], c, _position(sub.name, si)), sub) for si, sub in enumerate(comp.children, 1)]
                else:
                    parts = [((n, reps[n], c, 1), comp)]
                for key, node in parts:
                    leaves[key] = _text(node.to_er7())
                    if getattr(node, "datatype", None) == "NM":
                        numeric.add(key)
        out.append((seg.name, {k: v for k, v in leaves.items() if v}, numeric))
    return out


def assert_agree(msg: Hl7Message) -> None:
    """hl7apy and the lean parser see the same segments, and the same text in the same leaves."""
    reference = hl7apy_leaves(hl7apy_text(msg))
    assert [name for name, _, _ in reference] == msg.segment_names
    for index, (name, leaves, numeric) in enumerate(reference):
        if index == 0 and hl7apy_text(msg) != msg.text:
            leaves[(12, 1, 1, 1)] = msg.version  # hl7apy was handed 2.7 for 2.7.1 (and 2.8 for 2.8.1)
        lean = {k: as_hl7apy_numeric(v) if k in numeric else v for k, v in lean_leaves(msg, index).items()}
        assert {k: unescape(v, msg.delimiters) for k, v in leaves.items()} == lean, name


def _fields(name: str, values: dict[int, str]) -> str:
    return "|".join([name] + [values.get(i, "") for i in range(1, max(values) + 1)])


# The case hypothesis found (CI, intermittently): v2.3.1 PID-3.2 "00", which hl7apy reads as NM "0".
CHECK_DIGIT_00 = (
    "\r".join(
        [
            "MSH|^~\\&|PAS|RRK|HW|LA|20261124103000||ADT^A01|0|P|2.3.1",
            "EVN|A01",
            _fields("PID", {3: "^00", 5: "X", 18: "X"}),
            _fields("PV1", {3: "X", 7: "X", 19: "X", 36: "X"}),
            "",
        ]
    ).encode(),
    [
        ("EVN", {(1, 1, 1, 1): "A01"}),
        ("PID", {(3, 1, 2, 1): "00", (5, 1, 1, 1): "X", (18, 1, 1, 1): "X"}),
        ("PV1", {(3, 1, 1, 1): "X", (7, 1, 1, 1): "X", (19, 1, 1, 1): "X", (36, 1, 1, 1): "X"}),
    ],
)


class TestLeanParserAgreesWithHl7apy:
    @SETTINGS
    @given(message())
    @example(CHECK_DIGIT_00)
    def test_generated_messages(self, generated: tuple[bytes, list[tuple[str, Leaves]]]) -> None:
        """On generated messages the lean parser reads exactly the values sent, and hl7apy finds the same leaves."""
        data, truth = generated
        msg = parse(data)
        assert msg.segment_names[1:] == [name for name, _ in truth]
        for index, (_, leaves) in enumerate(truth, start=1):
            assert lean_leaves(msg, index) == leaves
        assert_agree(msg)

    def test_v231_check_digit_is_kept_as_sent(self) -> None:
        """v2.3.1 CX-2 is NM: hl7apy reads "00" as the number 0, the lean parser keeps "00", and they count as agreeing."""
        msg = parse(CHECK_DIGIT_00[0])
        pid = msg.segment("PID")
        assert pid is not None and pid.get(3, 2) == "00"
        ((_, leaves, numeric),) = [r for r in hl7apy_leaves(hl7apy_text(msg)) if r[0] == "PID"]
        assert leaves[(3, 1, 2, 1)] == "0" and (3, 1, 2, 1) in numeric
        assert_agree(msg)
        # The same field in 2.4 is ST: hl7apy keeps the text, so nothing numeric is involved.
        v24 = parse(CHECK_DIGIT_00[0].replace(b"|2.3.1", b"|2.4"))
        ((_, leaves, numeric),) = [r for r in hl7apy_leaves(hl7apy_text(v24)) if r[0] == "PID"]
        assert leaves[(3, 1, 2, 1)] == "00" and not numeric
        assert_agree(v24)

    def test_numeric_rendering_is_hl7apys(self) -> None:
        """The comparison renders only valid decimals the way hl7apy does; any other text stays as sent."""
        assert [as_hl7apy_numeric(v) for v in ("00", "+5", "1e2", "nan", "0.50", "A", "1,5", "")] == [
            "0", "5", "1E+2", "NaN", "0.50", "A", "1,5", "",
        ]  # fmt: skip

    @pytest.mark.parametrize("case", sorted(GOLDEN.glob("*/*.hl7")), ids=lambda p: f"{p.parent.name}/{p.stem}")
    def test_golden_messages(self, case: Any) -> None:
        """Every golden message reads the same with both parsers."""
        try:
            msg = parse(case.read_bytes())
        except InboundError:
            return  # a case refused on purpose (it keeps an .error.txt); nothing to compare
        assert_agree(msg)


# -- every bundle the adapter would emit is valid R4 -----------------------------------------------

MAPPINGS_SET = load_mappings(MAPPINGS)
TZ = ZoneInfo("Europe/London")
# fhir.resources checks structure and primitive formats but not required bindings (a Patient.gender of
# "bogus" passes); `homeward validate`'s validator checks those and the profiles each resource claims.
VALIDATOR = Validator(ROOT / "conformance")
BASE = [
    "MSH|^~\\&|PAS|RRK|HOMEWARD|COUNCIL|20261124103000||ADT^{event}^ADT_{event}|{control_id}|P|2.5.1|||AL|NE||UNICODE UTF-8",
    "EVN|{event}|{evn_time}",
    "PID|1||{nhs}^^^NHS^NH~{mrn}^^^RRK^MR||{family}^{given}^^^{prefix}||{birth}|{sex}|||{street}^^{city}^^{postcode}^GBR||{phone}",
    "PV1|1|{klass}|{ward}^{bed}^^RRK||||||||||||||||{visit}|||||||||||||||||{disposition}|{destination}|||||||{admit}|{discharge}",
]
# Values a feed sends: good ones, and the bad ones seen in the wild (impossible dates, padded codes).
# Good values are listed three times, so most messages get far enough to be mapped.
GOOD_TIMES = ["20261124102500", "202611241025", "20261124", "2026112410", "20261124102500+0100"]
BAD_TIMES = ["", "20261399", "2026-11-24", "20261124102599", "00000000", "N/A", "20261124T1025"]
TIMES = st.sampled_from(GOOD_TIMES * 3 + BAD_TIMES)
TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ abc'-", max_size=15)
CODES = st.sampled_from(["I", "O", "E", "M", "F", "U", "A", "N", "", " ", "X Y", "19", "HOME", "??"])


@st.composite
def mapped_input(draw: st.DrawFn) -> bytes:
    values = {
        "event": draw(st.sampled_from(["A01", "A03", "A08", "A13", "A16"])),
        "control_id": draw(st.text(alphabet="ABC0123456789", min_size=1, max_size=10)),
        "evn_time": draw(TIMES),
        "nhs": draw(st.sampled_from(["9449305552", "9449305553", "123", "", "94493O5552"])),
        "mrn": draw(st.text(alphabet="RK0123456789", max_size=10)),
        "family": draw(TEXT),
        "given": draw(TEXT),
        "prefix": draw(st.sampled_from(["MRS", "MR", "", "DR"])),
        "birth": draw(TIMES),
        "sex": draw(CODES),
        "street": draw(TEXT),
        "city": draw(TEXT),
        "postcode": draw(st.sampled_from(["MK9 1AA", "", "ZZ99 3VZ", "not a postcode"])),
        "phone": draw(st.sampled_from(["01908 000000", "", "+44 1908 000000", "n/a"])),
        "klass": draw(CODES),
        "ward": draw(TEXT),
        "bed": draw(TEXT),
        "visit": draw(st.text(alphabet="V0123456789", min_size=1, max_size=10)),
        "disposition": draw(CODES),
        "destination": draw(CODES),
        "admit": draw(TIMES),
        "discharge": draw(TIMES),
    }
    return "\r".join(line.format(**values) for line in BASE).encode()


class TestEmittedBundlesAreValid:
    @SETTINGS
    @given(mapped_input())
    def test_mapped_or_refused_never_invalid(self, data: bytes) -> None:
        """A generated message is refused with an ACK code, or mapped to a bundle valid R4 and to its profiles."""
        try:
            result = map_message(parse(data), MAPPINGS_SET, TZ)
        except InboundError as exc:
            assert exc.ack_code.value in ("AE", "AR") and exc.reason
            return
        Bundle.model_validate(result.bundle)
        assert [str(issue) for issue in VALIDATOR.validate(result.bundle)] == []
