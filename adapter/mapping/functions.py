"""Small named transforms that mapping files call by name: dates, identifiers, NHS numbers, ids.

Each function takes the value a rule read (a string or a Repetition), a MapContext and the
rule's `args`, and returns the FHIR value, or None to set nothing. A value that cannot be carried
raises MappingError naming the field (never quoting the value: it may be patient data).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from operator import mul
from typing import Any
from zoneinfo import ZoneInfo

from adapter.errors import MappingError
from adapter.hl7.message import Hl7Message, Repetition, Segment
from adapter.mapping.model import Council

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
NHS_VERIFICATION_EXTENSION = "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus"
NHS_VERIFICATION_SYSTEM = "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland"
ODS_ORGANIZATION_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
# uuid5 namespace for Homeward's deterministic ids: the same identifier always gives the same id.
HOMEWARD_NAMESPACE = uuid.UUID("6f1d7e0c-3b0a-5a8e-9a55-2f0e6c1f4b1d")


@dataclass(slots=True)
class MapContext:
    """What a transform may look at besides its value: the message, the segment, the site settings."""

    message: Hl7Message
    segment: Segment | None
    location: str
    tz: ZoneInfo
    systems: dict[str, str]
    flags: list[str] = field(default_factory=list)
    # lookup(vocabulary, value, fhir_type, location): a site code table, with its unmapped policy.
    lookup: Callable[[str, Any, str, str], Any] | None = None
    councils: tuple[Council, ...] = ()  # the councils this message is routed to
    read: Callable[[str], str] | None = None  # first value at another location ("PID-32")

    # The systems with {sending_facility} already filled in, when the engine has done it once a message.
    resolved: dict[str, str] | None = None

    def system(self, name: str) -> str:
        """A site identifier system by name, with {sending_facility} filled in."""
        if self.resolved is not None and name in self.resolved:
            return self.resolved[name]
        try:
            template = self.systems[name]
        except KeyError:
            raise MappingError(f"no identifier system named '{name}' in site.yaml", location=self.location) from None
        value = system_text(template, self.message.sending_facility)
        if self.resolved is not None:
            self.resolved[name] = value
        return value


@lru_cache(maxsize=256)
def system_text(template: str, sending_facility: str) -> str:
    """A site system template with {sending_facility} (MSH-4) filled in; a site has a handful of each, so kept."""
    return template.format(sending_facility=sending_facility or "unknown")


def text(value: Any) -> str:
    """The plain text of a rule's value (first component of a repetition)."""
    if isinstance(value, Repetition):
        return value.component(1)
    return "" if value is None else str(value)


# -- dates and times --------------------------------------------------------------------------

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


def _parse_dtm(value: str, ctx: MapContext) -> tuple[datetime, int]:
    """Parse a v2 DTM/TS; return the moment and how many date/time parts were given (1-6)."""
    match = _DTM.match(value.strip())
    if not match:
        raise MappingError("not a valid HL7 v2 date/time", location=ctx.location, hl7_error_code="102")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    parts = (
        1 + (month is not None) + (day is not None) + (hour is not None) + (minute is not None) + (second is not None)
    )
    # Without an offset, a time is in the feed's zone: given to the constructor (replace() costs a copy).
    zone = ctx.tz if parts >= 4 and not offset else None
    try:
        moment = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int(fraction.ljust(6, "0")[:6]) if fraction else 0,
            zone,
        )
    except ValueError as exc:
        raise MappingError("not a real calendar date/time", location=ctx.location, hl7_error_code="102") from exc
    if offset:
        sign = 1 if offset[0] == "+" else -1
        if int(offset[1:3]) > 14 or int(offset[3:5]) > 59:  # real offsets run from -12:00 to +14:00
            raise MappingError("not a valid time zone offset", location=ctx.location, hl7_error_code="102")
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        moment = moment.replace(tzinfo=timezone(sign * delta))
    return moment, parts


_DATE_FORMATS = ("%Y", "%Y-%m", "%Y-%m-%d")


