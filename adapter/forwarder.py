"""The delivery loop: claim due outbox rows, send each to its target, record the outcome.

The one place that decides retries. A 2xx marks the row delivered; a retryable failure
reschedules it with `next_attempt_at` from a tenacity wait (exponential, jittered, capped, never
sooner than Retry-After) applied to the stored attempt count, so a restart resumes where it was;
a permanent failure, or running out of attempts or age, moves the row to the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
import tenacity

from adapter import metrics
from adapter.audit.fhir_audit import AuditEventSender
from adapter.config import RetrySettings
from adapter.errors import DeliveryError, RetryableDelivery, StoreUnavailable
from adapter.store.base import OutboxItem, Store
from adapter.targets import Target

log = structlog.get_logger("homeward.forwarder")

# A claim is a lease: if this process dies mid-send, another claim may take the row after this long.
LEASE_SECONDS = 120.0
# With nothing due, look again at least this often (new rows also wake the loop at once).
IDLE_POLL_SECONDS = 1.0


class RetryPolicy:
    """When to try again, from tenacity's wait strategies and the stored attempt count."""

    def __init__(self, settings: RetrySettings):
        self.settings = settings
        self.wait = tenacity.wait_exponential_jitter(initial=settings.initial_seconds, max=settings.max_seconds)

    def delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds until the next try after `attempts` failed ones."""
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempts
        delay = float(self.wait(state))
        if retry_after is not None:
            # Honour the server's request, but within our own cap so a bad header cannot park a row for days.
            delay = max(delay, min(retry_after, self.settings.max_seconds))
        return delay

    def gives_up(self, attempts: int, age_seconds: float) -> str | None:
        """Why a row should stop being retried, or None to go on."""
        if attempts >= self.settings.max_attempts:
            return f"gave up after {attempts} attempts"
        if age_seconds >= self.settings.max_age_seconds:
            return f"gave up after {int(age_seconds)} s undelivered"
        return None


class Forwarder:
    """Runs until stop(): at most `max_in_flight` sends at once, one per ordering key."""

    def __init__(
        self,
        store: Store,
        targets: dict[str, Target],
        policy: RetryPolicy,
        *,
        max_in_flight: int = 4,
        clock: Callable[[], float] = time.time,
        policies: dict[str, RetryPolicy] | None = None,
        audit_events: AuditEventSender | None = None,
    ):
        self.store = store
        self.targets = targets
        self.policy = policy
        self.policies = policies or {}  # a target's own retry policy; others use `policy`
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.audit_events = audit_events  # optional FHIR AuditEvent per attempt (adapter/audit/fhir_audit.py)
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Something new is due: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        log.info("forwarder.started", targets=sorted(self.targets), max_in_flight=self.max_in_flight)
        while not self._stopping:
            self._wake.clear()
            free = self.max_in_flight - len(self._in_flight)
            if free > 0:
                try:
                    items = await self.store.claim_due(self.clock(), free, LEASE_SECONDS)
                except StoreUnavailable:
                    log.error("store.unavailable", stage="claim")
                    items = []
                for item in items:
                    task = asyncio.create_task(self._deliver_logged(item))
                    self._in_flight.add(task)
                    task.add_done_callback(self._done)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)

    async def _deliver_logged(self, item: OutboxItem) -> None:
        try:
            await self.deliver(item)
        except StoreUnavailable:
            # The outcome could not be recorded; the lease runs out and the row is sent again (every
            # entry is conditional, so the repeat changes nothing at the server).
            log.error("store.unavailable", stage="record_delivery", outbox_id=item.id)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let sends in flight finish for up to `grace` seconds."""
        self._stopping = True
        self._wake.set()
        if self._in_flight:
            _, still = await asyncio.wait(list(self._in_flight), timeout=grace)
            for task in still:
                task.cancel()  # its lease runs out and the row is claimed again later
        for target in self.targets.values():
            await target.aclose()

    async def deliver(self, item: OutboxItem) -> None:
        """Send one row and record what happened (one audit event, one log line)."""
        bound = log.bind(
            outbox_id=item.id,
            message_control_id=item.message_control_id,
            sending_facility=item.sending_facility,
            message_type=item.event,
            target=item.target,
            attempt=item.attempts + 1,
        )
        target = self.targets.get(item.target)
        stale = await self._stale(item)
        if stale is not None:
            await self.store.mark_stale(item, self.clock(), stale, {"target": item.target})
            bound.warning("message.stale", reason=stale)
            return
        started = time.perf_counter()
        try:
            if target is None:
                raise RetryableDelivery(f"no target named '{item.target}' is configured")
            detail = await target.send(item)
        except DeliveryError as exc:
            await self._failed(item, exc, bound, time.perf_counter() - started)
            return
        except Exception as exc:  # an unexpected bug counts as retryable until attempts run out
            bound.exception("message.delivery_error")
            failure = RetryableDelivery(f"internal error ({type(exc).__name__})")
            await self._failed(item, failure, bound, time.perf_counter() - started)
            return
        metrics.DELIVERY_LATENCY.labels(item.target).observe(time.perf_counter() - started)
        await self.store.mark_delivered(item, self.clock(), detail)
        metrics.DELIVERED.labels(item.event or "unknown", item.target).inc()
        self._audit_event(item, "delivered", detail.get("status"), list(detail.get("response") or []))
        bound.info(
            "message.delivered",
            status=detail.get("status"),
            duration_ms=detail.get("duration_ms"),
            age_ms=round((self.clock() - item.created_at) * 1000, 1),
        )

    def _audit_event(self, item: OutboxItem, result: str, status: Any, locations: list[str]) -> None:
        if self.audit_events is None:
            return
        target = self.targets.get(item.target)
        url = str(getattr(target, "base_url", "") or getattr(target, "directory", "") or item.target)
        self.audit_events.attempt(
            item, result=result, target_url=url, status=status, locations=locations, now=self.clock()
        )

    async def _stale(self, item: OutboxItem) -> str | None:
        """The stale-event rule: an event older than one already delivered for its visit is not sent.

        Rows of one patient go one at a time, so nothing for this visit is in flight beside it.
        """
        if not item.visit_key or item.event_time is None:
            return None
        latest = await self.store.latest_applied(item.target, item.visit_key)
        if latest is None or item.event_time >= latest:
            return None
        return f"event time {item.event_time:.0f} is older than {latest:.0f}, already delivered for this visit"

    async def _failed(self, item: OutboxItem, exc: DeliveryError, bound: Any, elapsed: float) -> None:
        attempts = item.attempts + 1
        now = self.clock()
        metrics.DELIVERY_LATENCY.labels(item.target).observe(elapsed)
        metrics.FAILED.labels(item.event or "unknown", item.target, str(exc.status or "")).inc()
        detail = {
            "target": item.target,
            "status": exc.status,
            "reason": exc.reason,
            "attempt": attempts,
            "duration_ms": round(elapsed * 1000, 3),
            "outcome": exc.outcome,
        }
        policy = self.policies.get(item.target, self.policy)
        age = now - (item.queued_at or item.created_at)
        give_up = "permanent error" if not exc.retryable else policy.gives_up(attempts, age)
        if give_up is not None:
            reason = f"{exc.reason} ({give_up})"
            detail["reason"] = reason
            # The row's last_error also carries the server's own words for the person who reads it.
            for_people = f"{reason}; server said: {exc.diagnostics}" if exc.diagnostics else reason
            await self.store.dead_letter(item, now, for_people, detail)
            metrics.DEAD_LETTERED.labels(item.event or "unknown", item.target).inc()
            self._audit_event(item, "dead", exc.status, [])
            bound.error("message.dead_lettered", status=exc.status, reason=reason)
            return
        delay = policy.delay(attempts, exc.retry_after)
        await self.store.reschedule(item, now + delay, exc.reason, {**detail, "retry_in_seconds": round(delay, 3)})
        self._audit_event(item, "retry", exc.status, [])
        bound.warning("message.retry_scheduled", status=exc.status, reason=exc.reason, retry_in_seconds=round(delay, 3))
