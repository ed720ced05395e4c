"""A SQLite file written by an earlier Homeward is brought up to date when opened: each Bundle moved to
outbox_body beside its outbox row, the outbox's queue and visit indexes made partial."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from adapter.store.base import Actor, DeliveryState
from adapter.store.sqlite import SCHEMA, SqliteStore

NOW = 1_800_000_000.0

# The outbox as it was before outbox_body: the Bundle in the row.
OLD_SCHEMA = SCHEMA.replace(
    "    ordering_key    TEXT NOT NULL,\n",
    "    ordering_key    TEXT NOT NULL,\n    bundle          BLOB NOT NULL,\n",
    1,
).split("-- Each outbox row's Bundle")[0]


def old_file(path: Path) -> None:
    """Three rows the old way: one pending, one delivered, one delivered whose body retention purged."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(OLD_SCHEMA)
    conn.execute("DROP INDEX outbox_queue")
    conn.execute("DROP INDEX outbox_applied")
    conn.execute("CREATE INDEX outbox_order ON outbox (target, ordering_key, state, id)")
    conn.execute("CREATE INDEX outbox_visit ON outbox (target, visit_key, state)")
    for n, (state, bundle) in enumerate([("pending", b'{"m":1}'), ("delivered", b'{"m":2}'), ("delivered", b"")], 1):
        conn.execute(
            "INSERT INTO inbound (id, received_at, message_control_id, size, sha256, outcome, ack_code, dedup_key)"
            " VALUES (?, ?, ?, 1, 'x', 'accepted', 'AA', ?)",
            (n, NOW, f"C{n}", f"RXX|C{n}"),
        )
        conn.execute(
            "INSERT INTO outbox (id, inbound_id, target, ordering_key, bundle, state, next_attempt_at, created_at)"
            " VALUES (?, ?, 'default', ?, ?, ?, ?, ?)",
            (n, n, f"k{n}", bundle, state, NOW, NOW),
        )
    conn.close()


def test_an_old_file_has_its_bodies_moved_once(tmp_path: Path) -> None:
    """Opening a file from before outbox_body moves every kept Bundle over and drops outbox.bundle; the
    pending row is then claimed with its body, a purged one stays purged (not replayable), and opening
    the file again changes nothing."""
    path = tmp_path / "old.sqlite3"
    old_file(path)
    for _ in range(2):
        store = SqliteStore(path)
        try:
            columns = {row[1] for row in store.query("PRAGMA table_info(outbox)")}
            assert "bundle" not in columns and "ordering_key" in columns
            indexes = {row[1] for row in store.query("PRAGMA index_list(outbox)")}
            assert {"outbox_queue", "outbox_applied"} <= indexes and not {"outbox_order", "outbox_visit"} & indexes
            assert [tuple(r) for r in store.query("SELECT outbox_id, bundle FROM outbox_body ORDER BY outbox_id")] == [
                (1, b'{"m":1}'),
                (2, b'{"m":2}'),
            ]
        finally:
            store.close()

    store = SqliteStore(path)
    try:

        async def body() -> None:
            (item,) = await store.claim_due(NOW + 1, 10, 60)
            assert (item.id, item.bundle) == (1, b'{"m":1}')
            assert await store.replay(NOW + 2, Actor("tester", "test"), control_id="C3") == []
            (again,) = await store.replay(NOW + 2, Actor("tester", "test"), control_id="C2")
            pending = [r.id for r in await store.list_deliveries(state=DeliveryState.PENDING)]
            assert pending == [1, again]

        asyncio.run(body())
    finally:
        store.close()