def _date_text(moment: datetime, parts: int) -> str:
    """The FHIR date of `moment` at the precision sent (YYYY, YYYY-MM, YYYY-MM-DD).

    Formatted by hand, as strftime would (strftime costs about 1 us, a tenth of the date's mapping);
    a year before 1000 goes to strftime, whose %Y does not pad it to four digits on every platform.
    """
    if moment.year < 1000:
        return moment.strftime(_DATE_FORMATS[min(parts, 3) - 1])
    if parts == 1:
        return str(moment.year)
    if parts == 2:
        return f"{moment.year}-{moment.month:02d}"
    return f"{moment.year}-{moment.month:02d}-{moment.day:02d}"


def date(value: Any, ctx: MapContext) -> str | None:
    """v2 DT/DTM -> FHIR date, keeping the precision sent (YYYY, YYYY-MM, YYYY-MM-DD)."""
    raw = text(value)
    if not raw:
        return None
    return _date_text(*_parse_dtm(raw, ctx))


def datetime_(value: Any, ctx: MapContext) -> str | None:
    """v2 DTM -> FHIR dateTime; with a time, always seconds and an offset (the feed's zone if none)."""
    raw = text(value)
    if not raw:
        return None
    moment, parts = _parse_dtm(raw, ctx)
    if parts <= 3:
        return _date_text(moment, parts)
    return moment.isoformat(timespec="seconds")


def datetime_plus(value: Any, ctx: MapContext, days: int = 0) -> str | None:
    """v2 DTM plus a number of days, as a FHIR dateTime at the precision sent (bridging care: 7 days)."""
    raw = text(value)
    if not raw:
        return None
    moment, parts = _parse_dtm(raw, ctx)
    moment += timedelta(days=int(days))
    if parts <= 3:
        return _date_text(moment, 3)
    return moment.isoformat(timespec="seconds")


def instant(value: Any, ctx: MapContext) -> str | None:
    """v2 DTM -> FHIR instant (needs at least minutes; seconds and offset filled in)."""
    raw = text(value)
    if not raw:
        return None
    moment, parts = _parse_dtm(raw, ctx)
    if parts < 5:
        raise MappingError("an instant needs a time to the minute", location=ctx.location, hl7_error_code="102")
    return moment.isoformat(timespec="seconds")


# -- identifiers ------------------------------------------------------------------------------


_NHS_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)  # of the first nine digits


def nhs_number_is_valid(number: str) -> bool:
    """Modulus 11 check of a 10-digit NHS number (NHS Data Dictionary)."""
    if len(number) != 10 or not number.isdigit():
        return False
    total: int = sum(map(mul, map(int, number[:9]), _NHS_WEIGHTS))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(number[9])


def _is_nhs_repetition(rep: Repetition) -> bool:
    return rep.component(4).upper() == "NHS" or rep.component(5).upper() == "NH"


def cx_identifier(
    value: Any,
    ctx: MapContext,
    mrn_system: str = "mrn",
    verification_field: str = "",
    verification_vocabulary: str = "",
) -> dict[str, Any] | None:
    """PID-3 repetition (CX) -> Identifier: a valid NHS number, or a local number of the hospital.

    An NHS number that fails its check digit is kept as a local identifier, never sent as an NHS
    number, and flagged for the audit record. A valid one carries the UK Core verification-status
    extension when `verification_field` (PID-32 in most English feeds) holds a code of
    `verification_vocabulary`.
    """
    if not isinstance(value, Repetition):
        return None
    number = value.component(1).replace(" ", "")
    if not number:
        return None
    if _is_nhs_repetition(value):
        if nhs_number_is_valid(number):
            ident: dict[str, Any] = {"system": NHS_NUMBER_SYSTEM, "value": number}
            status = _verification(ctx, verification_field, verification_vocabulary)
            if status:
                ident["extension"] = [{"url": NHS_VERIFICATION_EXTENSION, "valueCodeableConcept": status}]
            return ident
        ctx.flags.append(f"{ctx.location}: invalid NHS number kept as a local identifier")
        return {"system": ctx.system("invalid-nhs-number"), "value": number, "use": "secondary"}
    return {"system": ctx.system(mrn_system), "value": number, "use": "usual"}


