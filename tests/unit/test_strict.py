"""hl7.strict: hl7apy checks the structure too, and what hl7apy refuses is refused with AE (the original kept)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from adapter.config import Settings
from adapter.errors import InboundError, ParseError
from adapter.hl7.parse import hl7apy_text, parse
from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.store.sqlite import SqliteStore
from tests.conftest import GOLDEN, MAPPINGS, ack_fields, golden_message
from tests.integration.test_delivery import adt, send

GOOD = golden_message("ADT_A03/basic.hl7")
# Structures the lean parser reads (it only splits) and hl7apy, the reference, refuses as no segment of
# HL7 v2: a non-Z segment name the standard does not define, and one with a digit in it.
HL7APY_REFUSES = {
    "undefined segment XYZ": GOOD.rstrip(b"\r") + b"\rXYZ|1|2\r",
    "undefined segment AB1": GOOD.rstrip(b"\r") + b"\rAB1|x\r",
}


def hl7apy_refuses(data: bytes) -> bool:
    try:
        parse_message(hl7apy_text(parse(data)), find_groups=False)
    except HL7apyException:
        return True
    return False


class TestStrictParse:
    def test_off_by_default(self) -> None:
        assert Settings().hl7.strict is False and IntakeOptions().strict is False

    @pytest.mark.parametrize("case", sorted(GOLDEN.glob("*/*.hl7")), ids=lambda p: f"{p.parent.name}/{p.stem}")
    def test_strict_accepts_every_golden_message_the_lean_parser_reads(self, case: Any) -> None:
        """Turning strict on refuses nothing more among the golden messages (hl7apy reads them all)."""
        data = case.read_bytes()
        try:
            lean = parse(data)
        except InboundError:
            with pytest.raises(InboundError):
                parse(data, strict=True)
            return
        assert parse(data, strict=True).segment_names == lean.segment_names

    @pytest.mark.parametrize("name", sorted(HL7APY_REFUSES))
    def test_strict_refuses_what_hl7apy_refuses(self, name: str) -> None:
        """hl7apy itself raises on these; the lean parser alone reads them; with strict they are ParseError 100."""
        data = HL7APY_REFUSES[name]
        assert hl7apy_refuses(data)
        assert parse(data).segment_names[-1] == name[-3:]
        with pytest.raises(ParseError) as info:
            parse(data, strict=True)
        assert info.value.hl7_error_code == "100" and "hl7apy" in info.value.reason


class TestStrictIntake:
    @pytest.mark.parametrize("strict", [False, True])
    def test_intake_answers_ae_only_when_strict(self, tmp_path: Path, strict: bool) -> None:
        """The same message is AA without strict and AE 100 with it, stored as refused with its bytes kept."""
        data = HL7APY_REFUSES["undefined segment XYZ"]
        store = SqliteStore(tmp_path / "store.sqlite3")
        try:
            intake = Intake(store, load_mappings(MAPPINGS), IntakeOptions(strict=strict))
            ack = ack_fields(asyncio.run(intake.frame(data, "test")))
            outcome, raw, facility, control_id = store.query(
                "SELECT outcome, raw, sending_facility, message_control_id FROM inbound"
            )[0]
            outbox = store.query("SELECT count(*) FROM outbox")[0][0]
            # The corrected message, resent with the same MSH-10, is a new message, not a duplicate.
            resent = ack_fields(asyncio.run(intake.frame(GOOD, "test"))) if strict else None
            outcomes = [row[0] for row in store.query("SELECT outcome FROM inbound ORDER BY id")]
        finally:
            store.close()
        assert bytes(raw) == data
        # Refused or not, the row carries MSH-4 and MSH-10, so `audit show MSH-10` finds it.
        assert (facility, control_id) == ("RRK", "MSG00001")
        if strict:
            assert ack["MSA"][1] == "AE" and ack["ERR"][3].startswith("100")
            assert outcome == "refused" and outbox == 0
            assert resent is not None and resent["MSA"][1] == "AA"
            assert outcomes == ["refused", "accepted"]
        else:
            assert ack["MSA"][1] == "AA" and outcome == "accepted" and outbox >= 1

    def test_serve_with_hl7_strict_env(self, serve) -> None:  # type: ignore[no-untyped-def]
        """HOMEWARD_HL7_STRICT=true reaches the running server: hl7apy's refusal is AE, a good message AA."""
        process = serve(HOMEWARD_HL7_STRICT="true")
        bad = HL7APY_REFUSES["undefined segment XYZ"].replace(b"|MSG00001|", b"|STRICT-1|")
        assert send(process.port, bad, adt("STRICT-2")) == ["AE", "AA"]
        with sqlite3.connect(Path(process.env["HOMEWARD_STORE"])) as conn:
            rows = conn.execute("SELECT outcome, raw FROM inbound ORDER BY id").fetchall()
        assert [(outcome, bytes(raw)) for outcome, raw in rows] == [("refused", bad), ("accepted", adt("STRICT-2"))]
