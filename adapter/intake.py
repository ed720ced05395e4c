"""The MLLP frame handler: parse -> route -> map -> store -> ACK. The only code that picks ACK codes.

AA is returned only after the store has committed the message (and its deliveries): AA means
"durably accepted", not "delivered". Every frame, refused ones included, is kept with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import structlog

from adapter import metrics
from adapter.audit.keys import AuditKeys
from adapter.errors import AckCode, InboundError, StoreUnavailable, UnsupportedMessage
from adapter.hl7.ack import InboundHeader, build_ack
from adapter.hl7.message import Hl7Message
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.functions import NHS_NUMBER_SYSTEM
from adapter.mapping.model import MappingSet
from adapter.mapping.validate import validate_bundle
from adapter.mllp.allow import AllowList
from adapter.store.base import Delivery, InboundRecord, IntakeStore, Outcome
from adapter.visits import visit_and_time

log = structlog.get_logger("homeward.intake")

DEFAULT_TARGET = "default"


@dataclass(frozen=True, slots=True)
class IntakeOptions:
    """The intake knobs (from Settings)."""

    timezone: str = "Europe/London"
    strict: bool = False
    fallback_charset: str = "cp1252"
    # "datatypes": the per-value checks the engine always makes; "full": also the whole bundle through
    # fhir.resources R4B before it is stored (config.MappingSettings.validation says why the default).
    validation: str = "datatypes"
    # mllp.allow_networks / mllp.allow_facilities: others get AR before anything else is done.
    allow: AllowList = field(default_factory=AllowList)


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of one message: the ACK sent, its code, the outcome stored, and why (refusals)."""

    ack: bytes
    code: AckCode
    outcome: str  # accepted | duplicate | filtered | unrouted | refused | store_unavailable
    reason: str = ""


