"""What only a shared database must do: several PostgresStore instances on one database (the contract is in test_contract.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from adapter.audit import chain
from adapter.audit.keys import AuditKeys
from adapter.errors import StoreUnavailable
from adapter.store.base import Delivery, InboundRecord
from adapter.store.postgres import PostgresStore, migrate

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


def run(coro: Any) -> Any:
    return asyncio.run(coro)


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

    def test_one_visit_written_by_three_instances_is_delivered_in_acknowledgement_order(
        self, pg_instances: Any
    ) -> None:
        """A visit's messages accepted in turn by different instances come out one at a time, oldest first, to any claimer."""
        stores = [pg_instances(), pg_instances(), pg_instances()]

        async def scenario() -> None:
            for n in range(9):  # the load balancer hands each message to the next instance
                await stores[n % 3].accept(record(f"V{n}"), delivery("visit-x", str(n)), {})
                await stores[(n + 1) % 3].accept(record(f"W{n}"), delivery("visit-y", str(n)), {})
            delivered: dict[str, list[int]] = {"visit-x": [], "visit-y": []}
            for turn in range(9):
                claimer = stores[(turn * 2) % 3]  # a different instance claims each time
                claimed = await claimer.claim_due(NOW, 10, 60)
                assert sorted(i.ordering_key for i in claimed) == ["visit-x", "visit-y"]  # one per visit, never two
                assert await stores[(turn * 2 + 1) % 3].claim_due(NOW, 10, 60) == []  # held, the rest waits
                for item in claimed:
                    delivered[item.ordering_key].append(int(item.bundle))
                    await claimer.mark_delivered(item, NOW, {"status": 200})
            assert delivered == {"visit-x": list(range(9)), "visit-y": list(range(9))}

        run(scenario())

    def test_unreachable_database_is_store_unavailable(self) -> None:
        """A URL nothing listens on raises StoreUnavailable, which intake turns into AE 207."""
        with pytest.raises(StoreUnavailable):
            PostgresStore("postgresql://postgres@127.0.0.1:1/test")


class TestPostgresAuditChain:
    def test_two_instances_write_one_gapless_verified_chain(self, pg_instances: Any) -> None:
        """Concurrent accepts, claims and outcomes on two instances leave one chain that verifies, signed head included."""
        keys = AuditKeys(patient=b"p" * 32, checkpoint=b"k" * 32)
        one, two = pg_instances(audit_keys=keys), pg_instances(audit_keys=keys)

        async def scenario() -> None:
            await asyncio.gather(
                *(
                    s.accept(record(f"M{n}-{i}"), delivery(f"v{n}"), {})
                    for n in range(10)
                    for i, s in enumerate((one, two))
                )
            )
            for store in (one, two):
                for item in await store.claim_due(NOW, 4, 60):
                    await store.mark_delivered(item, NOW, {"status": 200})

        run(scenario())
        rows = one.query("SELECT id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash FROM audit ORDER BY id")
        head = one.query("SELECT seq, hash, mac FROM audit_head")[0]
        checked, problem = chain.verify((chain.ChainRecord(*r) for r in rows), chain.Head(*head), keys.checkpoint)
        assert problem is None and checked == len(rows) == 20 * 3 + 8
        with psycopg.connect(one.url, autocommit=True) as conn:  # someone edits a record in the middle
            conn.execute("UPDATE audit SET detail = '{}' WHERE id = 5")
        rows = one.query("SELECT id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash FROM audit ORDER BY id")
        _, problem = chain.verify((chain.ChainRecord(*r) for r in rows), chain.Head(*head), keys.checkpoint)
        assert problem is not None and (problem.seq, problem.kind) == (5, "changed")


class TestPostgresHealth:
    def test_queue_stats_and_writable(self, pg_instances: Any) -> None:
        """queue_stats counts pending rows per target and check_writable commits."""
        store = pg_instances()
        run(store.accept(record("M1"), delivery("v"), {}))
        ((target, pending, oldest, dead),) = store.queue_stats()
        assert (target, pending, oldest, dead) == ("default", 1, NOW, 0)
        store.check_writable(timeout=5.0)
