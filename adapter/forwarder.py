"""The delivery loop: claim due outbox rows, send each to its target, record the outcome.

The one place that decides retries. A 2xx marks the row delivered; a retryable failure
reschedules it with `next_attempt_at` from a tenacity wait (exponential, jittered, capped, never
sooner than Retry-After) applied to the stored attempt count, so a restart resumes where it was;
a permanent failure, or running out of attempts or age, moves the row to the dead letters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
import tenacity

from adapter import metrics
from adapter.audit.fhir_audit import AuditEventSender
from adapter.config import RetrySettings, Settings
from adapter.errors import DeliveryError, RetryableDelivery, StoreUnavailable
from adapter.store.base import AttemptOutcome, DeliveryStore, OutboxItem
from adapter.targets import Target

log = structlog.get_logger("homeward.forwarder")

# A claim is a lease: if this process dies mid-send, another claim may take the row after this long.
LEASE_SECONDS = 120.0
# With nothing due, look again at least this often (new rows also wake the loop at once).
IDLE_POLL_SECONDS = 1.0
# Rows claimed ahead per sender (within the store's max_claims), so senders never wait on a claim.
CLAIM_AHEAD = 32
# Outcomes sent but not yet committed, at most: senders pause beyond this, so a crash repeats at most
# max_in_flight + MAX_UNRECORDED sends (harmless, every entry is conditional, but wasted) however slow
# the store's commits get. Only a commit slower than MAX_UNRECORDED sends ever holds the senders.
MAX_UNRECORDED = 32


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
    """Runs until stop(): `max_in_flight` senders over a queue of claimed rows, one row per ordering key.

    Why this shape (README "Measured"): a send costs about a millisecond here, but a store round trip
    (claim, then a commit that waits for the disk) costs several. So rows are claimed ahead in
    batches, a sender hands each outcome to a recording task and takes the next row at once, the
    outcomes of many sends share one commit, and recording a row that frees its ordering key also
    claims that key's next row by one index lookup, so a patient's queue flows without scanning the
    whole outbox again. Order still holds: a key's next row is claimable only once the outcome of
    the one before it is committed.
    """

    def __init__(
        self,
        store: DeliveryStore,
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
        # Claimed rows held at once (waiting, sending or being recorded): enough to keep every sender busy
        # between claims, within what the store can hold.
        self.max_held = max(max_in_flight, min(getattr(store, "max_claims", 64), CLAIM_AHEAD * max_in_flight))
        self.clock = clock
        self.audit_events = audit_events  # optional FHIR AuditEvent per attempt (adapter/audit/fhir_audit.py)
        self._wake = asyncio.Event()
        self._stopping = False
        self._ready: asyncio.Queue[OutboxItem] = asyncio.Queue()
        self._claimed_at: dict[int, float] = {}  # held rows, by outbox id: when this process claimed them
        self._busy: set[asyncio.Task[None]] = set()  # sends under way
        self._workers: list[asyncio.Task[None]] = []
        # Outcomes not yet handed to the store: the next store call (_flush) records them together.
        self._outcomes: list[AttemptOutcome] = []
        self._recording: set[asyncio.Task[None]] = set()  # the store call recording outcomes (one at a time)
        self._unrecorded = 0  # outcomes waiting or being recorded
        self._committed = asyncio.Event()  # set whenever a store call recording outcomes returns
        # Look with a full claim (a scan of the pending rows): at start, when woken, at each poll, and
        # while the last one came back full (more may be waiting).
        self._look = True
        self._more = True

    def wake(self) -> None:
        """Something new is due: look now rather than at the next poll."""
        self._look = True
        self._wake.set()

    async def run(self) -> None:
        log.info("forwarder.started", targets=sorted(self.targets), max_in_flight=self.max_in_flight)
        self._workers = [asyncio.create_task(self._sender()) for _ in range(self.max_in_flight)]
        while not self._stopping:
            self._wake.clear()
            await self._claim()
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                self._look = True  # retries come due with time; nothing wakes us for those

    async def _claim(self) -> None:
        room = self.max_held - len(self._claimed_at)
        # While the queue is full of work, wait for a batch worth of room rather than claiming row by row.
        if room <= 0 or not (self._look or (self._more and room >= max(1, self.max_held // 4))):
            return
        self._look = False
        try:
            items = await self.store.claim_due(self.clock(), room, LEASE_SECONDS)
        except StoreUnavailable:
            log.error("store.unavailable", stage="claim")
            return
        # Fewer than asked: every claimable row is held now; only outcomes (which claim their key's
        # next row themselves), new messages (wake) and time (poll) make more.
        self._more = len(items) == room
        for item in items:
            self._hold(item)

    def _hold(self, item: OutboxItem) -> None:
        self._claimed_at[item.id] = self.clock()
        self._ready.put_nowait(item)

    def _release(self, item: OutboxItem) -> None:
        self._claimed_at.pop(item.id, None)
        if self._more:
            self._wake.set()

    async def _sender(self) -> None:
        while True:
            while self._unrecorded >= MAX_UNRECORDED:
                self._committed.clear()
                await self._committed.wait()
            item = await self._ready.get()
            if self.clock() - self._claimed_at.get(item.id, 0.0) > LEASE_SECONDS / 2:
                # Waited too long behind a slow target: its lease may run out mid-send and the row go
                # to someone else. Let the lease run out instead; the row is claimed again then.
                self._release(item)
                continue
            task = asyncio.create_task(self.deliver(item))
            self._busy.add(task)
            task.add_done_callback(self._busy.discard)
            await asyncio.shield(task)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let sends in flight finish and their outcomes be recorded for up to `grace` seconds."""
        self._stopping = True
        self._wake.set()
        for worker in self._workers:
            worker.cancel()  # a send in flight is shielded: it finishes below
        deadline = time.monotonic() + grace
        if self._busy:
            _, still = await asyncio.wait(list(self._busy), timeout=grace)
            for task in still:
                task.cancel()  # its lease runs out and the row is claimed again later
        # Outcomes of the sends that finished: recorded before the store closes (a call under way
        # hands those that came meanwhile to the next one, so wait until none is left).
        self._flush()
        while self._recording and time.monotonic() < deadline:
            await asyncio.wait(list(self._recording), timeout=max(0.1, deadline - time.monotonic()))
        # Rows claimed but not sent keep their claim until the lease ends (a restart of serve frees them).
        for target in self.targets.values():
            await target.aclose()

    async def deliver(self, item: OutboxItem) -> None:
        """Send one row, then hand what happened to the recorder (one audit record, one log line)."""
        stale = self._stale(item)
        if stale is not None:
            self._record(AttemptOutcome(item, "stale", {"target": item.target}, stale))
            return
        target = self.targets.get(item.target)
        started = time.perf_counter()
        try:
            if target is None:
                raise RetryableDelivery(f"no target named '{item.target}' is configured")
            detail = await target.send(item)
        except DeliveryError as exc:
            self._record(self._failed(item, exc, time.perf_counter() - started))
            return
        except Exception as exc:  # an unexpected bug counts as retryable until attempts run out
            self._bound(item).exception("message.delivery_error")
            failure = RetryableDelivery(f"internal error ({type(exc).__name__})")
            self._record(self._failed(item, failure, time.perf_counter() - started))
            return
        metrics.DELIVERY_LATENCY.labels(item.target).observe(time.perf_counter() - started)
        self._record(AttemptOutcome(item, "delivered", detail))

    @staticmethod
    def _bound(item: OutboxItem) -> Any:
        return log.bind(
            outbox_id=item.id,
            message_control_id=item.message_control_id,
            sending_facility=item.sending_facility,
            message_type=item.event,
            target=item.target,
            attempt=item.attempts + 1,
        )

    def _record(self, outcome: AttemptOutcome) -> None:
        """Queue an outcome without holding the sender. One store call records outcomes at a time, and it
        takes all that finished while the one before it committed (group commit "while the previous
        commit runs"): a call per outcome cost the store a transaction savepoint, a future and a wake-up
        of the event loop each, for commits its writer grouped anyway. A crash can only repeat sends whose
        outcomes were in the commit under way or waiting for it (MAX_UNRECORDED at most)."""
        if not self._outcomes and not self._recording:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outcomes.append(outcome)
        self._unrecorded += 1

    def _flush(self) -> None:
        if self._recording:
            return  # the call under way flushes what waits when it returns (_recording_done)
        batch, self._outcomes = self._outcomes, []
        if batch:
            task = asyncio.create_task(self._record_batch(batch))
            self._recording.add(task)
            task.add_done_callback(self._recording_done)

    def _recording_done(self, task: asyncio.Task[None]) -> None:
        self._recording.discard(task)
        if not task.cancelled():  # cancelled: the loop is closing; what waits is sent again after the lease
            self._flush()

    async def _record_batch(self, batch: list[AttemptOutcome]) -> None:
        try:
            following = await self.store.record_outcomes(batch, self.clock(), LEASE_SECONDS)
        except Exception:  # StoreUnavailable, or a bug: either way the rows go back
            self._recorded_batch(batch)
            # Not recorded: the leases run out and the rows are sent again (every entry is
            # conditional, so the repeat changes nothing at the server).
            for outcome in batch:
                log.error("store.unavailable", stage="record_delivery", outbox_id=outcome.item.id)
                self._release(outcome.item)
            return
        self._recorded_batch(batch)
        for outcome, nxt in zip(batch, following, strict=True):
            self._recorded(outcome)
            if nxt is not None and not self._stopping:
                self._hold(nxt)
            self._release(outcome.item)

    def _recorded_batch(self, batch: list[AttemptOutcome]) -> None:
        self._unrecorded -= len(batch)
        self._committed.set()

    def _recorded(self, outcome: AttemptOutcome) -> None:
        """After the commit: metrics, the FHIR AuditEvent and the log line of one outcome."""
        item, detail = outcome.item, outcome.detail
        bound = self._bound(item)
        event = item.event or "unknown"
        if outcome.stage == "delivered":
            metrics.DELIVERED.labels(event, item.target).inc()
            self._audit_event(item, "delivered", detail.get("status"), list(detail.get("response") or []))
            bound.info(
                "message.delivered",
                status=detail.get("status"),
                duration_ms=detail.get("duration_ms"),
                age_ms=round((self.clock() - item.created_at) * 1000, 1),
            )
        elif outcome.stage == "stale":
            bound.warning("message.stale", reason=outcome.reason)
        elif outcome.stage == "dead_lettered":
            metrics.DEAD_LETTERED.labels(event, item.target).inc()
            self._audit_event(item, "dead", detail.get("status"), [])
            bound.error("message.dead_lettered", status=detail.get("status"), reason=detail.get("reason"))
        else:
            self._audit_event(item, "retry", detail.get("status"), [])
            bound.warning(
                "message.retry_scheduled",
                status=detail.get("status"),
                reason=outcome.reason,
                retry_in_seconds=detail.get("retry_in_seconds"),
            )

    def _audit_event(self, item: OutboxItem, result: str, status: Any, locations: list[str]) -> None:
        if self.audit_events is None:
            return
        target = self.targets.get(item.target)
        url = str(getattr(target, "base_url", "") or getattr(target, "directory", "") or item.target)
        self.audit_events.attempt(
            item, result=result, target_url=url, status=status, locations=locations, now=self.clock()
        )

    @staticmethod
    def _stale(item: OutboxItem) -> str | None:
        """The stale-event rule: an event older than one already delivered for its visit is not sent.

        `applied_event_time` was read when the row was claimed; rows of one patient go one at a time,
        so nothing for this visit was delivered since.
        """
        latest = item.applied_event_time
        if not item.visit_key or item.event_time is None or latest is None or item.event_time >= latest:
            return None
        return f"event time {item.event_time:.0f} is older than {latest:.0f}, already delivered for this visit"

    def _failed(self, item: OutboxItem, exc: DeliveryError, elapsed: float) -> AttemptOutcome:
        """Reschedule or dead-letter: the outcome of a failed attempt."""
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
            return AttemptOutcome(item, "dead_lettered", detail, for_people)
        delay = policy.delay(attempts, exc.retry_after)
        detail["retry_in_seconds"] = round(delay, 3)
        return AttemptOutcome(item, "retry_scheduled", detail, exc.reason, now + delay)


def build_forwarder(
    settings: Settings, store: DeliveryStore, targets: dict[str, Target], audit_events: AuditEventSender | None
) -> Forwarder:
    """The forwarder the settings describe (serve's, or a delivery worker's)."""
    return Forwarder(
        store,
        targets,
        RetryPolicy(settings.retry),
        # One sender per allowed request: the [fhir] cap plus each named target's.
        max_in_flight=settings.fhir.max_in_flight + sum(t.max_in_flight for t in settings.targets),
        policies={t.name: RetryPolicy(t.retry) for t in settings.targets if t.retry is not None},
        audit_events=audit_events,
    )
