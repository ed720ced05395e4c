"""How the forwarder hands outcomes to the store: one store call at a time, taking all that finished meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from adapter.config import RetrySettings
from adapter.forwarder import Forwarder, RetryPolicy
from adapter.store.base import AttemptOutcome, Delivery, InboundRecord, OutboxItem
from adapter.store.sqlite import SqliteStore

MESSAGES = 20  # fewer than MAX_UNRECORDED, so no sender waits for a commit


class GatedStore:
    """A real SQLite store whose first record_outcomes call waits for `gate`; counts the calls."""

    def __init__(self, store: SqliteStore):
        self.store = store
        self.max_claims = store.max_claims
        self.gate = asyncio.Event()
        self.batches: list[int] = []  # outcomes per record_outcomes call, in call order
        self.in_flight = 0
        self.most_in_flight = 0

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        return await self.store.claim_due(now, limit, lease_seconds)

    async def record_outcomes(
        self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float
    ) -> list[OutboxItem | None]:
        self.batches.append(len(outcomes))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if len(self.batches) == 1:
                await self.gate.wait()
            return await self.store.record_outcomes(outcomes, now, lease_seconds)
        finally:
            self.in_flight -= 1


class CountingTarget:
    """A target that accepts every message at once."""

    name = "default"

    def __init__(self) -> None:
        self.sent: list[int] = []

    async def send(self, item: OutboxItem) -> dict[str, Any]:
        self.sent.append(item.id)
        return {"target": self.name, "status": 200, "response": []}

    async def aclose(self) -> None:
        return None


async def fill(store: SqliteStore) -> None:
    """MESSAGES messages, each for a patient of its own, so every one is claimable at once."""
    for i in range(MESSAGES):
        record = InboundRecord(raw=b"MSH|^~\\&|", sending_facility="RXX", message_control_id=f"R{i}", event="ADT^A03")
        await store.accept(record, [Delivery("default", f"patient-{i}", b"{}", 1)], {})


async def sent_and_held(store: SqliteStore) -> tuple[Forwarder, asyncio.Task[None], GatedStore]:
    """A running forwarder (and its run task) that has sent every message while the store's first record
    call is held."""
    await fill(store)
    gated, target = GatedStore(store), CountingTarget()
    forwarder = Forwarder(gated, {"default": target}, RetryPolicy(RetrySettings()), max_in_flight=4)  # type: ignore[arg-type]
    running = asyncio.create_task(forwarder.run())
    for _ in range(500):
        if len(target.sent) == MESSAGES:
            break
        await asyncio.sleep(0.01)
    assert sorted(target.sent) == list(range(1, MESSAGES + 1))
    return forwarder, running, gated


def delivered(store: SqliteStore) -> int:
    return int(store.query("SELECT count(*) FROM outbox WHERE state = 'delivered'")[0][0])


class TestRecording:
    def test_outcomes_that_finish_during_a_store_call_go_together_in_the_next(self, tmp_path: Path) -> None:
        """While one store call records outcomes, no second call starts; the outcomes that finished meanwhile
        are recorded together by the next call, and every one is committed."""

        async def body() -> None:
            store = SqliteStore(tmp_path / "store.sqlite3", synchronous="NORMAL")
            forwarder, running, gated = await sent_and_held(store)
            assert len(gated.batches) == 1  # the rest wait for the call under way
            gated.gate.set()
            for _ in range(500):
                if delivered(store) == MESSAGES:
                    break
                await asyncio.sleep(0.01)
            assert delivered(store) == MESSAGES
            assert gated.most_in_flight == 1
            assert len(gated.batches) == 2 and sum(gated.batches) == MESSAGES
            await forwarder.stop(5)
            running.cancel()
            store.close()

        asyncio.run(body())

    def test_stop_records_the_outcomes_waiting_behind_a_store_call(self, tmp_path: Path) -> None:
        """stop() returns only after the outcomes that waited for the call under way are committed too."""

        async def body() -> None:
            store = SqliteStore(tmp_path / "store.sqlite3", synchronous="NORMAL")
            forwarder, running, gated = await sent_and_held(store)
            stopping = asyncio.create_task(forwarder.stop(10))
            await asyncio.sleep(0.05)
            assert not stopping.done()
            gated.gate.set()
            await stopping
            running.cancel()
            assert delivered(store) == MESSAGES
            store.close()

        asyncio.run(body())
