"""The write relay: an intake worker's writes committed by the serve process's SQLite store, over a socket pair."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from adapter.errors import StoreUnavailable
from adapter.store.base import AcceptResult, AttemptOutcome, Delivery, InboundRecord, OutboxItem, Outcome
from adapter.store.relay import RelayedStore, WriteRelay
from adapter.store.sqlite import SqliteStore, queue_shard


def record(control_id: str) -> InboundRecord:
    return InboundRecord(
        raw=f"MSH|^~\\&|PAS|RRK|||||ADT^A03|{control_id}|P|2.4\r".encode(),
        peer="127.0.0.1:1",
        sending_facility="RRK",
        message_control_id=control_id,
        event="ADT^A03",
        received_at=1.0,
    )


def delivery(key: str) -> Delivery:
    return Delivery("default", key, b'{"resourceType":"Bundle"}', 1, f"visit-{key}", 1.0)


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_writes_are_committed_by_the_relaying_store_and_answered(tmp_path: Path) -> None:
    """accept and record go through the relay into the file; a resend is a duplicate; serve is woken once per
    turn of its loop for the accepted ones (not for the duplicate, not for the refusal)."""
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)
    woken: list[int] = []

    async def main() -> None:
        relay = WriteRelay(store, lambda: woken.append(1))
        relay.start()
        worker = RelayedStore(relay.channel())
        await worker.start()
        first, second = await asyncio.gather(
            worker.accept(record("M1"), [delivery("a")], {"ack_code": "AA"}),
            worker.accept(record("M2"), [delivery("b")], {"ack_code": "AA"}),
        )
        await asyncio.sleep(0.05)  # serve's loop runs the wake it was handed
        woken_after_two = len(woken)
        again = await worker.accept(record("M1"), [delivery("a")], {"ack_code": "AA"})
        refused = await worker.record(record("M3"), Outcome.REFUSED, "AE", "101 at PID-3: required")
        await asyncio.sleep(0.05)
        worker.close()
        assert not first.duplicate and not second.duplicate and again.duplicate
        assert len(first.outbox_ids) == 1 and first.inbound_id != second.inbound_id
        assert 1 <= woken_after_two <= 2 and len(woken) == woken_after_two
        assert isinstance(refused, int)

    asyncio.run(main())
    store.close()
    assert rows(db, "SELECT message_control_id, outcome FROM inbound ORDER BY id") == [
        ("M1", "accepted"),
        ("M2", "accepted"),
        ("M1", "duplicate"),
        ("M3", "refused"),
    ]
    assert rows(db, "SELECT count(*) FROM outbox") == [(2,)]


def test_writes_sent_together_are_each_answered_with_their_own_result(tmp_path: Path) -> None:
    """Two workers each send 40 accepts in one turn of their loops (one send each, answered a group commit
    at a time with one send per worker): every caller gets the inbound id of its own message."""
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)

    async def main() -> list[tuple[str, AcceptResult]]:
        relay = WriteRelay(store, lambda: None)
        relay.start()
        workers = [RelayedStore(relay.channel()), RelayedStore(relay.channel())]
        for worker in workers:
            await worker.start()
        ids = [f"W{w}-{n}" for w in range(2) for n in range(40)]
        results = await asyncio.gather(
            *(workers[int(c[1])].accept(record(c), [delivery(c)], {"ack_code": "AA"}) for c in ids)
        )
        for worker in workers:
            worker.close()
        return list(zip(ids, results, strict=True))

    answered = asyncio.run(main())
    store.close()
    stored = dict(rows(db, "SELECT id, message_control_id FROM inbound"))
    assert len(stored) == 80
    assert all(stored[result.inbound_id] == control_id for control_id, result in answered)


def test_a_commit_that_fails_in_serve_is_store_unavailable_in_the_worker(tmp_path: Path) -> None:
    """The relaying store cannot commit (here: it is closed): the worker gets StoreUnavailable, which intake
    answers AE 207, and nothing is in the file."""
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)
    store.close()

    async def main() -> None:
        relay = WriteRelay(store, lambda: None)
        relay.start()
        worker = RelayedStore(relay.channel())
        await worker.start()
        with pytest.raises(StoreUnavailable, match="closed"):
            await worker.accept(record("M1"), [delivery("a")], {})
        worker.close()

    asyncio.run(main())
    assert rows(db, "SELECT count(*) FROM inbound") == [(0,)]


def test_a_serve_process_gone_fails_what_waits_and_what_follows() -> None:
    """The other end closes with a write in flight (serve was killed): that write and every later one raise
    StoreUnavailable, never hang; the worker ends with serve anyway (adapter/lifeline.py)."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        worker = RelayedStore(ours)
        await worker.start()
        waiting = asyncio.create_task(worker.accept(record("M1"), [delivery("a")], {}))
        await asyncio.sleep(0.01)
        theirs.close()
        with pytest.raises(StoreUnavailable, match="connection to serve lost"):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            await worker.record(record("M2"), Outcome.REFUSED, "AE", "why")
        worker.close()

    asyncio.run(main())


