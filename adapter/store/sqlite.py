"""The embedded store: one SQLite file (WAL) written by one thread that group-commits.

Every write is a function run inside a transaction on the writer thread. The thread takes all
writes waiting at that moment, runs each under its own SAVEPOINT (so one failure cannot undo its
neighbours) and commits them together: a group commit that happens "while the previous commit
runs", never on a timer (PERFORMANCE.md: a timed window caps one MLLP connection at ~165 msg/s).
Serve's worker processes do not write the file: serve commits their writes (adapter/store/relay.py).
Other processes writing the same file (the CLI, `homeward import`, a second serve by mistake) take
turns through a lock file, so a waiting writer starts the moment the other's commit ends (see _WriteTurn).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import hashlib
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from adapter.audit import chain
from adapter.audit.keys import AuditKeys
from adapter.errors import StoreUnavailable
from adapter.store.base import (
    AcceptResult,
    Actor,
    AttemptOutcome,
    AuditEntry,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    InboundRecord,
    OutboxItem,
    Outcome,
)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound (
    id                 INTEGER PRIMARY KEY,
    received_at        REAL NOT NULL,
    peer               TEXT NOT NULL DEFAULT '',
    sending_facility   TEXT NOT NULL DEFAULT '',
    message_control_id TEXT NOT NULL DEFAULT '',
    event              TEXT NOT NULL DEFAULT '',
    size               INTEGER NOT NULL,
    sha256             TEXT NOT NULL,
    raw                BLOB,
    outcome            TEXT NOT NULL,
    ack_code           TEXT NOT NULL,
    reason             TEXT NOT NULL DEFAULT '',
    -- MSH-4|MSH-10 of accepted messages only; a resend of one collides here.
    dedup_key          TEXT UNIQUE,
    -- Keyed HMAC of the patient's NHS number (adapter/audit/keys.py), so a patient's messages can
    -- be found without the number being stored or logged; NULL without a key or a number.
    patient_key        TEXT
);
CREATE INDEX IF NOT EXISTS inbound_control_id ON inbound (message_control_id);
CREATE INDEX IF NOT EXISTS inbound_patient ON inbound (patient_key) WHERE patient_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbound_received ON inbound (received_at);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    inbound_id      INTEGER NOT NULL REFERENCES inbound (id),
    target          TEXT NOT NULL,
    ordering_key    TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    claimed_until   REAL NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    delivered_at    REAL,
    last_error      TEXT NOT NULL DEFAULT '',
    -- The age limit counts from here: arrival, or the last manual retry / replay.
    queued_at       REAL NOT NULL DEFAULT 0,
    -- The server's OperationOutcome from the last failed attempt (JSON text), for the dead letters.
    last_outcome    TEXT,
    -- The stale-event rule: EVN-2 (else MSH-7) as epoch seconds, per visit.
    visit_key       TEXT NOT NULL DEFAULT '',
    event_time      REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
-- The claim walks pending rows in id order (see CLAIM_SQL).
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, id);
-- A message's rows, for retention: without it each purged message scanned the whole outbox (7 ms at
-- 100,000 rows, a batch of 500 held the writer for seconds).
CREATE INDEX IF NOT EXISTS outbox_inbound ON outbox (inbound_id);
-- Each patient's queue: pending rows only, and what each visit has had applied: delivered rows only.
-- Partial, so a row enters each index once and stays small: with every state in them, accept and
-- delivery each moved a row to a random leaf page of both (the queue key is the patient).
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (target, ordering_key, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_applied ON outbox (target, visit_key, event_time) WHERE state = 'delivered';
DROP INDEX IF EXISTS outbox_order;
DROP INDEX IF EXISTS outbox_visit;
-- Each outbox row's Bundle, beside the row rather than in it: a claim and an outcome each rewrite the
-- row, and with a 6 KB body inline every rewrite copied its overflow pages (and secure_delete zeroed
-- the old ones): claim + outcome wrote 27 KB a message, 8 KB now. Retention deletes it (the row stays).
CREATE TABLE IF NOT EXISTS outbox_body (
    outbox_id       INTEGER PRIMARY KEY REFERENCES outbox (id),
    bundle          BLOB NOT NULL
);
-- Append-only and hash-chained (adapter/audit/chain.py): id is the chain's seq, 1, 2, 3, ...
CREATE TABLE IF NOT EXISTS audit (
    id                 INTEGER PRIMARY KEY,
    at                 REAL NOT NULL,
    inbound_id         INTEGER,
    outbox_id          INTEGER,
    stage              TEXT NOT NULL,
    detail             TEXT NOT NULL DEFAULT '{}',
    prev_hash          TEXT NOT NULL,
    hash               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_inbound ON audit (inbound_id);
CREATE INDEX IF NOT EXISTS audit_stage_at ON audit (stage, at);
-- Written by the readiness probe (/readyz): a real write, so a full disk or a lost lock shows.
CREATE TABLE IF NOT EXISTS probe (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    at                 REAL NOT NULL
);
-- Where the chain ends, rewritten in every commit that adds records; mac signs it when a key is set.
CREATE TABLE IF NOT EXISTS audit_head (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    seq                INTEGER NOT NULL,
    hash               TEXT NOT NULL,
    mac                TEXT NOT NULL DEFAULT ''
);
"""

