"""Group commit on the ACK path: many connections share SQLite commits, and each ACK still follows its own.

Real parts throughout: the MLLP listener on a free port, blocking clients on real sockets, the SQLite
file read back through connections of its own. The failed commit is a real SQLite failure (a deferred
foreign key that COMMIT refuses), not a mock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.mllp.client import MllpClient
from adapter.mllp.server import MllpServer
from adapter.store.sqlite import SqliteStore
from tests.conftest import MAPPINGS, LoopThread, ack_fields, golden_message

A03 = golden_message("ADT_A03/basic.hl7")


def a03(control_id: str, patient: int) -> bytes:
    """The golden A03 with its own control id and its own patient (so connections do not share a key)."""
    return A03.replace(b"|MSG00001|", f"|{control_id}|".encode()).replace(b"RRK123456", f"RRK{patient:06d}".encode())


@dataclass
class Listener:
    server: MllpServer
    store: SqliteStore
    db: Path
    groups: list[int]  # size of each group commit, in order

    def client(self) -> MllpClient:
        return MllpClient("127.0.0.1", self.server.port, timeout=30)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read through a connection of its own: only what is committed to the file is seen."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


@pytest.fixture
def listener(tmp_path: Path, loop_thread: LoopThread) -> Iterator[Listener]:
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)  # synchronous=FULL, as serve runs it
    groups: list[int] = []
    gather = store._gather

    def counted(first: Any) -> list[Any]:  # observes the group sizes; the group itself is the real one
        batch = gather(first)
        groups.append(len(batch))
        return batch

    store._gather = counted  # type: ignore[method-assign]
    intake = Intake(store, load_mappings(MAPPINGS), IntakeOptions())
    server = MllpServer(intake, "127.0.0.1", 0, max_frame_bytes=64 * 1024, idle_timeout=30)
    loop_thread.run(server.start())
    yield Listener(server, store, db, groups)
    loop_thread.run(server.stop(2))
    store.close()


class TestGroupCommit:
    def test_each_aa_follows_the_commit_of_its_own_message(self, listener: Listener) -> None:
        """16 connections send 12 messages each; the moment a client reads AA, its message and its outbox
        row are already in the file for a separate reader, and the commits were shared."""

        def connection(c: int) -> list[str]:
            problems = []
            with listener.client() as client:
                for n in range(12):
                    control_id = f"G{c}-{n}"
                    ack = ack_fields(client.send(a03(control_id, c)))
                    if ack["MSA"][1] != "AA":
                        problems.append(f"{control_id}: {ack['MSA'][1]}")
                        continue
                    stored = listener.rows(
                        "SELECT i.outcome, count(o.id) FROM inbound i LEFT JOIN outbox o ON o.inbound_id = i.id"
                        " WHERE i.message_control_id = ? GROUP BY i.id",
                        (control_id,),
                    )
                    if stored != [("accepted", 1)]:
                        problems.append(f"{control_id}: AA before its commit ({stored})")
            return problems

        with ThreadPoolExecutor(16) as pool:
            problems = [p for result in pool.map(connection, range(16)) for p in result]
        assert problems == []
        assert listener.rows("SELECT count(*) FROM inbound WHERE outcome = 'accepted'") == [(16 * 12,)]
        # Per connection, the order sent is the order committed (the outbox ids follow the commits).
        for c in range(16):
            ids = listener.rows(
                "SELECT i.message_control_id FROM outbox o JOIN inbound i ON i.id = o.inbound_id"
                " WHERE i.message_control_id LIKE ? ORDER BY o.id",
                (f"G{c}-%",),
            )
            assert [r[0] for r in ids] == [f"G{c}-{n}" for n in range(12)]
        # The writer shared commits between connections (fewer commits than messages).
        assert max(listener.groups) > 1
        assert len(listener.groups) < 16 * 12

    def test_a_failed_group_commit_gives_ae_to_every_message_in_the_group(self, listener: Listener) -> None:
        """Eight messages wait behind a busy writer and are committed in one group with a write that COMMIT
        refuses: all eight get AE 207 (none AA) and none is in the file; each resend is then accepted."""
        busy, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            busy.set()
            release.wait(30)

        def poison(conn: sqlite3.Connection) -> None:
            # An outbox row for a message that does not exist, with the foreign key check deferred to COMMIT.
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute(
                "INSERT INTO outbox (inbound_id, target, ordering_key, next_attempt_at, created_at)"
                " VALUES (999999, 'default', 'poison', 0, 0)"
            )

        held = listener.store.submit(hold)
        assert busy.wait(10)
        with ThreadPoolExecutor(8) as pool:
            acks = [pool.submit(lambda c: ack_fields(listener.client().send(a03(f"F{c}", c))), c) for c in range(8)]
            deadline = time.monotonic() + 20
            while listener.store._queue.qsize() < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert listener.store._queue.qsize() == 8  # all eight wait for the writer
            listener.store.submit(poison)
            release.set()
            results = [f.result(30) for f in acks]
        held.result(10)
        assert listener.groups[-2:] == [1, 9]  # the held write alone, then the eight and the poison together
        assert sorted(r["MSA"][1] for r in results) == ["AE"] * 8
        assert all(r["ERR"][3].startswith("207") for r in results)
        assert listener.rows("SELECT count(*) FROM inbound WHERE message_control_id LIKE 'F%'") == [(0,)]
        assert listener.rows("SELECT count(*) FROM outbox") == [(0,)]
        # The store goes on: the hospital's resends are taken.
        with listener.client() as client:
            for c in range(8):
                assert ack_fields(client.send(a03(f"F{c}", c)))["MSA"][1] == "AA"
        assert listener.rows("SELECT count(*) FROM inbound WHERE outcome = 'accepted'") == [(8,)]
