"""The stale-event rule's inputs, read from the message: which visit it is about and when the event happened."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from adapter.errors import MappingError
from adapter.hl7.message import Hl7Message
from adapter.mapping.functions import MapContext, datetime_


def visit_and_time(message: Hl7Message, tz: ZoneInfo) -> tuple[str, float | None]:
    """The stale-event rule's inputs: the visit (MSH-4 + PV1-19) and when the event happened (EVN-2, else MSH-7).

    No visit number or no readable time: ("", None), and the rule does not apply to the message.
    """
    pv1 = message.segment("PV1")
    visit = pv1.get(19) if pv1 is not None else ""
    if not visit:
        return "", None
    evn = message.segment("EVN")
    for location, value in (("EVN-2", evn.get(2) if evn is not None else ""), ("MSH-7", message.msh.get(7))):
        if not value:
            continue
        try:
            iso = datetime_(value, MapContext(message, None, location, tz, {}))
        except MappingError:
            continue
        if iso:
            when = datetime.fromisoformat(iso)
            return f"{message.sending_facility}|{visit}", (when if when.tzinfo else when.replace(tzinfo=tz)).timestamp()
    return "", None