def test_a_delivery_workers_claims_are_of_its_shard_and_its_outcomes_are_committed(tmp_path: Path) -> None:
    """A delivery worker's channel frees the claims its shard's dead predecessor left, then claims only its
    shard's queues; the outcomes it sends are committed, each freeing its queue's next row for it."""
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)
    keys = [f"patient-{n}" for n in range(16)]
    mine = {k for k in keys if queue_shard(f"default|{k}", 2) == 0}
    assert 0 < len(mine) < len(keys)  # both shards have queues

    async def main() -> None:
        for n, key in enumerate(keys[:8]):  # two messages per queue
            await store.accept(record(f"M{n}"), [delivery(key)], {})
            await store.accept(record(f"N{n}"), [delivery(key)], {})
        # Claims a dead worker left behind (of both shards), then queues nobody has claimed.
        assert len(await store.claim_due(now=2.0, limit=100, lease_seconds=600)) == 8
        for n, key in enumerate(keys[8:], start=8):
            await store.accept(record(f"M{n}"), [delivery(key)], {})
            await store.accept(record(f"N{n}"), [delivery(key)], {})
        relay = WriteRelay(store, lambda: None)
        relay.start()
        worker = RelayedStore(relay.channel((0, 2)))
        await worker.start()
        claimed = await worker.claim_due(3.0, 100, 60)
        assert {item.ordering_key for item in claimed} == mine  # shard 1's: still claimed, or not its to take
        outcomes = [AttemptOutcome(item, "delivered", {"status": 200}) for item in claimed]
        following = await worker.record_outcomes(outcomes, 4.0, 60)
        assert [n.ordering_key if n else None for n in following] == [item.ordering_key for item in claimed]
        assert all(n is not None and n.id != item.id for n, item in zip(following, claimed, strict=True))
        worker.close()

    asyncio.run(main())
    store.close()
    delivered = rows(db, "SELECT ordering_key FROM outbox WHERE state = 'delivered' ORDER BY id")
    assert sorted(k for (k,) in delivered) == sorted(mine)


def test_every_relayed_kind_is_pickled_with_all_its_fields() -> None:
    """The relay pickles these as their class and __match_args__ values: a field left out of __match_args__
    (kw_only, say) would be dropped silently on the way to serve and back."""
    for kind in (InboundRecord, Delivery, AcceptResult, OutboxItem, AttemptOutcome):
        assert list(kind.__match_args__) == [f.name for f in dataclasses.fields(kind)], kind.__name__


def test_a_worker_killed_mid_write_ends_its_channel_quietly(tmp_path: Path) -> None:
    """Half a frame, then the socket closes (the worker was SIGKILLed while writing): the relay's thread for
    it ends without an exception, nothing is stored from it, and another worker's writes go on."""
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)
    failures: list[threading.ExceptHookArgs] = []
    previous, threading.excepthook = threading.excepthook, failures.append

    async def main() -> None:
        relay = WriteRelay(store, lambda: None)
        relay.start()
        killed = relay.channel()
        killed.sendall(struct.pack("!I", 1000) + b"\x80\x05 half a pickle")
        killed.close()
        worker = RelayedStore(relay.channel())
        await worker.start()
        assert not (await worker.accept(record("M1"), [delivery("a")], {})).duplicate
        worker.close()

    try:
        asyncio.run(main())
        time.sleep(0.2)
    finally:
        threading.excepthook = previous
        store.close()
    assert failures == []
    assert rows(db, "SELECT message_control_id FROM inbound") == [("M1",)]
