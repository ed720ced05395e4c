"""The parsing seam: separators, versions, charsets, escapes, Z-segments, and what it refuses."""

from __future__ import annotations

import pytest

from adapter.errors import ParseError, UnsupportedMessage
from adapter.hl7.parse import check_with_hl7apy, parse

MSH = b"MSH|^~\\&|PAS|RRK|HW|LA|20261124103000||ADT^A03^ADT_A03|C1|P|2.5.1"


class TestParse:
    @pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
    def test_segment_separators(self, sep: bytes) -> None:
        """CR, LF and CRLF separated messages give the same segments."""
        message = parse(sep.join([MSH, b"PID|1||123", b"ZDS|1|P1"]) + sep)
        assert message.segment_names == ["MSH", "PID", "ZDS"]
        assert message.segment("ZDS").get(2) == "P1"  # type: ignore[union-attr]

    def test_msh_numbering(self) -> None:
        """MSH-9, MSH-10 and MSH-12 are numbered as the standard numbers them."""
        message = parse(MSH)
        assert (message.message_type, message.trigger_event, message.message_structure) == ("ADT", "A03", "ADT_A03")
        assert message.message_control_id == "C1"
        assert message.version == "2.5.1"
        assert message.msh.get(1) == "|"
        assert message.msh.get(2) == "^~\\&"

    def test_escape_sequences(self) -> None:
        """Field, component, repetition, escape, hex and line-break escapes are resolved on access."""
        message = parse(MSH + b"\rNTE|1||a\\F\\b\\S\\c\\R\\d\\E\\e\\X41\\\\.br\\end")
        assert message.segment("NTE").get(3) == "a|b^c~d\\eA\nend"  # type: ignore[union-attr]

    def test_repetitions_and_components(self) -> None:
        """Repetitions and subcomponents are addressable, 1-based."""
        message = parse(MSH + b"\rPID|1||111^^^NHS^NH~222^^^RRK^MR||SMITH&VAN^JO")
        pid = message.segment("PID")
        assert pid is not None
        assert [r.component(1) for r in pid.repetitions(3)] == ["111", "222"]
        assert pid.get(3, 5, repetition=2) == "MR"
        assert pid.get(5, 1, 2) == "VAN"

    def test_latin1_declared_in_msh18(self) -> None:
        """MSH-18 8859/1 decodes the bytes as Latin-1."""
        msh = MSH + b"||||||8859/1"
        message = parse(msh + b"\rPID|1||1||Z\xf6e")
        assert message.segment("PID").get(5) == "Zöe"  # type: ignore[union-attr]
        assert message.charset == "iso8859-1"

    def test_utf8_without_msh18(self) -> None:
        """Without MSH-18, valid UTF-8 is read as UTF-8."""
        message = parse(MSH + "\rPID|1||1||Zöe".encode())
        assert message.segment("PID").get(5) == "Zöe"  # type: ignore[union-attr]

    @pytest.mark.parametrize("version", ["2.2", "2.3", "2.3.1", "2.4", "2.5", "2.6", "2.7", "2.8"])
    def test_versions_accepted(self, version: str) -> None:
        """Versions 2.2 to 2.8 are read."""
        assert parse(MSH.replace(b"2.5.1", version.encode())).version == version

    def test_unknown_version_refused(self) -> None:
        """A version outside 2.x is refused as unsupported (table 0357 code 203)."""
        with pytest.raises(UnsupportedMessage) as info:
            parse(MSH.replace(b"2.5.1", b"3.0"))
        assert info.value.hl7_error_code == "203"

    @pytest.mark.parametrize(
        ("data", "location"),
        [
            (b"PID|1", "MSH"),
            (b"garbage", "MSH"),
            (MSH.replace(b"|C1|", b"||"), "MSH-10"),
            (MSH + b"\rpid|1", "segment 2"),
        ],
    )
    def test_unreadable_messages(self, data: bytes, location: str) -> None:
        """Messages that are not HL7 v2 raise ParseError naming where."""
        with pytest.raises(ParseError) as info:
            parse(data)
        assert info.value.location == location

    def test_hl7apy_reference_accepts_golden(self) -> None:
        """The strict path (hl7apy) accepts a well-formed message."""
        check_with_hl7apy(parse(MSH + b"\rEVN|A03|20261124\rPID|1||123^^^RRK^MR"))
