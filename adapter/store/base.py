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
    UNROUTED = "unrouted"  # AA sent; kept with the reason: no site.yaml routing rule chose a target


class DeliveryState(StrEnum):
    """Where an outbox row stands (outbox.state)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # in the dead letters: waits for a person (retry or discard)
    DISCARDED = "discarded"  # a dead letter a person chose not to deliver; kept, never sent
    STALE = "stale"  # not sent: older (EVN-2/MSH-7) than what was already applied for its visit


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
    # The stale-event rule: a row whose event_time is older than the newest one already delivered
    # for the same (target, visit_key) is not sent. Empty visit_key or None event_time: no check.
    visit_key: str = ""
    event_time: float | None = None


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
    # When the current run of attempts began (arrival, or a manual retry/replay): the age limit counts from here.
    queued_at: float = 0.0
    visit_key: str = ""
    event_time: float | None = None
    # The newest event_time already delivered to this target for visit_key, read when the row was
    # claimed (its predecessors are no longer pending then): what the stale-event rule compares with.
    applied_event_time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What became of one claimed row: the state change and the audit record written with it.

    `stage` is the audit stage and says what changes: `delivered`, `retry_scheduled` (stays pending
    until `next_attempt_at`), `dead_lettered` or `stale`. `reason` is kept on the row for people
    (last_error); the audit record carries `detail`.
    """

    item: OutboxItem
    stage: str
    detail: dict[str, Any]
    reason: str = ""
    next_attempt_at: float = 0.0

    def audit_detail(self) -> dict[str, Any]:
        """The audit record's detail: the reason goes in, but the detail's own (coded) reason wins,
        since `reason` may quote the server's words and audit records outlive the retention purge."""
        if self.stage in ("dead_lettered", "stale") and self.reason:
            return {"reason": self.reason, **self.detail}
        return self.detail

    @property
    def frees_key(self) -> bool:
        """Whether the row stops holding its (target, ordering_key): anything but a rescheduled retry."""
        return self.stage != "retry_scheduled"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    inbound_id: int | None
    outbox_id: int | None
    stage: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """An outbox row as the dead-letters and replay commands show it (no bundle, no raw message)."""

    id: int
    inbound_id: int
    target: str
    ordering_key: str
    state: DeliveryState
    attempts: int
    created_at: float
    queued_at: float
    next_attempt_at: float
    delivered_at: float | None
    last_error: str
    # The server's OperationOutcome (JSON text) from the last failed attempt, if it sent one.
    last_outcome: str | None
    sending_facility: str
    message_control_id: str
    event: str


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did a manual action, and why: written into its audit record."""

    who: str
    why: str = ""

    def detail(self) -> dict[str, str]:
        return {"actor": self.who, "why": self.why}


class IntakeStore(Protocol):
    """What intake needs from durable storage: both commit before they return (when `accept` returns,
    the message survives a crash), or raise StoreUnavailable."""

    async def accept(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> AcceptResult:
        """Store an accepted message and queue its deliveries, or recognise a duplicate."""
        ...

    async def record(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> int:
        """Keep a frame that is not queued (refused or filtered), with the reason."""
        ...


class DeliveryStore(Protocol):
    """What the forwarder needs from durable storage (both commit before they return)."""

    # How many rows one process may hold claimed at once (PostgreSQL holds a connection per claim).
    max_claims: int

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Claim up to `limit` due rows, at most one per (target, ordering_key), oldest first."""
        ...

    async def record_outcomes(
        self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float
    ) -> list[OutboxItem | None]:
        """Record many outcomes, each with its audit record, and for each one that frees its key claim
        that key's next row (as claim_next would); the result lines up with `outcomes`.

        One commit for the lot where the backend can (SQLite); on PostgreSQL each claim is its own
        transaction, so each outcome commits on the connection that holds its row.
        """
        ...


class Store(IntakeStore, DeliveryStore, Protocol):
    """What intake and the forwarder need from durable storage.

    Every method commits before it returns. Implementations raise StoreUnavailable when they cannot commit.
    """

    async def claim_next(self, item: OutboxItem, now: float, lease_seconds: float) -> OutboxItem | None:
        """Claim the row that follows `item` in its (target, ordering_key), once `item` is no longer
        pending, if that row is due and free; None otherwise. One index lookup, not a scan of the queue."""
        ...

    async def mark_delivered(self, item: OutboxItem, now: float, detail: dict[str, Any]) -> None: ...

    async def reschedule(
        self, item: OutboxItem, next_attempt_at: float, reason: str, detail: dict[str, Any]
    ) -> None: ...

    async def dead_letter(self, item: OutboxItem, now: float, reason: str, detail: dict[str, Any]) -> None:
        """Move a row to the dead letters; `detail["outcome"]` (OperationOutcome text) is kept as last_outcome."""
        ...

    async def mark_stale(self, item: OutboxItem, now: float, reason: str, detail: dict[str, Any]) -> None:
        """Close a row without sending it: the stale-event rule refused it."""
        ...

    async def latest_applied(self, target: str, visit_key: str) -> float | None:
        """The newest event_time delivered to `target` for `visit_key` (None if none)."""
        ...

    # -- people: the dead-letters and replay commands; every action is audited with the Actor --

    async def list_deliveries(
        self, state: DeliveryState | None = DeliveryState.DEAD, limit: int = 100
    ) -> list[DeliveryRecord]:
        """Outbox rows in `state` (None: all), oldest first."""
        ...

    async def get_delivery(self, outbox_id: int) -> DeliveryRecord | None: ...

    async def retry_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        """A dead letter back to pending, attempts and age reset; False if it is not a dead letter."""
        ...

    async def discard_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        """A dead letter to discarded (kept, never sent); False if it is not a dead letter."""
        ...

    async def replay(
        self,
        now: float,
        actor: Actor,
        *,
        control_id: str | None = None,
        since: float | None = None,
        target: str | None = None,
    ) -> list[int]:
        """Queue again every delivered row matching MSH-10 `control_id` or received at/after `since`.

        Each becomes a new pending row (the delivered one keeps its history), in arrival order.
        Returns the new outbox ids.
        """
        ...

    async def purge_bodies(self, before: float, actor: Actor, batch: int = 500) -> int:
        """Retention: set inbound.raw and outbox.bundle/last_outcome empty for messages received before
        `before` that are neither pending nor dead; one `body_purged` audit record each; returns the count."""
        ...

    async def audit_trail(self, *, inbound_id: int | None = None, outbox_id: int | None = None) -> list[AuditEntry]:
        """Audit records for an inbound message or an outbox row, oldest first."""
        ...

    # -- monitoring (called from the admin port's threads, not the event loop) --

    def queue_stats(self) -> list[tuple[str, int, float | None, int]]:
        """Per target: (target, pending rows, oldest pending queued_at or None, dead letters)."""
        ...

    def check_writable(self, timeout: float) -> None:
        """Return once a write transaction has committed; raise StoreUnavailable otherwise."""
        ...

    def last_received_at(self) -> float | None:
        """When the newest frame was received, by any process on this store (None: none yet)."""
        ...

    def audit_head(self) -> tuple[int, str]:
        """Where the audit chain ends now: (seq, hash); (0, GENESIS) when empty."""
        ...

    def close(self) -> None: ...
