"""The Store contract on both backends (SQLite file, PostgreSQL schema), plus what only a shared database must do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.errors import StoreUnavailable
from adapter.store.base import Delivery, InboundRecord, Outcome, Store
from adapter.store.postgres import PostgresStore, migrate
from adapter.store.sqlite import SqliteStore

NOW = 1_000_000.0


def record(control_id: str, facility: str = "RAD") -> InboundRecord:
    return InboundRecord(
        raw=f"MSH|^~\\&|PAS|{facility}|||||ADT^A03|{control_id}|P|2.5.1\r".encode(),
        peer="127.0.0.1:1",
        sending_facility=facility,
        message_control_id=control_id,
        event="ADT_A03",
        received_at=NOW,
    )


def delivery(key: str, body: str = "{}") -> list[Delivery]:
    return [Delivery("default", key, body.encode(), 5)]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of stores over one database: several calls are several instances sharing it."""
    opened: list[Any] = []
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        migrate(url)

        def factory() -> Any:
            opened.append(PostgresStore(url, max_connections=4))
            return opened[-1]
    else:

        def factory() -> Any:
            opened.append(SqliteStore(tmp_path / "store.sqlite3", synchronous="NORMAL"))
            return opened[-1]

    yield factory
    for store in opened:
        store.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def stages(store: Any) -> list[str]:
    return [row[0] for row in store.query("SELECT stage FROM audit ORDER BY id")]


class TestStoreContract:
    def test_accepted_message_is_claimed_once_and_delivered(self, open_store: Any) -> None:
        """An accepted delivery is claimed, recorded as delivered, and never claimed again."""
        store: Store = open_store()

        async def scenario() -> None:
            result = await store.accept(record("M1"), delivery("visit-1", '{"a":1}'), {"resources": 5})
            assert not result.duplicate and len(result.outbox_ids) == 1
            (item,) = await store.claim_due(NOW, 10, 60)
            assert (item.id, item.bundle, item.message_control_id) == (result.outbox_ids[0], b'{"a":1}', "M1")
            assert await store.claim_due(NOW, 10, 60) == []
            await store.mark_delivered(item, NOW + 1, {"status": 200})
            assert await store.claim_due(NOW + 1000, 10, 60) == []

        run(scenario())
        assert stages(store) == ["received", "queued", "accepted", "delivered"]

    def test_resend_is_a_duplicate_and_not_queued(self, open_store: Any) -> None:
        """A second message with the same MSH-4 + MSH-10 is recorded as a duplicate and queues nothing."""
        store: Store = open_store()

        async def scenario() -> None:
            first = await store.accept(record("M1"), delivery("v"), {})
            second = await store.accept(record("M1"), delivery("v"), {})
            assert second.duplicate and second.outbox_ids == () and second.inbound_id != first.inbound_id
            assert len(await store.claim_due(NOW, 10, 60)) == 1

        run(scenario())
        outcomes = sorted(row[0] for row in store.query("SELECT outcome FROM inbound"))  # type: ignore[attr-defined]
        assert outcomes == ["accepted", "duplicate"]

    def test_one_visit_goes_in_arrival_order_others_in_parallel(self, open_store: Any) -> None:
        """Only the oldest pending row of a visit is claimable; other visits are claimed beside it."""
        store: Store = open_store()

        async def scenario() -> None:
            await store.accept(record("A1"), delivery("visit-a", "a1"), {})
            await store.accept(record("A2"), delivery("visit-a", "a2"), {})
            await store.accept(record("B1"), delivery("visit-b", "b1"), {})
            claimed = await store.claim_due(NOW, 10, 60)
            assert sorted(i.bundle for i in claimed) == [b"a1", b"b1"]
            first = next(i for i in claimed if i.bundle == b"a1")
            await store.mark_delivered(first, NOW, {})
            (second,) = await store.claim_due(NOW, 10, 60)
            assert second.bundle == b"a2"

        run(scenario())

    def test_rescheduled_row_waits_and_holds_back_its_visit(self, open_store: Any) -> None:
        """A rescheduled row is not due before its time and its visit's later rows wait behind it."""
        store: Store = open_store()

        async def scenario() -> None:
            await store.accept(record("A1"), delivery("visit-a", "a1"), {})
            await store.accept(record("A2"), delivery("visit-a", "a2"), {})
            (item,) = await store.claim_due(NOW, 10, 60)
            await store.reschedule(item, NOW + 30, "503 from the server", {"status": 503})
            assert await store.claim_due(NOW + 10, 10, 60) == []
            (again,) = await store.claim_due(NOW + 31, 10, 60)
            assert (again.bundle, again.attempts) == (b"a1", 1)
            await store.dead_letter(again, NOW + 31, "400 from the server", {"status": 400})
            (after,) = await store.claim_due(NOW + 31, 10, 60)
            assert after.bundle == b"a2"

        run(scenario())
        assert stages(store).count("retry_scheduled") == 1 and stages(store).count("dead_lettered") == 1
        states = sorted(row[0] for row in store.query("SELECT state FROM outbox"))  # type: ignore[attr-defined]
        assert states == ["dead", "pending"]

    def test_refused_frame_is_kept_with_its_reason(self, open_store: Any) -> None:
        """A refused frame keeps its raw bytes, ACK code and reason, with audit rows."""
        store: Store = open_store()
        inbound_id = run(store.record(record("BAD"), Outcome.REFUSED, "AE", "101 at PV1: missing"))
        row = store.query(f"SELECT outcome, ack_code, reason, raw FROM inbound WHERE id = {inbound_id}")[0]  # type: ignore[attr-defined]
        assert (row[0], row[1], row[2]) == ("refused", "AE", "101 at PV1: missing")
        assert bytes(row[3]).startswith(b"MSH|")
        assert stages(store) == ["received", "refused"]


