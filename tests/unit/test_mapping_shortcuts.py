"""The mapping's shortcuts give what the general code gives: hand-formatted dates, inline pruning, the NHS
number check, uuid5 ids, search tokens, repetition splitting, and conversions kept for one message only."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from adapter.hl7.message import Delimiters, Segment
from adapter.hl7.parse import parse
from adapter.mapping import functions
from adapter.mapping.engine import _search_system, _search_value, map_message, search_escape
from adapter.mapping.loader import load_mappings
from adapter.mapping.values import prune, set_path
from tests.conftest import MAPPINGS, golden_message

MAPPINGS_SET = load_mappings(MAPPINGS)
TZ = ZoneInfo("Europe/London")
CTX = functions.MapContext(parse(golden_message("ADT_A03/basic.hl7")), None, "PV1-45", TZ, {})


def reference_prune(node: Any) -> bool:
    """prune() as it was written before its inline fast path: one call per child."""
    if isinstance(node, dict):
        empty = [k for k, v in node.items() if reference_prune(v)]
        for key in empty:
            del node[key]
        return not node
    if isinstance(node, list):
        if any([reference_prune(v) for v in node]):
            node[:] = [v for v in node if not (v is None or v == "" or v == {} or v == [])]
        return not node
    return node is None or node == ""


LEAVES = st.one_of(st.none(), st.just(""), st.text(max_size=3), st.integers(-1, 1), st.booleans())
TREES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=2), inner, max_size=4)),
)


class TestPrune:
    @given(TREES)
    def test_same_tree_and_answer_as_the_one_call_per_child_version(self, tree: Any) -> None:
        """Empty strings, None, and dicts and lists left empty go, at any depth; 0 and False stay."""
        expected = copy.deepcopy(tree)
        expected_empty = reference_prune(expected)
        assert prune(tree) == expected_empty
        assert tree == expected


class TestSetPath:
    def test_paths_with_appends_and_indexes(self) -> None:
        """`[+]` appends a new item, `[n]` fills up to n, a repeating last element appends."""
        target: dict[str, Any] = {}
        set_path(target, "location[0].location.display", "WARD7", False)
        set_path(target, "contact[+].name.family", "SMITH", False)
        set_path(target, "contact[+].name.family", "JONES", False)
        set_path(target, "line", "1 HIGH STREET", True)
        set_path(target, "line", "FLAT 2", True)
        set_path(target, "given[2]", "ANN", False)
        assert target == {
            "location": [{"location": {"display": "WARD7"}}],
            "contact": [{"name": {"family": "SMITH"}}, {"name": {"family": "JONES"}}],
            "line": ["1 HIGH STREET", "FLAT 2"],
            "given": [None, None, "ANN"],
        }


# Any moment of years 1-9999 (strftime's %Y does not pad a year before 1000), sent at 1-6 parts (YYYY to seconds).
MOMENTS = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))


def dtm(moment: datetime, parts: int) -> tuple[str, datetime]:
    """The v2 DTM of `moment` cut to `parts` parts, and the moment that DTM stands for."""
    text = f"{moment:%m%d%H%M%S}"[: 2 * (parts - 1)]
    cut = (moment.month, moment.day, moment.hour, moment.minute, moment.second)[: parts - 1]
    given_parts = (*cut, *(1, 1, 0, 0, 0)[parts - 1 :])
    return f"{moment.year:04d}{text}", datetime(moment.year, *given_parts)


class TestDates:
    @given(MOMENTS, st.integers(1, 6))
    def test_dates_are_written_as_strftime_writes_them(self, moment: datetime, parts: int) -> None:
        """date (and dateTime without a time) keeps the precision sent, written as strftime writes it."""
        value, meant = dtm(moment, parts)
        expected = meant.strftime(("%Y", "%Y-%m", "%Y-%m-%d")[min(parts, 3) - 1])
        assert functions.date(value, CTX) == expected
        if parts <= 3:
            assert functions.datetime_(value, CTX) == expected

    @given(MOMENTS, st.integers(4, 6), st.integers(-12 * 60, 14 * 60))
    def test_times_carry_seconds_and_an_offset(self, moment: datetime, parts: int, minutes: int) -> None:
        """A time is in the offset sent, else in the feed's zone, written to the second."""
        value, meant = dtm(moment, parts)
        offset = f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
        zone = timezone(timedelta(minutes=minutes))
        assert functions.datetime_(value, CTX) == meant.replace(tzinfo=TZ).isoformat(timespec="seconds")
        assert functions.datetime_(value + offset, CTX) == meant.replace(tzinfo=zone).isoformat(timespec="seconds")

    @given(MOMENTS, st.integers(0, 30))
    def test_days_added_to_a_date(self, moment: datetime, days: int) -> None:
        """dateTime_plus on a date gives the date that many days later, as YYYY-MM-DD."""
        value, meant = dtm(moment, 3)
        assert functions.datetime_plus(value, CTX, days=days) == (meant + timedelta(days=days)).strftime("%Y-%m-%d")