def _verification(ctx: MapContext, location: str, vocabulary: str) -> Any:
    if not (location and vocabulary and ctx.read and ctx.lookup):
        return None
    code = ctx.read(location)
    return ctx.lookup(vocabulary, code, "CodeableConcept", location) if code else None


def xon_ods_reference(value: Any, ctx: MapContext) -> dict[str, Any] | None:
    """PD1-3 (XON) -> a Reference to the GP practice by its ODS code (XON-10, or XON-3 before v2.5)."""
    if not isinstance(value, Repetition):
        return None
    code = (value.component(10) or value.component(3)).strip().upper()
    if not code:
        return None
    ref: dict[str, Any] = {"identifier": {"system": ODS_ORGANIZATION_SYSTEM, "value": code}, "type": "Organization"}
    if value.component(1):
        ref["display"] = value.component(1)
    return ref


def cwe_concept(value: Any, ctx: MapContext, systems: str = "0396-CodingSystem") -> dict[str, Any] | None:
    """A CWE/CE (code^text^coding system, e.g. DG1-3) -> CodeableConcept.

    The coding system name is looked up in the `systems` code table; a code of a system the table
    does not list is carried as text only, never sent under a guessed system.
    """
    if not isinstance(value, Repetition):
        return None
    code, display, system_name = value.component(1), value.component(2), value.component(3)
    system = ctx.lookup(systems, system_name, "code", ctx.location) if (system_name and ctx.lookup) else None
    if code and system:
        coding = {"system": system, "code": code}
        if display:
            coding["display"] = display
        return {"coding": [coding], "text": display} if display else {"coding": [coding]}
    return {"text": display or code} if (display or code) else None


def council(value: Any, ctx: MapContext) -> list[dict[str, Any]]:
    """References to the councils the message is routed to (ServiceRequest.performer), by identifier."""
    return [
        {"identifier": {"system": c.system, "value": c.code}, "type": "Organization", "display": c.name}
        for c in ctx.councils
    ]


def identifier(value: Any, ctx: MapContext, system: str) -> dict[str, Any] | None:
    """A value -> Identifier with a named site system (e.g. PV1-19 -> the visit-number system)."""
    raw = text(value)
    return {"system": ctx.system(system), "value": raw} if raw else None


def ods_identifier(value: Any, ctx: MapContext) -> dict[str, Any] | None:
    """An ODS code (e.g. MSH-4) -> Identifier in the ODS organisation code system."""
    raw = text(value).strip().upper()
    return {"system": ODS_ORGANIZATION_SYSTEM, "value": raw} if raw else None


def deterministic_id(*parts: str) -> str:
    """A UUID that is the same whenever the same parts are given (resend-safe ids): uuid5 (RFC 4122)
    under HOMEWARD_NAMESPACE, computed directly (a mapping makes ~5 a message; uuid.uuid5 costs 3x)."""
    h = hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode()).hexdigest()
    # Digit 13 is the version (5); the top two bits of digit 17 the RFC 4122 variant (10).
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


_NAMESPACE_BYTES = HOMEWARD_NAMESPACE.bytes
_VARIANT_DIGIT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def constant_text(value: Any, ctx: MapContext, value_text: str = "") -> str | None:
    """Return the rule's fixed text when the source field has a value (for display texts)."""
    return value_text if text(value) else None


# Functions whose result is text that depends only on the value's text and the feed's time zone, and
# that note nothing in `flags`: the engine converts each value once a message.
TIME_FUNCTIONS = frozenset({"date", "dateTime", "instant"})

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "date": date,
    "dateTime": datetime_,
    "dateTime_plus": datetime_plus,
    "xon_ods_reference": xon_ods_reference,
    "council": council,
    "cwe_concept": cwe_concept,
    "instant": instant,
    "cx_identifier": cx_identifier,
    "identifier": identifier,
    "ods_identifier": ods_identifier,
    "text": lambda value, ctx: text(value) or None,
    "constant_text": constant_text,
}