class Intake:
    """Turns one inbound frame into one ACK, storing it first."""

    def __init__(
        self,
        store: IntakeStore,
        mappings: MappingSet,
        options: IntakeOptions,
        on_accepted: Callable[[], None] = lambda: None,
        audit_keys: AuditKeys | None = None,
    ):
        self.store = store
        self.mappings = mappings
        self.options = options
        self.tz = ZoneInfo(options.timezone)
        self.on_accepted = on_accepted
        self.audit_keys = audit_keys

    async def frame(self, payload: bytes, peer: str) -> bytes:
        """Handle one complete MLLP frame and return the ACK bytes to send back."""
        return (await self.handle(payload, peer)).ack

    async def handle(self, payload: bytes, peer: str) -> Handled:
        """Handle one message (from MLLP or `homeward import`): store it, and say what became of it."""
        started = time.perf_counter()
        reason = ""
        header = InboundHeader.from_bytes(payload)
        # Identified by the header read for the ACK until parsing succeeds, so that a refused frame
        # (unparseable, refused by hl7.strict or the allow-list) is found by its MSH-10 in the audit.
        record = InboundRecord(
            raw=payload,
            peer=peer,
            sending_facility=header.sending_facility,
            message_control_id=header.message_control_id,
            received_at=time.time(),
        )
        bound = log.bind(
            peer=peer,
            message_control_id=header.message_control_id,
            sending_facility=header.sending_facility,
            size=len(payload),
        )
        bound.info("message.received")
        try:
            if self.options.allow.networks or self.options.allow.facilities:
                self.options.allow.check(peer, header.sending_facility)
            message = parse(payload, fallback_charset=self.options.fallback_charset, strict=self.options.strict)
            record = _identify(record, message)
            bound = bound.bind(message_type=message.event)
            code, outcome = await self._process(message, record, bound)
            ack = build_ack(header, code)
        except InboundError as exc:
            outcome = await self._refuse(record, exc, bound)
            code = exc.ack_code
            reason = _reason(exc)
            ack = build_ack(header, exc.ack_code, error_code=exc.hl7_error_code, location=exc.location, text=exc.reason)
        except Exception:  # a bug must not kill the connection: AE 207, so the sender does not loop
            bound.exception("message.internal_error")
            internal = InboundError("internal error while processing the message")
            outcome = await self._refuse(record, internal, bound)
            code = AckCode.ERROR
            reason = f"207: {internal.reason}"
            ack = build_ack(header, code, error_code="207", text=internal.reason)
        elapsed = time.perf_counter() - started
        event = record.event or "unknown"
        metrics.RECEIVED.labels(event).inc()
        metrics.ACKED.labels(event, code.value).inc()
        metrics.ACK_LATENCY.observe(elapsed)
        bound.info("message.acked", ack_code=code.value, outcome=outcome, duration_ms=round(elapsed * 1000, 3))
        return Handled(ack, code, outcome, reason)

    async def oversize(self, head: bytes, size: int, peer: str) -> bytes:
        """A frame over the size limit: keep its head, answer AR naming the limit."""
        header = InboundHeader.from_bytes(head)
        record = InboundRecord(
            raw=head,
            peer=peer,
            received_at=time.time(),
            sending_facility=header.sending_facility,
            message_control_id=header.message_control_id,
        )
        reason = f"frame of {size} bytes is over mllp.max_frame_bytes; only its first bytes were kept"
        bound = log.bind(
            peer=peer,
            message_control_id=header.message_control_id,
            sending_facility=header.sending_facility,
            size=size,
        )
        bound.warning("mllp.frame_oversize")
        exc = InboundError(reason)
        exc.ack_code = AckCode.REJECT
        await self._refuse(record, exc, bound)
        metrics.RECEIVED.labels("unknown").inc()
        metrics.ACKED.labels("unknown", AckCode.REJECT.value).inc()
        return build_ack(header, AckCode.REJECT, error_code="207", text=reason)

    async def incomplete(self, partial: bytes, peer: str, reason: str) -> None:
        """A frame that never ended (EOF, idle time-out, a new start block): kept, not acknowledged."""
        header = InboundHeader.from_bytes(partial)
        record = InboundRecord(
            raw=partial,
            peer=peer,
            received_at=time.time(),
            sending_facility=header.sending_facility,
            message_control_id=header.message_control_id,
        )
        bound = log.bind(peer=peer, message_control_id=header.message_control_id, size=len(partial))
        bound.warning("mllp.frame_incomplete", reason=reason)
        metrics.RECEIVED.labels("unknown").inc()
        try:
            await self.store.record(record, Outcome.REFUSED, "", f"incomplete frame: {reason}; not acknowledged")
        except StoreUnavailable:
            bound.error("store.unavailable", stage="incomplete_frame")

    async def _process(self, message: Hl7Message, record: InboundRecord, bound: Any) -> tuple[AckCode, str]:
        action = self._route(message)
        if action == "ignore":
            await self.store.record(record, Outcome.FILTERED, "AA", f"event {message.trigger_event} is not processed")
            return AckCode.ACCEPT, Outcome.FILTERED.value
        result = map_message(message, self.mappings, self.tz)
        if self.options.validation == "full":
            validate_bundle(result.bundle)
        bundle = orjson.dumps(result.bundle)
        if self.audit_keys is not None:
            record = replace(record, patient_key=_patient_key(result.bundle, self.audit_keys))
        route = result.route
        if route.unrouted:
            # No routing rule matched and site.yaml names no unrouted target: kept and reported, not dropped.
            reason = "no routing rule in site.yaml matched (postcode district, local authority code, fields)"
            await self.store.record(record, Outcome.UNROUTED, "AA", reason)
            bound.warning("message.unrouted", reason=reason)
            return AckCode.ACCEPT, Outcome.UNROUTED.value
        visit_key, event_time = visit_and_time(message, self.tz)
        deliveries = [
            Delivery(name, result.ordering_key, bundle, result.resource_count, visit_key, event_time)
            for name in route.targets
        ]
        detail = {
            "ack_code": AckCode.ACCEPT.value,  # sent once this commit returns
            "resources": result.resource_count,
            "entries": _entry_ids(result.bundle),
            "flags": result.flags,
            "targets": list(route.targets),
            "routes": list(route.matched),
        }
        accepted = await self.store.accept(record, deliveries, detail)
        if accepted.duplicate:
            bound.info("message.duplicate", inbound_id=accepted.inbound_id)
            return AckCode.ACCEPT, Outcome.DUPLICATE.value
        bound.info(
            "message.stored",
            inbound_id=accepted.inbound_id,
            resources=result.resource_count,
            flags=len(result.flags),
        )
        self.on_accepted()
        return AckCode.ACCEPT, Outcome.ACCEPTED.value

    def _route(self, message: Hl7Message) -> str:
        if message.message_type != "ADT":
            raise UnsupportedMessage(
                f"message type {message.message_type} is not taken", location="MSH-9", hl7_error_code="200"
            )
        site = self.mappings.site
        action = site.events.get(message.trigger_event)
        if action is None:
            if site.unknown_events == "reject":
                raise UnsupportedMessage(
                    f"event {message.trigger_event} is not taken by this site",
                    location="MSH-9",
                    hl7_error_code="201",
                )
            return "ignore"
        return action

    async def _refuse(self, record: InboundRecord, exc: InboundError, bound: Any) -> str:
        bound.warning(
            "message.refused",
            ack_code=exc.ack_code.value,
            hl7_error_code=exc.hl7_error_code,
            location=exc.location,
            reason=exc.reason,
        )
        if isinstance(exc, StoreUnavailable):
            return "store_unavailable"
        try:
            await self.store.record(record, Outcome.REFUSED, exc.ack_code.value, _reason(exc))
        except StoreUnavailable:
            bound.error("store.unavailable", stage="refused_message")
        return Outcome.REFUSED.value


def _identify(record: InboundRecord, message: Hl7Message) -> InboundRecord:
    return InboundRecord(
        raw=record.raw,
        peer=record.peer,
        sending_facility=message.sending_facility,
        message_control_id=message.message_control_id,
        event=message.event,
        received_at=record.received_at,
    )


# Their fullUrl is a uuid5 of the person's identifier (an NHS number has ~10^9 values, so it could be
# brute-forced back): the audit records, which outlive retention, name only their type.
_PERSON_TYPES = frozenset({"Patient", "RelatedPerson"})


def _entry_ids(bundle: dict[str, Any]) -> list[str]:
    """'Type fullUrl' of each mapped resource (a person's resource: type only); never identifier values."""
    ids = []
    for entry in bundle.get("entry", []):
        resource_type = entry.get("resource", {}).get("resourceType", "")
        ids.append(resource_type if resource_type in _PERSON_TYPES else f"{resource_type} {entry.get('fullUrl', '')}")
    return ids


def _patient_key(bundle: dict[str, Any], keys: AuditKeys) -> str:
    """The lookup key of the bundle's Patient's NHS number ('' without one)."""
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Patient":
            continue
        for identifier in resource.get("identifier", []):
            if identifier.get("system") == NHS_NUMBER_SYSTEM and identifier.get("value"):
                return keys.patient_key(str(identifier["value"]))
    return ""


def _reason(exc: InboundError) -> str:
    where = f" at {exc.location}" if exc.location else ""
    return f"{exc.hl7_error_code}{where}: {exc.reason}"
