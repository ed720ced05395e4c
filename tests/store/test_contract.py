"""What every store backend must do, checked against a real database: the forwarder and the CLI rely on it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from adapter.store.base import Actor, Delivery, DeliveryState, InboundRecord, Outcome, Store

T = TypeVar("T")
NOW = 1_800_000_000.0
ME = Actor("tester", "contract test")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def record(control_id: str, facility: str = "RXX", at: float = NOW) -> InboundRecord:
    return InboundRecord(
        raw=f"MSH|^~\\&|PAS|{facility}|||||ADT^A03|{control_id}|P|2.5.1\r".encode(),
        peer="127.0.0.1:1",
        sending_facility=facility,
        message_control_id=control_id,
        event="ADT^A03",
        received_at=at,
    )


def delivery(key: str, body: str = "{}", target: str = "default", **kw: Any) -> Delivery:
    return Delivery(target, key, body.encode(), 1, **kw)


async def put(store: Store, control_id: str, key: str, at: float = NOW, **kw: Any) -> int:
    result = await store.accept(record(control_id, at=at), [delivery(key, f'{{"m":"{control_id}"}}', **kw)], {})
    assert not result.duplicate
    return result.outbox_ids[0]


async def stages(store: Store, **where: int) -> list[str]:
    return [entry.stage for entry in await store.audit_trail(**where)]


class TestAccept:
    def test_accept_keeps_the_original_and_queues(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """accept stores the raw message, queues one row per delivery and audits received/queued/accepted."""
        store = store_factory()

        async def body() -> None:
            result = await store.accept(record("A1"), [delivery("p1"), delivery("p1", target="other")], {"n": 1})
            assert not result.duplicate and len(result.outbox_ids) == 2
            assert await stages(store, inbound_id=result.inbound_id) == ["received", "queued", "queued", "accepted"]
            rows = await store.list_deliveries(state=None)
            assert [(r.target, r.state, r.message_control_id) for r in rows] == [
                ("default", DeliveryState.PENDING, "A1"),
                ("other", DeliveryState.PENDING, "A1"),
            ]

        run(body())

    def test_duplicate_is_recognised_and_not_queued(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """The same MSH-4 + MSH-10 again is a duplicate: kept, audited, nothing new to deliver."""
        store = store_factory()

        async def body() -> None:
            first = await store.accept(record("D1"), [delivery("p1")], {})
            again = await store.accept(record("D1"), [delivery("p1")], {})
            other_sender = await store.accept(record("D1", facility="RYY"), [delivery("p1")], {})
            assert again.duplicate and again.outbox_ids == ()
            assert again.inbound_id != first.inbound_id
            assert not other_sender.duplicate
            # A resend is a frame received like any other: its own received record (peer, size, hash).
            assert await stages(store, inbound_id=again.inbound_id) == ["received", "duplicate"]
            assert len(await store.list_deliveries(state=DeliveryState.PENDING)) == 2

        run(body())

    def test_refused_frame_is_kept_with_reason(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        store = store_factory()

        async def body() -> None:
            inbound_id = await store.record(record("R1"), Outcome.REFUSED, "AR", "201: event not taken")
            trail = await store.audit_trail(inbound_id=inbound_id)
            assert [e.stage for e in trail] == ["received", "refused"]
            assert trail[1].detail == {"ack_code": "AR", "reason": "201: event not taken"}
            assert await store.list_deliveries(state=None) == []

        run(body())


class TestClaim:
    def test_one_per_ordering_key_in_arrival_order(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """Only the oldest pending row of a key is due; other keys go beside it; a claim is a lease."""
        store = store_factory()

        async def body() -> None:
            a1 = await put(store, "A1", "patient-a")
            a2 = await put(store, "A2", "patient-a")
            b1 = await put(store, "B1", "patient-b")
            claimed = await store.claim_due(NOW, 10, 60)
            assert [i.id for i in claimed] == [a1, b1]
            assert claimed[0].bundle == b'{"m":"A1"}' and claimed[0].message_control_id == "A1"
            assert await store.claim_due(NOW + 1, 10, 60) == []  # leased, and a2 waits behind a1
            await store.mark_delivered(claimed[0], NOW + 1, {"status": 200})
            (next_a,) = await store.claim_due(NOW + 2, 10, 60)
            assert next_a.id == a2
            assert [i.id for i in await store.claim_due(NOW + 61, 10, 60)] == [b1]  # b1's lease ran out

        run(body())

    def test_limit_and_target_separate_keys(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        store = store_factory()

        async def body() -> None:
            result = await store.accept(record("T1"), [delivery("p"), delivery("p", target="other")], {})
            third = await put(store, "T2", "q")
            # The same ordering key on two targets is two queues: both rows are due at once.
            assert [i.id for i in await store.claim_due(NOW, 2, 60)] == list(result.outbox_ids)
            assert [i.id for i in await store.claim_due(NOW, 10, 60)] == [third]

        run(body())

    def test_restart_releases_claims(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """A row claimed by a process that died is due again when the store is reopened."""
        store = store_factory("restart")
        first = run(put(store, "C1", "p"))
        assert [i.id for i in run(store.claim_due(NOW, 10, 600))] == [first]
        store.close()
        reopened = store_factory("restart")
        assert [i.id for i in run(reopened.claim_due(NOW + 1, 10, 600))] == [first]


class TestOutcomes:
    def test_mark_delivered(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        store = store_factory()

        async def body() -> None:
            oid = await put(store, "M1", "p")
            (item,) = await store.claim_due(NOW, 10, 60)
            await store.mark_delivered(item, NOW + 2, {"status": 200})
            rec = await store.get_delivery(oid)
            assert rec is not None
            assert (rec.state, rec.attempts, rec.delivered_at) == (DeliveryState.DELIVERED, 1, NOW + 2)
            assert await store.claim_due(NOW + 1000, 10, 60) == []
            assert (await stages(store, outbox_id=oid))[-1] == "delivered"

        run(body())

    def test_reschedule_keeps_retry_state_and_holds_the_key(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """A rescheduled row is not due before next_attempt_at, and blocks the rows behind it meanwhile."""
        store = store_factory("retry")
        first = run(put(store, "R1", "p"))
        run(put(store, "R2", "p"))
        (item,) = run(store.claim_due(NOW, 10, 60))
        run(store.reschedule(item, NOW + 30, "HTTP 503", {"status": 503, "outcome": '{"x":1}'}))
        assert run(store.claim_due(NOW + 29, 10, 60)) == []
        store.close()
        store = store_factory("retry")  # the retry state survives a restart
        (again,) = run(store.claim_due(NOW + 30, 10, 60))
        assert (again.id, again.attempts) == (first, 1)
        rec = run(store.get_delivery(first))
        assert rec is not None and rec.last_error == "HTTP 503" and rec.next_attempt_at == NOW + 30
        assert run(stages(store, outbox_id=first))[-1] == "retry_scheduled"

    def test_dead_letter_keeps_reason_and_outcome(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """A dead letter keeps the reason and the OperationOutcome, and no longer holds its key."""
        store = store_factory()

        async def body() -> None:
            first = await put(store, "X1", "p")
            second = await put(store, "X2", "p")
            (item,) = await store.claim_due(NOW, 10, 60)
            outcome = '{"resourceType":"OperationOutcome"}'
            await store.dead_letter(item, NOW, "HTTP 422: bad code", {"status": 422, "outcome": outcome})
            (dead,) = await store.list_deliveries()
            assert (dead.id, dead.state, dead.last_error, dead.last_outcome) == (
                first,
                DeliveryState.DEAD,
                "HTTP 422: bad code",
                outcome,
            )
            assert [i.id for i in await store.claim_due(NOW, 10, 60)] == [second]
            trail = await store.audit_trail(outbox_id=first)
            assert trail[-1].stage == "dead_lettered" and trail[-1].detail["status"] == 422

        run(body())

    def test_stale_and_latest_applied(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """latest_applied is the newest event_time delivered for a visit; a stale row is closed, not sent."""
        store = store_factory()

        async def body() -> None:
            newer = await put(store, "S1", "p", visit_key="v1", event_time=NOW - 10)
            older = await put(store, "S2", "p", visit_key="v1", event_time=NOW - 20)
            assert await store.latest_applied("default", "v1") is None
            (item,) = await store.claim_due(NOW, 10, 60)
            assert (item.id, item.visit_key, item.event_time) == (newer, "v1", NOW - 10)
            await store.mark_delivered(item, NOW, {})
            assert await store.latest_applied("default", "v1") == NOW - 10
            assert await store.latest_applied("other", "v1") is None
            (late,) = await store.claim_due(NOW, 10, 60)
            assert late.id == older
            await store.mark_stale(late, NOW, "older than applied", {})
            rec = await store.get_delivery(older)
            assert rec is not None and rec.state == DeliveryState.STALE
            assert await store.latest_applied("default", "v1") == NOW - 10
            assert await store.claim_due(NOW, 10, 60) == []

        run(body())

    def test_claim_carries_what_was_applied_for_the_visit(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """A claimed row carries the newest event time already delivered for its visit (None before any)."""
        store = store_factory()

        async def body() -> None:
            await put(store, "E1", "p", visit_key="v1", event_time=NOW - 10)
            await put(store, "E2", "p", visit_key="v1", event_time=NOW - 20)
            await put(store, "E3", "q", visit_key="", event_time=NOW)
            first, other = await store.claim_due(NOW, 10, 60)
            assert (first.applied_event_time, other.applied_event_time) == (None, None)
            await store.mark_delivered(first, NOW, {})
            (second,) = await store.claim_due(NOW, 10, 60)
            assert second.applied_event_time == NOW - 10

        run(body())


class TestClaimNext:
    def test_next_row_of_the_key_once_the_head_is_done(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """claim_next gives nothing while the row is pending, then claims the key's next row, and only that key's."""
        store = store_factory()

        async def body() -> None:
            a1 = await put(store, "N1", "a", visit_key="va", event_time=NOW - 5)
            b1 = await put(store, "N2", "b")
            a2 = await put(store, "N3", "a", visit_key="va", event_time=NOW)
            (head,) = await store.claim_due(NOW, 1, 60)
            assert head.id == a1
            assert await store.claim_next(head, NOW, 60) is None  # still pending: it holds its key
            await store.mark_delivered(head, NOW, {})
            following = await store.claim_next(head, NOW, 60)
            assert following is not None and (following.id, following.applied_event_time) == (a2, NOW - 5)
            # a2 is claimed now, so a full claim finds only b1, and claim_next will not hand a2 out twice.
            assert [i.id for i in await store.claim_due(NOW, 10, 60)] == [b1]
            assert await store.claim_next(head, NOW, 60) is None

        run(body())

    def test_next_row_waits_until_due(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """A next row that is scheduled for later, or that a dead letter freed, is claimed only when due."""
        store = store_factory()

        async def body() -> None:
            first = await put(store, "D1", "p")
            second = await put(store, "D2", "p")
            (item,) = await store.claim_due(NOW, 10, 60)
            assert item.id == first and await store.claim_due(NOW, 10, 60) == []  # D2 waits behind D1
            await store.dead_letter(item, NOW, "HTTP 422", {"status": 422})
            assert await store.claim_next(item, NOW - 3600, 60) is None  # the row was queued at NOW: not due yet
            following = await store.claim_next(item, NOW, 60)
            assert following is not None and following.id == second

        run(body())


class TestPeopleActions:
    async def _dead(self, store: Store, control_id: str) -> int:
        oid = await put(store, control_id, f"key-{control_id}")
        (item,) = [i for i in await store.claim_due(NOW, 10, 60) if i.id == oid]
        await store.dead_letter(item, NOW, "HTTP 400", {"status": 400})
        return oid

    def test_retry_dead_resets_attempts_and_age(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        store = store_factory()

        async def body() -> None:
            oid = await self._dead(store, "Y1")
            assert await store.retry_dead(oid, NOW + 500, ME)
            assert not await store.retry_dead(oid, NOW + 500, ME)  # no longer a dead letter
            (item,) = await store.claim_due(NOW + 500, 10, 60)
            assert (item.id, item.attempts, item.queued_at) == (oid, 0, NOW + 500)
            trail = await store.audit_trail(outbox_id=oid)
            assert trail[-1].stage == "dead_letter_retried"
            assert trail[-1].detail == {"actor": "tester", "why": "contract test"}

        run(body())

    def test_discard_dead(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        store = store_factory()

        async def body() -> None:
            oid = await self._dead(store, "Z1")
            pending = await put(store, "Z2", "other")
            assert not await store.discard_dead(pending, NOW, ME)  # only dead letters can be discarded
            assert await store.discard_dead(oid, NOW, ME)
            rec = await store.get_delivery(oid)
            assert rec is not None and rec.state == DeliveryState.DISCARDED
            assert await store.list_deliveries() == []
            assert (await stages(store, outbox_id=oid))[-1] == "dead_letter_discarded"
            assert await store.get_delivery(99999) is None

        run(body())

    def test_replay_by_control_id_and_since(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """Replay queues delivered rows again as new rows, in arrival order, each audited."""
        store = store_factory()

        async def body() -> None:
            ids = [await put(store, f"P{n}", "p", at=NOW + n, visit_key="v", event_time=NOW + n) for n in range(3)]
            for _ in ids:
                (item,) = await store.claim_due(NOW + 10, 10, 60)
                await store.mark_delivered(item, NOW + 10, {})
            assert await store.replay(NOW + 20, ME, control_id="NOPE") == []
            (one,) = await store.replay(NOW + 20, ME, control_id="P1")
            assert one not in ids
            later = await store.replay(NOW + 20, ME, since=NOW + 1)
            assert len(later) == 2 and later[0] < later[1]
            pending = await store.list_deliveries(state=DeliveryState.PENDING)
            assert [r.message_control_id for r in pending] == ["P1", "P1", "P2"]
            trail = await store.audit_trail(outbox_id=one)
            assert trail[-1].stage == "replayed" and trail[-1].detail["replay_of"] == ids[1]
            assert trail[-1].detail["actor"] == "tester"
            (item,) = await store.claim_due(NOW + 20, 10, 60)
            assert (item.id, item.bundle, item.event_time) == (one, b'{"m":"P1"}', None)  # exempt from the stale rule

        run(body())


class TestMonitoring:
    def test_last_received_at(self, store_factory) -> None:  # type: ignore[no-untyped-def]
        """None on an empty store; then the newest frame's receive time, refused frames included."""
        store = store_factory()
        assert store.last_received_at() is None

        async def body() -> None:
            await put(store, "L1", "p1", at=NOW + 5)
            await put(store, "L2", "p2", at=NOW + 2)  # stored later, received earlier (another worker)
            assert store.last_received_at() == NOW + 5
            await store.record(record("L3", at=NOW + 9), Outcome.REFUSED, "AR", "not on the list")
            assert store.last_received_at() == NOW + 9

        run(body())
