"""ACK contents, field by field, for AA, AE and AR (HL7 v2 chapter 2, original mode)."""

from __future__ import annotations

from datetime import UTC, datetime

from adapter.errors import AckCode
from adapter.hl7.ack import InboundHeader, build_ack
from tests.conftest import ack_fields

INBOUND = b"MSH|^~\\&|PAS|RRK|HOMEWARD|LA01|20261124103000||ADT^A03^ADT_A03|MSG42|T|2.5.1\rEVN|A03\r"
NOW = datetime(2026, 11, 24, 10, 30, 5, tzinfo=UTC)


def ack_for(inbound: bytes, code: AckCode, **kw: str) -> dict[str, list[str]]:
    return ack_fields(build_ack(InboundHeader.from_bytes(inbound), code, now=NOW, **kw))


class TestAck:
    def test_aa(self) -> None:
        """AA swaps sender and receiver, echoes MSH-10 in MSA-2, MSH-11 and MSH-12, and has no ERR."""
        ack = ack_for(INBOUND, AckCode.ACCEPT)
        msh = ack["MSH"]
        assert msh[3:7] == ["HOMEWARD", "LA01", "PAS", "RRK"]
        assert msh[7] == "20261124103005+0000"
        assert msh[9] == "ACK^A03^ACK"
        assert msh[10] and msh[10] != "MSG42"
        assert msh[11:13] == ["T", "2.5.1"]
        assert ack["MSA"] == ["MSA", "AA", "MSG42"]
        assert "ERR" not in ack

    def test_ae_with_location_v25(self) -> None:
        """AE carries ERR-2 location, ERR-3 table 0357 code, ERR-4 severity and ERR-8 text (v2.5+)."""
        ack = ack_for(INBOUND, AckCode.ERROR, error_code="101", location="PID-3", text="PID-3 is required")
        assert ack["MSA"][1:3] == ["AE", "MSG42"]
        err = ack["ERR"]
        assert err[2] == "PID^1^3"
        assert err[3] == "101^Required field missing^HL70357"
        assert err[4] == "E"
        assert err[8] == "PID-3 is required"

    def test_ar_v23_uses_err1(self) -> None:
        """Before v2.5 the error goes in ERR-1 (ELD) and MSH-9 has no structure component."""
        inbound = INBOUND.replace(b"2.5.1", b"2.3")
        ack = ack_for(inbound, AckCode.REJECT, error_code="201", location="MSH-9", text="event not taken")
        assert ack["MSH"][9] == "ACK^A03"
        assert ack["MSH"][12] == "2.3"
        assert ack["MSA"][1:3] == ["AR", "MSG42"]
        assert ack["ERR"][1] == "MSH^1^9^201&Unsupported event code&HL70357"

    def test_text_is_escaped(self) -> None:
        """Delimiters in error text are escaped so the ACK stays parseable."""
        ack = ack_for(INBOUND, AckCode.ERROR, text="a|b^c")
        assert ack["MSA"][3] == "a\\F\\b\\S\\c"

    def test_no_msh_still_answers(self) -> None:
        """A frame with no MSH still gets a well-formed ACK with an empty MSA-2."""
        ack = ack_for(b"garbage", AckCode.ERROR, error_code="100")
        assert ack["MSA"][1:3] == ["AE", ""]
        assert ack["ERR"][3].startswith("100^")

    def test_custom_delimiters_echoed(self) -> None:
        """An inbound message with other delimiters gets an ACK written with the same delimiters."""
        header = InboundHeader.from_bytes(b"MSH#$~\\&#PAS#RRK#HW#LA#2026##ADT$A03#X1#P#2.4")
        text = build_ack(header, AckCode.ACCEPT, now=NOW).decode()
        assert text.startswith("MSH#$~\\&#HW#LA#PAS#RRK#")
        assert "\rMSA#AA#X1\r" in text