def reference_nhs_check(number: str) -> bool:
    """The NHS Data Dictionary's modulus 11 check, written out."""
    if len(number) != 10:
        return False
    check = 11 - sum(int(d) * (10 - i) for i, d in enumerate(number[:9])) % 11
    check = 0 if check == 11 else check
    return check != 10 and check == int(number[9])


class TestIdentifiers:
    @given(st.text("0123456789", min_size=9, max_size=11))
    def test_nhs_number_check_digit(self, number: str) -> None:
        """Modulus 11 over ten digits, a check of 11 read as 0 and of 10 never valid (NHS Data Dictionary)."""
        assert functions.nhs_number_is_valid(number) == reference_nhs_check(number)

    @given(st.lists(st.text(max_size=12), min_size=1, max_size=4))
    def test_deterministic_id_is_uuid5(self, parts: list[str]) -> None:
        """The id is uuid5 of the joined parts under Homeward's namespace, version and variant bits included."""
        expected = uuid.uuid5(functions.HOMEWARD_NAMESPACE, "|".join(parts))
        assert functions.deterministic_id(*parts) == str(expected)

    @given(st.text(max_size=12))
    def test_search_tokens_escape_and_encode(self, value: str) -> None:
        """A conditional update's identifier token is escaped (FHIR search) and then percent-encoded."""
        assert _search_value(value) == quote(search_escape(value), safe="")
        assert _search_system(value) == quote(search_escape(value), safe=":/")


class TestRepetitions:
    def test_empty_repetitions_are_skipped_and_escapes_resolved(self) -> None:
        """Repetitions holding only component or subcomponent separators are not repetitions at all."""
        segment = Segment(["PID", "", "", "A\\T\\B^1~^&^~~C^2"], Delimiters())
        reps = segment.repetitions(3)
        assert [(r.component(1), r.component(2)) for r in reps] == [("A&B", "1"), ("C", "2")]
        assert segment.repetitions(4) == []


class TestOneMessageAtATime:
    def test_times_and_systems_follow_each_message(self) -> None:
        """The discharge time (read by three rules) and MSH-4's systems are each message's own, message after message."""
        first = golden_message("ADT_A03/basic.hl7")
        second = first.replace(b"|RRK|", b"|RX1|", 1).replace(b"20261124101500", b"20260101120000")

        def seen(raw: bytes) -> tuple[set[str], str, str]:
            by_type = {
                e["resource"]["resourceType"]: e for e in map_message(parse(raw), MAPPINGS_SET, TZ).bundle["entry"]
            }
            ends = {
                by_type["Encounter"]["resource"]["period"]["end"],
                by_type["ServiceRequest"]["resource"]["occurrenceDateTime"],
                by_type["CarePlan"]["resource"]["period"]["start"],
            }
            encounter = by_type["Encounter"]
            return ends, encounter["resource"]["identifier"][0]["system"], encounter["request"]["url"]

        for raw, end, facility in (
            (first, "2026-11-24T10:15:00+00:00", "RRK"),
            (second, "2026-01-01T12:00:00+00:00", "RX1"),
            (first, "2026-11-24T10:15:00+00:00", "RRK"),
        ):
            ends, system, url = seen(raw)
            assert ends == {end}
            assert system == f"https://homeward.example.org/fhir/Id/{facility}/visit-number"
            assert url.startswith(f"Encounter?identifier=https://homeward.example.org/fhir/Id/{facility}/visit-number|")