@pytest.fixture
def pg_instances(postgres_url: str) -> Iterator[Any]:
    """Factory of PostgresStore instances on one migrated database (each one is an adapter process)."""
    migrate(postgres_url)
    opened: list[PostgresStore] = []

    def factory(**kwargs: Any) -> PostgresStore:
        opened.append(PostgresStore(postgres_url, **kwargs))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()


class TestPostgresSharedDatabase:
    def test_unmigrated_database_is_refused_with_the_command_to_run(self, postgres_url: str) -> None:
        """Opening a database without the schema names `homeward migrate`."""
        with pytest.raises(StoreUnavailable, match="homeward migrate"):
            PostgresStore(postgres_url)

    def test_migrate_is_idempotent_and_safe_concurrently(self, postgres_url: str) -> None:
        """Several migrations at once leave one schema version row."""

        async def scenario() -> list[int]:
            return list(await asyncio.gather(*(asyncio.to_thread(migrate, postgres_url) for _ in range(4))))

        assert run(scenario()) == [1, 1, 1, 1]
        store = PostgresStore(postgres_url)
        try:
            assert store.query("SELECT count(*) FROM homeward_schema")[0][0] == 1
        finally:
            store.close()

    def test_two_instances_never_claim_the_same_row(self, pg_instances: Any) -> None:
        """Two instances claiming together split the due rows between them, one per visit."""
        one, two = pg_instances(), pg_instances()

        async def scenario() -> None:
            for n in range(20):
                await one.accept(record(f"M{n}"), delivery(f"visit-{n % 10}", str(n)), {})
            a, b = await asyncio.gather(one.claim_due(NOW, 8, 60), two.claim_due(NOW, 8, 60))
            ids = [i.id for i in a + b]
            assert len(ids) == len(set(ids)) == 10
            assert sorted(int(i.bundle) for i in a + b) == list(range(10))

        run(scenario())

    def test_a_dead_instance_releases_its_claims_at_once(self, pg_instances: Any) -> None:
        """Rows claimed by an instance that goes away are claimable by another without waiting for a lease."""
        one, two = pg_instances(), pg_instances()

        async def scenario() -> None:
            await one.accept(record("M1"), delivery("visit-a", "a1"), {})
            await one.accept(record("M2"), delivery("visit-a", "a2"), {})
            (held,) = await one.claim_due(NOW, 4, 60)
            assert await two.claim_due(NOW, 4, 60) == []  # held, and its successor waits behind it
            one.close()  # the process is gone: its session and its row lock with it
            deadline = time.monotonic() + 10  # the server ends the session asynchronously; far below the lease
            taken_list = await two.claim_due(NOW, 4, 60)
            while not taken_list and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                taken_list = await two.claim_due(NOW, 4, 60)
            (taken,) = taken_list
            assert (taken.id, taken.bundle, taken.attempts) == (held.id, b"a1", 0)

        run(scenario())

    def test_duplicates_are_found_across_instances(self, pg_instances: Any) -> None:
        """The same message sent to two instances at once is accepted by one and a duplicate at the other."""
        one, two = pg_instances(), pg_instances()

        async def scenario() -> None:
            results = await asyncio.gather(
                *(s.accept(record(f"M{n}"), delivery("v"), {}) for n in range(10) for s in (one, two))
            )
            assert sum(r.duplicate for r in results) == 10
            assert len(await one.claim_due(NOW, 50, 60)) == 1  # all on one visit: only the oldest

        run(scenario())
        assert one.query("SELECT count(*) FROM outbox")[0][0] == 10

    def test_unreachable_database_is_store_unavailable(self) -> None:
        """A URL nothing listens on raises StoreUnavailable, which intake turns into AE 207."""
        with pytest.raises(StoreUnavailable):
            PostgresStore("postgresql://postgres@127.0.0.1:1/test")
