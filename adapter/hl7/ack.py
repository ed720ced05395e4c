"""Build original-mode ACKs (HL7 v2 chapter 2): MSA + ERR, addressed back to the sender.

MSH-3/4 and MSH-5/6 are swapped from the inbound message, MSH-12 and MSH-11 are echoed, MSA-2
echoes the inbound MSH-10. ERR is written as the inbound version expects: ERR-1 (ELD) before
v2.5, ERR-2 location / ERR-3 code / ERR-4 severity from v2.5 on. A frame with no readable MSH
still gets an answer, built from whatever header fields could be read.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from adapter.errors import AckCode

# Table 0357 (message error condition codes) texts for the codes Homeward uses.
ERROR_TEXT = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

_counter = itertools.count(1)


@dataclass(frozen=True, slots=True)
class InboundHeader:
    """The MSH fields an ACK needs, as read from the inbound message (raw, still escaped)."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    trigger_event: str = ""
    message_control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    field_separator: str = "|"
    encoding_characters: str = "^~\\&"

    @classmethod
    def from_bytes(cls, data: bytes) -> InboundHeader:
        """Best-effort read of MSH from raw bytes, for frames that failed to parse."""
        text = data.lstrip(b"\x0b\r\n \t").decode("latin-1")
        first = text.replace("\n", "\r").split("\r", 1)[0]
        if not first.startswith("MSH") or len(first) < 8:
            return cls()
        sep = first[3]
        f = first.split(sep)
        enc = f[1] if len(f) > 1 and len(f[1]) >= 3 else "^~\\&"

        def at(n: int) -> str:  # MSH-n is f[n - 1] because MSH-1 is the separator itself
            return f[n - 1] if len(f) >= n else ""

        return cls(
            sending_application=at(3),
            sending_facility=at(4),
            receiving_application=at(5),
            receiving_facility=at(6),
            trigger_event=at(9).split(enc[0])[1] if enc[0] in at(9) else "",
            message_control_id=at(10),
            processing_id=at(11) or "P",
            version=at(12).split(enc[0])[0] or "2.5.1",
            field_separator=sep,
            encoding_characters=enc,
        )


def build_ack(
    header: InboundHeader,
    code: AckCode,
    *,
    error_code: str | None = None,
    location: str | None = None,
    text: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """Return the ACK message bytes (UTF-8, CR-separated), without MLLP framing."""
    f = header.field_separator
    comp = header.encoding_characters[0]
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z") or ""
    control_id = f"ACK{time.time_ns() // 1_000_000}{next(_counter) % 10000:04d}"
    msg_type = (
        f"ACK{comp}{header.trigger_event}{comp}ACK"
        if _at_least(header.version, "2.4")
        else f"ACK{comp}{header.trigger_event}"
    )
    msh = f.join(
        [
            "MSH",
            header.encoding_characters,
            header.receiving_application,
            header.receiving_facility,
            header.sending_application,
            header.sending_facility,
            stamp,
            "",
            msg_type,
            control_id,
            header.processing_id,
            header.version,
        ]
    )
    msa_text = _escape(text or "", header)[:80] if code is not AckCode.ACCEPT else ""
    msa = ["MSA", code.value, header.message_control_id] + ([msa_text] if msa_text else [])
    segments = [msh, f.join(msa)]
    if code is not AckCode.ACCEPT:
        segments.append(_err(header, error_code or "207", location, text or ""))
    return ("\r".join(segments) + "\r").encode("utf-8")


def _err(header: InboundHeader, error_code: str, location: str | None, text: str) -> str:
    f = header.field_separator
    comp = header.encoding_characters[0]
    sub = header.encoding_characters[3] if len(header.encoding_characters) > 3 else "&"
    segment, field = _split_location(location)
    code_text = ERROR_TEXT.get(error_code, "Application internal error")
    if not _at_least(header.version, "2.5"):
        # ERR-1 ELD: segment ID ^ sequence ^ field position ^ code (CE, subcomponents).
        eld = comp.join([segment, "1" if segment else "", field, sub.join([error_code, code_text, "HL70357"])])
        return f.join(["ERR", eld])
    erl = comp.join([segment, "1", field]).rstrip(comp) if segment else ""
    cwe = comp.join([error_code, code_text, "HL70357"])
    return f.join(["ERR", "", erl, cwe, "E", "", "", "", _escape(text, header)])


def _split_location(location: str | None) -> tuple[str, str]:
    """'PID-3' -> ('PID', '3'); 'PID' -> ('PID', ''); anything else -> ('', '')."""
    if not location:
        return "", ""
    seg, _, rest = location.partition("-")
    if len(seg) != 3 or not seg.isalnum():
        return "", ""
    field = rest.split(".", 1)[0]
    return seg, field if field.isdigit() else ""


def _escape(text: str, header: InboundHeader) -> str:
    esc = header.encoding_characters[2] if len(header.encoding_characters) > 2 else "\\"
    enc = header.encoding_characters
    table = {
        esc: f"{esc}E{esc}",
        header.field_separator: f"{esc}F{esc}",
        enc[0]: f"{esc}S{esc}",
        enc[1]: f"{esc}R{esc}",
    }
    if len(enc) > 3:
        table[enc[3]] = f"{esc}T{esc}"
    return "".join(table.get(ch, ch) for ch in text.replace("\r", " ").replace("\n", " "))


def _at_least(version: str, floor: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    return key(version) >= key(floor)