_STOP = object()
# Upper bound on writes in one group commit, so one commit never holds callers for long.
_MAX_GROUP = 256
# How long a writer waits for its turn (the same bound as SQLite's busy_timeout below).
_BUSY_SECONDS = 5.0


class _Connection(sqlite3.Connection):
    """The writer's connection; remembers where the audit chain ends while its transaction is open, so
    each record is chained without reading the last one back (reset at every BEGIN and ROLLBACK TO)."""

    audit_tail: chain.Head | None = None


class _WriteTurn:
    """Whose turn it is to write the file, across processes: an exclusive flock on `<file>-writer.lock`.

    SQLite's own busy handler makes a writer that finds the file locked sleep 1, 2, 5, 10 ... ms and
    try again, and lets one process take the lock back time after time while the other sleeps: with
    two intake workers, commits waited up to 0.9-1.8 s (two processes committing in a loop, this
    machine). Waiting on a lock file instead hands the turn over as soon as the holder lets go (the
    holder's death lets go too). The wait is polled, so it stays bounded like busy_timeout.
    """

    def __init__(self, path: Path):
        self.fd = os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self) -> None:
        deadline = time.monotonic() + _BUSY_SECONDS
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise sqlite3.OperationalError(f"writer lock: {exc.strerror}") from exc
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError("database is locked (writer lock file)")
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class SqliteStore:
    """Store over one SQLite file; safe to call from the event loop and from other threads."""

    # A claim is a column of the row, so holding many costs nothing but their lease.
    max_claims = 512

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        release_claims: bool = True,
        audit_keys: AuditKeys | None = None,
        shard: tuple[int, int] | None = None,
    ):
        self.path = Path(path)
        # (index, count): a delivery worker claims only the (target, ordering_key) queues of its shard,
        # so a queue is only ever in flight in one process and a restarted worker can free its own claims.
        self.shard = shard
        self.audit_keys = audit_keys
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Called on the writer thread once every write of a group commit has its answer (the relay sends
        # the answers it gathered then, one send a worker rather than one a write).
        self.after_group: list[Callable[[], None]] = []
        self._turn = _WriteTurn(self.path)
        self._conn = self._connect()
        # Also for a store that claims for a delivery worker's shard (adapter/store/relay.py).
        self._conn.create_function("homeward_shard", 2, queue_shard, deterministic=True)
        self._turn.acquire()
        try:
            self._conn.executescript(SCHEMA)
            _move_bodies_out_of_outbox(self._conn)
            if release_claims:
                # A crash leaves claims behind; the serving process is the forwarder, so it releases them.
                # (The CLI opens the file beside a running server and passes release_claims=False; a delivery
                # worker releases those of its own shard, which no other process claims.)
                self.release_claims_op(shard)(self._conn)
            self._conn.commit()
        finally:
            self._turn.release()
        self.writer_thread = threading.Thread(target=self._writer, name="sqlite-writer", daemon=True)
        self.writer_thread.start()
        self._closed = False

    def _connect(self) -> _Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, factory=_Connection)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        # Purged bodies are overwritten, not left readable in free pages of the file.
        conn.execute("PRAGMA secure_delete=ON")
        # Each write's SAVEPOINT keeps the pages it changes in a sub-journal, which spilled to a temp file
        # past 64 KB: most group commits did, and accept wrote 89 KB a message, 28 KB in memory.
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    # -- the writer thread -------------------------------------------------------------------

    def submit(self, op: Op) -> concurrent.futures.Future[Any]:
        """Queue `op(conn)` for the writer thread; the future resolves after its commit."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreUnavailable("the store is closed"))
            return future
        self._queue.put((op, future))
        return future

    async def run(self, op: Op) -> Any:
        """Run `op(conn)` in a committed transaction and return its result."""
        return await asyncio.wrap_future(self.submit(op))

    def _writer(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            self._commit_group(first)
            for hook in self.after_group:
                hook()

    def _gather(
        self, first: tuple[Op, concurrent.futures.Future[Any]]
    ) -> list[tuple[Op, concurrent.futures.Future[Any]]]:
        """`first` and every write queued behind it (up to _MAX_GROUP)."""
        batch = [first]
        while len(batch) < _MAX_GROUP:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(item)
        return batch

    def _commit_group(self, first: tuple[Op, concurrent.futures.Future[Any]]) -> None:
        results: list[tuple[concurrent.futures.Future[Any], bool, Any]] = []
        conn = self._conn
        try:
            self._turn.acquire()
        except sqlite3.Error as exc:
            for _, future in self._gather(first):
                _settle(future, False, StoreUnavailable(f"the store could not commit ({type(exc).__name__})"))
            return
        # Gathered once the turn is ours: what arrived while another process committed joins this group.
        batch = self._gather(first)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.audit_tail = None  # another process may have added records since our last commit
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((future, True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # handed to the caller's future; the batch goes on
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    conn.audit_tail = None  # its records are gone
                    results.append((future, False, exc))
            _checkpoint(conn, self.audit_keys)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future in batch:
                if not future.done():
                    _settle(future, False, StoreUnavailable(f"the store could not commit ({type(exc).__name__})"))
            return
        finally:
            conn.audit_tail = None
            self._turn.release()
        for future, ok, value in results:
            _settle(future, ok, value)

    def close(self) -> None:
        """Finish queued writes and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self.writer_thread.join(timeout=30)
        self._conn.close()
        self._turn.close()

    # -- intake ------------------------------------------------------------------------------

    async def accept(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> AcceptResult:
        return await self._guarded(self.accept_op(record, deliveries, detail))  # type: ignore[no-any-return]

    def accept_op(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> Op:
        """accept() as a write for submit() (adapter/store/relay.py commits the workers' writes this way)."""
        sha256 = hashlib.sha256(record.raw).hexdigest()

        def op(conn: sqlite3.Connection) -> AcceptResult:
            existing = conn.execute("SELECT id FROM inbound WHERE dedup_key = ?", (record.dedup_key,)).fetchone()
            if existing is not None:
                inbound_id = _insert_inbound(
                    conn, record, Outcome.DUPLICATE, "AA", "resend of an accepted message", dedup=False, sha256=sha256
                )
                _audit_many(
                    conn,
                    [
                        (inbound_id, None, "received", _received_detail(record, sha256)),
                        (inbound_id, None, "duplicate", {"ack_code": "AA", "original_inbound_id": existing[0]}),
                    ],
                )
                return AcceptResult(inbound_id, True)
            inbound_id = _insert_inbound(conn, record, Outcome.ACCEPTED, "AA", "", dedup=True, sha256=sha256)
            records: list[tuple[int | None, int | None, str, dict[str, Any]]] = [
                (inbound_id, None, "received", _received_detail(record, sha256))
            ]
            ids = []
            for d in deliveries:
                cur = conn.execute(
                    "INSERT INTO outbox (inbound_id, target, ordering_key, next_attempt_at, created_at,"
                    " queued_at, visit_key, event_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        inbound_id,
                        d.target,
                        d.ordering_key,
                        record.received_at,
                        record.received_at,
                        record.received_at,
                        d.visit_key,
                        d.event_time,
                    ),
                )
                assert cur.lastrowid is not None
                conn.execute(INSERT_BODY_SQL, (cur.lastrowid, d.bundle))
                ids.append(cur.lastrowid)
                records.append(
                    (inbound_id, cur.lastrowid, "queued", {"target": d.target, "resources": d.resource_count})
                )
            records.append((inbound_id, None, "accepted", detail))
            _audit_many(conn, records)
            return AcceptResult(inbound_id, False, tuple(ids))

        return op

    async def record(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> int:
        return await self._guarded(self.record_op(record, outcome, ack_code, reason))  # type: ignore[no-any-return]

    def record_op(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> Op:
        """record() as a write for submit()."""
        sha256 = hashlib.sha256(record.raw).hexdigest()

        def op(conn: sqlite3.Connection) -> int:
            inbound_id = _insert_inbound(conn, record, outcome, ack_code, reason, dedup=False, sha256=sha256)
            _audit_many(
                conn,
                [
                    (inbound_id, None, "received", _received_detail(record, sha256)),
                    (inbound_id, None, outcome.value, {"ack_code": ack_code, "reason": reason}),
                ],
            )
            return inbound_id

        return op

    async def _guarded(self, op: Op) -> Any:
        try:
            return await self.run(op)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store could not commit ({type(exc).__name__})") from exc

    # -- the forwarder ---------------------------------------------------------------------

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        return await self._guarded(self.claim_due_op(now, limit, lease_seconds, self.shard))  # type: ignore[no-any-return]

    def claim_due_op(self, now: float, limit: int, lease_seconds: float, shard: tuple[int, int] | None) -> Op:
        """claim_due() of `shard`'s queues as a write for submit() (a delivery worker's, relayed)."""

        def op(conn: sqlite3.Connection) -> list[OutboxItem]:
            if shard is None:
                rows = conn.execute(CLAIM_SQL, (now, now, limit)).fetchall()
            else:
                rows = conn.execute(CLAIM_SHARD_SQL, (now, now, shard[1], shard[0], limit)).fetchall()
            items = [_item(row) for row in rows]
            conn.executemany(
                "UPDATE outbox SET claimed_until = ? WHERE id = ?",
                [(now + lease_seconds, item.id) for item in items],
            )
            return items

        return op

    async def claim_next(self, item: OutboxItem, now: float, lease_seconds: float) -> OutboxItem | None:
        return await self._guarded(lambda conn: _claim_next(conn, item, now, lease_seconds))  # type: ignore[no-any-return]

    async def record_outcomes(
        self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float
    ) -> list[OutboxItem | None]:
        return await self._guarded(self.record_outcomes_op(outcomes, now, lease_seconds))  # type: ignore[no-any-return]

    def record_outcomes_op(self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float) -> Op:
        """record_outcomes() as a write for submit()."""

        def op(conn: sqlite3.Connection) -> list[OutboxItem | None]:
            _apply_outcomes(conn, outcomes, now)
            return [_claim_next(conn, o.item, now, lease_seconds) if o.frees_key else None for o in outcomes]

        return op

    def release_claims_op(self, shard: tuple[int, int] | None) -> Op:
        """Free the claims a crash left behind (of `shard`'s queues only, given one), as a write for submit()."""

        def op(conn: sqlite3.Connection) -> None:
            release = "UPDATE outbox SET claimed_until = 0 WHERE state = 'pending' AND claimed_until > 0"
            if shard is None:
                conn.execute(release)
            else:
                conn.execute(f"{release} AND {SHARD_TERM.replace('o.', '')}", (shard[1], shard[0]))

        return op

    async def _record_one(self, outcome: AttemptOutcome, now: float) -> None:
        await self._guarded(lambda conn: _apply_outcomes(conn, [outcome], now))

    async def mark_delivered(self, item: OutboxItem, now: float, detail: dict[str, Any]) -> None:
        await self._record_one(AttemptOutcome(item, "delivered", detail), now)

    async def reschedule(self, item: OutboxItem, next_attempt_at: float, reason: str, detail: dict[str, Any]) -> None:
        await self._record_one(AttemptOutcome(item, "retry_scheduled", detail, reason, next_attempt_at), time.time())

    async def dead_letter(self, item: OutboxItem, now: float, reason: str, detail: dict[str, Any]) -> None:
        await self._record_one(AttemptOutcome(item, "dead_lettered", detail, reason), now)

    async def mark_stale(self, item: OutboxItem, now: float, reason: str, detail: dict[str, Any]) -> None:
        await self._record_one(AttemptOutcome(item, "stale", detail, reason), now)

    async def latest_applied(self, target: str, visit_key: str) -> float | None:
        rows = await self._read(
            "SELECT max(event_time) FROM outbox WHERE target = ? AND visit_key = ? AND state = 'delivered'",
            (target, visit_key),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    # -- people: dead letters and replay ---------------------------------------------------

    async def list_deliveries(
        self, state: DeliveryState | None = DeliveryState.DEAD, limit: int = 100
    ) -> list[DeliveryRecord]:
        where, params = ("WHERE o.state = ?", (state.value,)) if state is not None else ("", ())
        rows = await self._read(f"{RECORD_SQL} {where} ORDER BY o.id LIMIT ?", (*params, limit))
        return [_record(row) for row in rows]

    async def get_delivery(self, outbox_id: int) -> DeliveryRecord | None:
        rows = await self._read(f"{RECORD_SQL} WHERE o.id = ?", (outbox_id,))
        return _record(rows[0]) if rows else None

    async def retry_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT inbound_id FROM outbox WHERE id = ? AND state = 'dead'", (outbox_id,)).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, queued_at = ?,"
                " claimed_until = 0 WHERE id = ?",
                (now, now, outbox_id),
            )
            _audit(conn, row[0], outbox_id, "dead_letter_retried", actor.detail())
            return True

        return await self._guarded(op)  # type: ignore[no-any-return]

    async def discard_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT inbound_id FROM outbox WHERE id = ? AND state = 'dead'", (outbox_id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE outbox SET state = 'discarded' WHERE id = ?", (outbox_id,))
            _audit(conn, row[0], outbox_id, "dead_letter_discarded", actor.detail())
            return True

        return await self._guarded(op)  # type: ignore[no-any-return]

    async def replay(
        self,
        now: float,
        actor: Actor,
        *,
        control_id: str | None = None,
        since: float | None = None,
        target: str | None = None,
    ) -> list[int]:
        if control_id is None and since is None:
            raise ValueError("replay needs a control id or a start time")

        def op(conn: sqlite3.Connection) -> list[int]:
            clauses = ["o.state = 'delivered'"]  # and a body to send: a purged one cannot be replayed
            params: list[Any] = []
            if control_id is not None:
                clauses.append("i.message_control_id = ?")
                params.append(control_id)
            if since is not None:
                clauses.append("i.received_at >= ?")
                params.append(since)
            if target is not None:
                clauses.append("o.target = ?")
                params.append(target)
            rows = conn.execute(
                "SELECT o.id, o.inbound_id, o.target, o.ordering_key, b.bundle, o.visit_key FROM outbox o"
                " JOIN inbound i ON i.id = o.inbound_id JOIN outbox_body b ON b.outbox_id = o.id"
                f" WHERE {' AND '.join(clauses)} ORDER BY o.id",
                params,
            ).fetchall()
            new_ids = []
            for old_id, inbound_id, row_target, ordering_key, bundle, visit_key in rows:
                # event_time stays NULL: a replay re-applies history in arrival order, so the stale rule
                # (meant for events that arrive late) must not skip it.
                cur = conn.execute(
                    "INSERT INTO outbox (inbound_id, target, ordering_key, next_attempt_at, created_at,"
                    " queued_at, visit_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (inbound_id, row_target, ordering_key, now, now, now, visit_key),
                )
                assert cur.lastrowid is not None
                conn.execute(INSERT_BODY_SQL, (cur.lastrowid, bundle))
                new_ids.append(cur.lastrowid)
                _audit(conn, inbound_id, cur.lastrowid, "replayed", {**actor.detail(), "replay_of": old_id})
            return new_ids

        return await self._guarded(op)  # type: ignore[no-any-return]

    async def purge_bodies(self, before: float, actor: Actor, batch: int = 500) -> int:
        """Retention: drop original bodies received before `before`, in batches; audit metadata stays."""

        def op(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute(PURGE_SQL, (before, batch))]
            for inbound_id in ids:
                conn.execute("UPDATE inbound SET raw = NULL WHERE id = ?", (inbound_id,))
                conn.execute(
                    "DELETE FROM outbox_body WHERE outbox_id IN (SELECT id FROM outbox WHERE inbound_id = ?)",
                    (inbound_id,),
                )
                conn.execute(
                    "UPDATE outbox SET last_outcome = NULL,"
                    # last_error keeps our reason, not the server's words quoted after it.
                    " last_error = CASE WHEN instr(last_error, '; server said: ') > 0"
                    " THEN substr(last_error, 1, instr(last_error, '; server said: ') - 1) ELSE last_error END"
                    " WHERE inbound_id = ?",
                    (inbound_id,),
                )
                _audit(conn, inbound_id, None, "body_purged", {**actor.detail(), "received_before": before})
            return len(ids)

        total = 0
        while True:
            done: int = await self._guarded(op)
            total += done
            if done < batch:
                return total

    async def audit_trail(self, *, inbound_id: int | None = None, outbox_id: int | None = None) -> list[AuditEntry]:
        if inbound_id is None and outbox_id is None:
            raise ValueError("audit_trail needs an inbound id or an outbox id")
        column, value = ("inbound_id", inbound_id) if inbound_id is not None else ("outbox_id", outbox_id)
        rows = await self._read(
            f"SELECT at, inbound_id, outbox_id, stage, detail FROM audit WHERE {column} = ? ORDER BY id", (value,)
        )
        return [AuditEntry(row[0], row[1], row[2], row[3], orjson.loads(row[4])) for row in rows]

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        try:
            return await asyncio.to_thread(self.query, sql, params)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store could not be read ({type(exc).__name__})") from exc

    # -- reading (CLI, tests) --------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read with a separate connection (WAL lets readers run beside the writer)."""
        conn = sqlite3.connect(self.path)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def pending_count(self) -> int:
        return int(self.query("SELECT count(*) FROM outbox WHERE state = 'pending'")[0][0])

    def audit_head(self) -> tuple[int, str]:
        rows = self.query("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else (0, chain.GENESIS)

    def queue_stats(self) -> list[tuple[str, int, float | None, int]]:
        rows = self.query(
            "SELECT target, sum(state = 'pending'), min(CASE WHEN state = 'pending' THEN queued_at END),"
            " sum(state = 'dead') FROM outbox WHERE state IN ('pending', 'dead') GROUP BY target"
        )
        return [(r[0], int(r[1]), r[2], int(r[3])) for r in rows]

    def last_received_at(self) -> float | None:
        value = self.query("SELECT max(received_at) FROM inbound")[0][0]  # inbound_received: one index step
        return None if value is None else float(value)

    def check_writable(self, timeout: float) -> None:
        # Through the writer thread: proves the thread is alive and can take the write lock and commit.
        try:
            self.submit(_touch_probe).result(timeout)
        except (concurrent.futures.TimeoutError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"the store did not commit within {timeout} s ({type(exc).__name__})") from exc


# The columns of a claimed row; the last one is what the stale-event rule compares with (outbox_applied index).
# Every pending row has its body (retention purges only finished ones); were one missing, the row is still
# claimed, fails at the server and ends in the dead letters, rather than never claimed with its queue
# stuck behind it.
ITEM_COLUMNS = f"""
o.id, o.inbound_id, o.target, o.ordering_key, coalesce(b.bundle, x''), o.attempts, o.created_at,
i.sending_facility, i.message_control_id, i.event, o.queued_at, o.visit_key, o.event_time,
CASE WHEN o.visit_key != '' THEN (
    SELECT max(d.event_time) FROM outbox d
    WHERE d.target = o.target AND d.visit_key = o.visit_key AND d.state = '{DeliveryState.DELIVERED}')
END"""

# Only the oldest pending row of each (target, ordering_key) may go, and only when nothing for that
# key is in flight: a retry of an A03 holds back the A13 that cancels it.
# The unary + keeps SQLite off outbox_due: it walks outbox_pending in id order and stops at LIMIT,
# instead of sorting every due row (a claim took 170-225 ms at a 20,000-row backlog, 0.03 ms now).
CLAIM_SQL = f"""
SELECT {ITEM_COLUMNS}
FROM outbox o JOIN inbound i ON i.id = o.inbound_id LEFT JOIN outbox_body b ON b.outbox_id = o.id
WHERE o.state = '{DeliveryState.PENDING}' AND +o.next_attempt_at <= ? AND +o.claimed_until <= ?
  AND NOT EXISTS (
      SELECT 1 FROM outbox p
      WHERE p.target = o.target AND p.ordering_key = o.ordering_key
        AND p.state = '{DeliveryState.PENDING}' AND p.id < o.id)
ORDER BY o.id
LIMIT ?
"""

# A delivery worker's share of the queues (see queue_shard).
SHARD_TERM = "homeward_shard(o.target || '|' || o.ordering_key, ?) = ?"
CLAIM_SHARD_SQL = CLAIM_SQL.replace("AND NOT EXISTS", f"AND {SHARD_TERM}\n  AND NOT EXISTS", 1)


def queue_shard(queue_key: str, count: int) -> int:
    """Which of `count` delivery workers takes the queue "target|ordering_key": stable across processes."""
    return zlib.crc32(queue_key.encode()) % count


# The oldest pending row of one (target, ordering_key), with when it is due and claimed until (outbox_queue index).
NEXT_SQL = f"""
SELECT {ITEM_COLUMNS}, o.next_attempt_at, o.claimed_until
FROM outbox o JOIN inbound i ON i.id = o.inbound_id LEFT JOIN outbox_body b ON b.outbox_id = o.id
WHERE o.target = ? AND o.ordering_key = ? AND o.state = '{DeliveryState.PENDING}'
ORDER BY o.id
LIMIT 1
"""

# Bodies a person may still need stay: anything still pending or waiting in the dead letters.
PURGE_SQL = f"""
SELECT i.id FROM inbound i
WHERE i.received_at < ? AND i.raw IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM outbox o
      WHERE o.inbound_id = i.id AND o.state IN ('{DeliveryState.PENDING}', '{DeliveryState.DEAD}'))
ORDER BY i.id
LIMIT ?
"""


INSERT_BODY_SQL = "INSERT INTO outbox_body (outbox_id, bundle) VALUES (?, ?)"


def _move_bodies_out_of_outbox(conn: sqlite3.Connection) -> None:
    """A file written before outbox_body kept each Bundle in outbox.bundle: move them, once, and drop the column."""
    if "bundle" not in {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # An empty body is one retention purged: it stays purged (no row here).
        conn.execute(
            "INSERT INTO outbox_body (outbox_id, bundle) SELECT id, bundle FROM outbox WHERE length(bundle) > 0"
        )
        conn.execute("ALTER TABLE outbox DROP COLUMN bundle")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        id=row[0],
        inbound_id=row[1],
        target=row[2],
        ordering_key=row[3],
        bundle=row[4],
        attempts=row[5],
        created_at=row[6],
        sending_facility=row[7],
        message_control_id=row[8],
        event=row[9],
        queued_at=row[10] or row[6],
        visit_key=row[11],
        event_time=row[12],
        applied_event_time=row[13],
    )


RECORD_SQL = """
SELECT o.id, o.inbound_id, o.target, o.ordering_key, o.state, o.attempts, o.created_at, o.queued_at,
       o.next_attempt_at, o.delivered_at, o.last_error, o.last_outcome,
       i.sending_facility, i.message_control_id, i.event
FROM outbox o JOIN inbound i ON i.id = o.inbound_id
"""


def _record(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        id=row[0],
        inbound_id=row[1],
        target=row[2],
        ordering_key=row[3],
        state=DeliveryState(row[4]),
        attempts=row[5],
        created_at=row[6],
        queued_at=row[7] or row[6],
        next_attempt_at=row[8],
        delivered_at=row[9],
        last_error=row[10],
        last_outcome=row[11],
        sending_facility=row[12],
        message_control_id=row[13],
        event=row[14],
    )


def _claim_next(conn: sqlite3.Connection, item: OutboxItem, now: float, lease_seconds: float) -> OutboxItem | None:
    """Claim the row after `item` in its (target, ordering_key), if `item` is no longer pending and it is due and free."""
    row = conn.execute(NEXT_SQL, (item.target, item.ordering_key)).fetchone()
    # NEXT_SQL reads the key's oldest pending row: if `item` is still pending, that is `item` itself.
    if row is None or row[0] == item.id or row[-2] > now or row[-1] > now:
        return None
    conn.execute("UPDATE outbox SET claimed_until = ? WHERE id = ?", (now + lease_seconds, row[0]))
    return _item(row)


# Per audit stage: the outbox update an outcome makes, and its parameters.
_OUTCOME_SQL: dict[str, tuple[str, Callable[[AttemptOutcome, float], tuple[Any, ...]]]] = {
    "delivered": (
        "UPDATE outbox SET state = 'delivered', delivered_at = ?, attempts = attempts + 1, claimed_until = 0,"
        " last_error = '' WHERE id = ?",
        lambda o, now: (now, o.item.id),
    ),
    "retry_scheduled": (
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, claimed_until = 0, last_error = ?,"
        " last_outcome = ? WHERE id = ?",
        lambda o, now: (o.next_attempt_at, o.reason, o.detail.get("outcome"), o.item.id),
    ),
    "dead_lettered": (
        "UPDATE outbox SET state = 'dead', attempts = attempts + 1, claimed_until = 0, last_error = ?,"
        " last_outcome = ? WHERE id = ?",
        lambda o, now: (o.reason, o.detail.get("outcome"), o.item.id),
    ),
    "stale": (
        "UPDATE outbox SET state = 'stale', claimed_until = 0, last_error = ? WHERE id = ?",
        lambda o, now: (o.reason, o.item.id),
    ),
}


def _apply_outcomes(conn: sqlite3.Connection, outcomes: list[AttemptOutcome], now: float) -> None:
    """Each outcome's row update and its audit record, in the caller's transaction (one executemany per kind)."""
    by_stage: dict[str, list[tuple[Any, ...]]] = {}
    for o in outcomes:
        by_stage.setdefault(o.stage, []).append(_OUTCOME_SQL[o.stage][1](o, now))
    for stage, params in by_stage.items():
        conn.executemany(_OUTCOME_SQL[stage][0], params)
    _audit_many(conn, [(o.item.inbound_id, o.item.id, o.stage, o.audit_detail()) for o in outcomes])


def _insert_inbound(
    conn: sqlite3.Connection,
    record: InboundRecord,
    outcome: Outcome,
    ack_code: str,
    reason: str,
    *,
    dedup: bool,
    sha256: str,
) -> int:
    cur = conn.execute(
        "INSERT INTO inbound (received_at, peer, sending_facility, message_control_id, event, size, sha256, raw,"
        " outcome, ack_code, reason, dedup_key, patient_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.received_at or time.time(),
            record.peer,
            record.sending_facility,
            record.message_control_id,
            record.event,
            len(record.raw),
            sha256,
            record.raw,
            outcome.value,
            ack_code,
            reason,
            record.dedup_key if dedup else None,
            record.patient_key or None,
        ),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _received_detail(record: InboundRecord, sha256: str) -> dict[str, Any]:
    return {
        "peer": record.peer,
        "sending_facility": record.sending_facility,
        "message_control_id": record.message_control_id,
        "event": record.event,
        "size": len(record.raw),
        "sha256": sha256,
    }


def _audit(
    conn: sqlite3.Connection,
    inbound_id: int | None,
    outbox_id: int | None,
    stage: str,
    detail: dict[str, Any],
) -> None:
    """Append one chained audit record in the caller's transaction."""
    _audit_many(conn, [(inbound_id, outbox_id, stage, detail)])


def _tail(conn: sqlite3.Connection) -> chain.Head | None:
    """Where the chain ends inside this transaction: remembered by the writer's connection, else read."""
    tail = getattr(conn, "audit_tail", None)
    if tail is None:
        row = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        tail = chain.Head(row[0], row[1]) if row else None
    return tail


def _audit_many(conn: sqlite3.Connection, records: list[tuple[int | None, int | None, str, dict[str, Any]]]) -> None:
    """Append chained audit records, in order, in the caller's transaction (one INSERT statement)."""
    prev = _tail(conn)
    rows = []
    for inbound_id, outbox_id, stage, detail in records:
        at = time.time()
        text = chain.canonical_detail(detail)
        this = chain.link(prev, at, inbound_id, outbox_id, stage, text)
        rows.append((this.seq, at, inbound_id, outbox_id, stage, text, prev.hash if prev else chain.GENESIS, this.hash))
        prev = this
    conn.executemany(
        "INSERT INTO audit (id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    if isinstance(conn, _Connection):
        conn.audit_tail = prev


def _checkpoint(conn: sqlite3.Connection, keys: AuditKeys | None) -> None:
    """Move the head to the chain's last record (once per group commit, inside it)."""
    tail = _tail(conn)
    if tail is None:
        return
    head = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
    if head is not None and head[0] == tail.seq:
        return
    mac = chain.head_mac(keys.checkpoint if keys else None, tail.seq, tail.hash)
    conn.execute(
        "INSERT INTO audit_head (id, seq, hash, mac) VALUES (1, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
        (tail.seq, tail.hash, mac),
    )


def _touch_probe(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),)
    )


def _settle(future: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
