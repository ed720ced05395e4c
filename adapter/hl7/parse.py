"""bytes -> Hl7Message: the one seam where HL7 v2 text is decoded, split and (optionally) checked by hl7apy.

The hot path is a plain split (PERFORMANCE.md: 0.008 ms against hl7apy's 16-35 ms), which keeps
Z-segments and tolerates what real feeds send. With `strict`, hl7apy parses the same text as the
reference for structure and version, and its complaints become ParseError. Either way, every
later stage sees the same Hl7Message.
"""

from __future__ import annotations

import re
from functools import lru_cache

from adapter.errors import ParseError, UnsupportedMessage
from adapter.hl7.message import Delimiters, Hl7Message, Segment

# MSH-18 values seen in feeds -> Python codecs (HL7 table 0211).
_CHARSETS = {
    "": None,
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
SUPPORTED_VERSIONS = (
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
    "2.8.2",
)
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")


def parse(data: bytes, *, fallback_charset: str = "cp1252", strict: bool = False) -> Hl7Message:
    """Decode and split one HL7 v2 message.

    Segment separators may be CR, LF or CRLF. Raises ParseError when the bytes are not an HL7 v2
    message (no MSH first, bad encoding characters, an undecodable charset, a malformed segment)
    and UnsupportedMessage for a version outside 2.2-2.8.
    """
    text, charset = _decode(data, fallback_charset)
    lines = [line for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if line.strip()]
    if not lines or not lines[0].startswith("MSH"):
        raise ParseError("the message does not start with an MSH segment", location="MSH")
    delimiters = _delimiters(lines[0])
    segments = [_segment(line, delimiters, index) for index, line in enumerate(lines, start=1)]
    message = Hl7Message("\r".join(lines), segments, delimiters, charset)
    _check_header(message)
    if strict:
        check_with_hl7apy(message)
    return message


def _decode(data: bytes, fallback: str) -> tuple[str, str]:
    data = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    declared = _declared_charset(data)
    if declared not in _CHARSETS:
        raise ParseError(
            "MSH-18 names a character set this adapter does not read", location="MSH-18", hl7_error_code="102"
        )
    codec = _CHARSETS[declared]
    if codec is None:
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return data.decode(fallback, errors="replace"), fallback
    try:
        return data.decode(codec), codec
    except UnicodeDecodeError as exc:
        raise ParseError(
            f"the message is not valid {codec} as MSH-18 declares", location="MSH-18", hl7_error_code="102"
        ) from exc


def _declared_charset(data: bytes) -> str:
    end = len(data)
    for sep in (b"\r", b"\n"):
        i = data.find(sep)
        if 0 <= i < end:
            end = i
    header = data[:end].decode("latin-1")
    if len(header) < 4 or not header.startswith("MSH"):
        return ""
    fields = header.split(header[3])
    # fields[0] = "MSH", fields[1] = MSH-2, so MSH-18 is fields[17]; the first repetition rules.
    value = fields[17] if len(fields) > 17 else ""
    return value.split(fields[1][1:2] or "~")[0].strip().upper() if len(fields) > 1 else ""


def _delimiters(msh: str) -> Delimiters:
    if len(msh) < 8:
        raise ParseError("the MSH segment is too short to hold its encoding characters", location="MSH-2")
    field_sep = msh[3]
    encoding = msh[4:].split(field_sep, 1)[0]
    if len(encoding) < 3 or len(set(encoding + field_sep)) != len(encoding) + 1:
        raise ParseError("MSH-1/MSH-2 do not declare distinct delimiters", location="MSH-2", hl7_error_code="102")
    subcomponent = encoding[3] if len(encoding) > 3 else "&"
    return Delimiters(field_sep, encoding[0], encoding[1], encoding[2], subcomponent)


@lru_cache(maxsize=512)
def _is_segment_name(name: str) -> bool:
    """Three characters, a letter then letters or digits; a feed uses a few dozen names, so kept, not rematched."""
    return _SEGMENT_NAME.match(name) is not None


def _segment(line: str, d: Delimiters, index: int) -> Segment:
    fields = line.split(d.field)
    name = fields[0]
    if not _is_segment_name(name):
        raise ParseError(f"segment {index} has no valid three-character name", location=f"segment {index}")
    if name == "MSH":
        fields.insert(1, d.field)
    return Segment(fields, d)


def _check_header(message: Hl7Message) -> None:
    if not message.message_type:
        raise ParseError("MSH-9 message type is empty", location="MSH-9", hl7_error_code="101")
    if not message.message_control_id:
        raise ParseError("MSH-10 message control id is empty", location="MSH-10", hl7_error_code="101")
    version = message.version
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedMessage("MSH-12 version is not one of 2.2-2.8", location="MSH-12", hl7_error_code="203")


def hl7apy_text(message: Hl7Message) -> str:
    """The message text as hl7apy can read it: it knows 2.7 and 2.8 but not 2.7.1 and 2.8.1, which add no structure."""
    version = message.version
    if version not in ("2.7.1", "2.8.1"):
        return message.text
    return message.text.replace(f"|{version}", f"|{version[:3]}", 1)


def check_with_hl7apy(message: Hl7Message) -> None:
    """Parse the message with hl7apy (the reference implementation) and raise ParseError on failure."""
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        parse_message(hl7apy_text(message), find_groups=False)
    except HL7apyException as exc:
        raise ParseError(f"hl7apy rejected the message structure ({type(exc).__name__})", hl7_error_code="100") from exc
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        # hl7apy raises plain Python errors on some malformed inputs as well.
        raise ParseError(f"hl7apy could not read the message ({type(exc).__name__})", hl7_error_code="100") from exc
