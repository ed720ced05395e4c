"""The durable store's contract: what intake puts, what the forwarder claims, and the records they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Outcome(StrEnum):
    """What became of an inbound frame (inbound.outcome)."""

    ACCEPTED = "accepted"  # stored and queued for delivery; AA sent
    FILTERED = "filtered"  # AA sent, nothing to deliver by site configuration
    DUPLICATE = "duplicate"  # same MSH-4 + MSH-10 as an accepted message; AA sent, not queued again
    REFUSED = "refused"  # AE or AR sent; kept with the reason


class DeliveryState(StrEnum):
    """Where an outbox row stands (outbox.state)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """One frame as received, with what the adapter decided; `raw` is the original bytes."""

    raw: bytes
    peer: str = ""
    sending_facility: str = ""
    message_control_id: str = ""
    event: str = ""
    received_at: float = 0.0
    # Keyed HMAC of the NHS number (adapter/audit/keys.py); never the number itself.
    patient_key: str = ""

    @property
    def dedup_key(self) -> str | None:
        """MSH-4 + MSH-10, the identity a resend shares with its original."""
        if not self.message_control_id:
            return None
        return f"{self.sending_facility}|{self.message_control_id}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One bundle bound for one target; rows with the same ordering_key are sent in arrival order."""

    target: str
    ordering_key: str
    bundle: bytes  # FHIR JSON, exactly as it will be sent
    resource_count: int = 0


@dataclass(frozen=True, slots=True)
class AcceptResult:
    inbound_id: int
    duplicate: bool
    outbox_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class OutboxItem:
    """A claimed outbox row, handed to a target."""

    id: int
    inbound_id: int
    target: str
    ordering_key: str
    bundle: bytes
    attempts: int
    created_at: float
    sending_facility: str = ""
    message_control_id: str = ""
    event: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    """What intake and the forwarder need from durable storage.

    Every method commits before it returns: when `accept` returns, the message survives a crash.
    Implementations raise StoreUnavailable when they cannot commit.
    """

    async def accept(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> AcceptResult:
        """Store an accepted message and queue its deliveries, or recognise a duplicate."""
        ...

    async def record(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> int:
        """Keep a frame that is not queued (refused or filtered), with the reason."""
        ...

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Claim up to `limit` due rows, at most one per (target, ordering_key), oldest first."""
        ...

    async def mark_delivered(self, item: OutboxItem, now: float, detail: dict[str, Any]) -> None: ...

    async def reschedule(
        self, item: OutboxItem, next_attempt_at: float, reason: str, detail: dict[str, Any]
    ) -> None: ...

    async def dead_letter(self, item: OutboxItem, now: float, reason: str, detail: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
