"""FHIR-side audit: one AuditEvent per delivery attempt, shaped like IHE Basic Audit Log Patterns (BALP).

Best effort by design: the store's hash-chained trail is the record; these events are a copy for
the council's audit repository. They are queued in memory and POSTed by one background task, so a
slow or absent audit server never holds up a delivery; what cannot be sent is counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from adapter import metrics
from adapter.store.base import OutboxItem

log = structlog.get_logger("homeward.audit_event")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
# BALP: a RESTful interaction is type "rest"; a transaction Bundle is the "transaction" interaction.
EVENT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"}
EVENT_SUBTYPE = {"system": "http://hl7.org/fhir/restful-interaction", "code": "transaction"}
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
# AuditEvent.outcome: 0 success, 4 minor failure (will be retried), 8 serious failure (dead letter).
OUTCOME = {"delivered": "0", "retry": "4", "dead": "8"}


def build_audit_event(
    item: OutboxItem,
    *,
    result: str,
    target_url: str,
    status: int | None,
    locations: list[str],
    recorded: float,
    observer: str,
) -> dict[str, Any]:
    """The AuditEvent for one attempt: ids and references only, never resource content."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": EVENT_TYPE,
        "subtype": [EVENT_SUBTYPE],
        "action": "E",
        "recorded": datetime.fromtimestamp(recorded, UTC).isoformat(timespec="milliseconds"),
        "outcome": OUTCOME[result],
        "agent": [
            {  # the client: this adapter
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {"display": observer},
                "requestor": True,
            },
            {  # the server it sent to
                "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
                "who": {"display": item.target},
                "requestor": False,
                "network": {"address": target_url, "type": "5"},
            },
        ],
        "source": {"observer": {"display": observer}, "type": [{"system": DCM, "code": "110153"}]},
        "entity": [
            {  # the message that was delivered: by its MSH-4 + MSH-10, as the hospital knows it
                "what": {
                    "identifier": {
                        "system": f"urn:homeward:msh-10:{item.sending_facility or 'unknown'}",
                        "value": item.message_control_id or f"outbox-{item.id}",
                    }
                },
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "20", "display": "Job"},
                "description": f"{item.event or 'message'} attempt {item.attempts + 1}"
                + (f", HTTP {status}" if status is not None else ""),
            }
        ],
    }
    for location in locations:
        reference = location.split("/_history/")[0] if "/_history/" in location else location
        if not reference or "/" not in reference:
            continue
        entity: dict[str, Any] = {
            "what": {"reference": location if "/_history/" in location else reference},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        }
        if reference.startswith("Patient/"):
            entity["type"] = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
            entity["role"] = {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}
        event["entity"].append(entity)
    return event


class AuditEventSender:
    """Queues AuditEvents and POSTs them to `url` (a FHIR base or its AuditEvent endpoint) in the background."""

    def __init__(self, url: str, *, observer: str = "homeward", timeout: float = 10.0, max_queue: int = 10_000):
        self.url = url.rstrip("/")
        if not self.url.endswith("/AuditEvent"):
            self.url += "/AuditEvent"
        self.observer = observer
        self.client = httpx.AsyncClient(timeout=timeout, headers={"Content-Type": "application/fhir+json"})
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None

    def attempt(
        self, item: OutboxItem, *, result: str, target_url: str, status: int | None, locations: list[str], now: float
    ) -> None:
        """Queue the event for one delivery attempt (never blocks, never raises)."""
        event = build_audit_event(
            item,
            result=result,
            target_url=target_url,
            status=status,
            locations=locations,
            recorded=now,
            observer=self.observer,
        )
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            metrics.AUDIT_EVENTS.labels("dropped").inc()
            log.warning("audit_event.dropped", outbox_id=item.id, reason="queue full")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                response = await self.client.post(self.url, json=event)
                ok = 200 <= response.status_code < 300
                status: int | None = response.status_code
            except httpx.HTTPError:
                ok, status = False, None
            metrics.AUDIT_EVENTS.labels("sent" if ok else "failed").inc()
            if not ok:
                log.warning("audit_event.failed", status=status, audit_event_id=event["id"])
            self.queue.task_done()

    async def aclose(self, grace: float = 5.0) -> None:
        """Send what is queued for up to `grace` seconds, then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.join(), grace)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()
