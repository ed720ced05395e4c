"""The shared store: PostgreSQL, so several `homeward serve` instances can work one queue.

Claims are row locks, not leases written into the row: `claim_due` takes each row with
`FOR UPDATE SKIP LOCKED` in its own transaction and keeps that transaction open until the outcome
is recorded. If an instance dies mid-send, PostgreSQL ends its session and the row is free at once;
a live but stuck instance loses it after `idle_in_transaction_session_timeout` (the lease).
Per-visit order holds across instances because outbox rows for one (target, ordering_key) are
inserted under a transaction-scoped advisory lock, so their ids are in commit order; duplicates
across instances meet the unique constraint on inbound.dedup_key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import psycopg

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

SCHEMA_VERSION = 1

# Statements of schema version 1; `migrate` runs them under an advisory lock, so two instances
# starting together cannot race on CREATE TABLE.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS homeward_schema (version integer NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS inbound (
        id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received_at        double precision NOT NULL,
        peer               text NOT NULL DEFAULT '',
        sending_facility   text NOT NULL DEFAULT '',
        message_control_id text NOT NULL DEFAULT '',
        event              text NOT NULL DEFAULT '',
        size               integer NOT NULL,
        sha256             text NOT NULL,
        raw                bytea,
        outcome            text NOT NULL,
        ack_code           text NOT NULL,
        reason             text NOT NULL DEFAULT '',
        -- MSH-4|MSH-10 of accepted messages only; a resend to any instance collides here.
        dedup_key          text UNIQUE,
        -- Keyed HMAC of the patient's NHS number (adapter/audit/keys.py), never the number itself.
        patient_key        text
    )""",
    """CREATE INDEX IF NOT EXISTS inbound_patient ON inbound (patient_key) WHERE patient_key IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS inbound_received ON inbound (received_at)""",
    """CREATE INDEX IF NOT EXISTS inbound_control_id ON inbound (message_control_id)""",
    """CREATE TABLE IF NOT EXISTS outbox (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        inbound_id      bigint NOT NULL REFERENCES inbound (id),
        target          text NOT NULL,
        ordering_key    text NOT NULL,
        bundle          bytea NOT NULL,
        state           text NOT NULL DEFAULT 'pending',
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        claimed_until   double precision NOT NULL DEFAULT 0,
        created_at      double precision NOT NULL,
        delivered_at    double precision,
        last_error      text NOT NULL DEFAULT '',
        -- The age limit counts from here: arrival, or the last manual retry / replay.
        queued_at       double precision NOT NULL DEFAULT 0,
        -- The server's OperationOutcome from the last failed attempt (JSON text), for the dead letters.
        last_outcome    text,
        -- The stale-event rule: EVN-2 (else MSH-7) as epoch seconds, per visit.
        visit_key       text NOT NULL DEFAULT '',
        event_time      double precision
    )""",
    """CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE state = 'pending'""",
    """CREATE INDEX IF NOT EXISTS outbox_order ON outbox (target, ordering_key, id) WHERE state = 'pending'""",
    """CREATE INDEX IF NOT EXISTS outbox_visit ON outbox (target, visit_key, state)""",
    # A message's rows, for retention (each purged message scanned the whole outbox without it).
    """CREATE INDEX IF NOT EXISTS outbox_inbound ON outbox (inbound_id)""",
    # Append-only and hash-chained (adapter/audit/chain.py): id is the chain's seq, 1, 2, 3, ... across
    # every instance, because each append locks the one head row first.
    """CREATE TABLE IF NOT EXISTS audit (
        id          bigint PRIMARY KEY,
        at          double precision NOT NULL,
        inbound_id  bigint,
        outbox_id   bigint,
        stage       text NOT NULL,
        detail      text NOT NULL DEFAULT '{}',
        prev_hash   text NOT NULL,
        hash        text NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS audit_inbound ON audit (inbound_id)""",
    """CREATE INDEX IF NOT EXISTS audit_stage_at ON audit (stage, at)""",
    """CREATE TABLE IF NOT EXISTS audit_head (
        id    integer PRIMARY KEY CHECK (id = 1),
        seq   bigint NOT NULL,
        hash  text NOT NULL,
        mac   text NOT NULL DEFAULT ''
    )""",
    f"""INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{chain.GENESIS}') ON CONFLICT (id) DO NOTHING""",
]
_MIGRATION_LOCK = 0x486F6D65  # "Home": one migration at a time per database

# The columns of a claimed row; the last one is what the stale-event rule compares with.
ITEM_COLUMNS = """
o.id, o.inbound_id, o.target, o.ordering_key, o.bundle, o.attempts, o.created_at,
i.sending_facility, i.message_control_id, i.event, o.queued_at, o.visit_key, o.event_time,
CASE WHEN o.visit_key <> '' THEN (
    SELECT max(d.event_time) FROM outbox d
    WHERE d.target = o.target AND d.visit_key = o.visit_key AND d.state = 'delivered')
END"""

# The oldest pending row of each (target, ordering_key), and only if no other session holds it.
# A row being sent stays 'pending' and locked, so it both hides itself and holds back its successors.
CLAIM_SQL = f"""
SELECT {ITEM_COLUMNS}
FROM outbox o JOIN inbound i ON i.id = o.inbound_id
WHERE o.state = 'pending' AND o.next_attempt_at <= %s
  AND NOT EXISTS (
      SELECT 1 FROM outbox p
      WHERE p.target = o.target AND p.ordering_key = o.ordering_key AND p.state = 'pending' AND p.id < o.id)
ORDER BY o.id
LIMIT 1
FOR UPDATE OF o SKIP LOCKED
"""

# The same for one (target, ordering_key): its oldest pending row, if due and not held by another session.
NEXT_SQL = f"""
SELECT {ITEM_COLUMNS}
FROM outbox o JOIN inbound i ON i.id = o.inbound_id
WHERE o.target = %s AND o.ordering_key = %s AND o.state = 'pending' AND o.next_attempt_at <= %s
  AND NOT EXISTS (
      SELECT 1 FROM outbox p
      WHERE p.target = o.target AND p.ordering_key = o.ordering_key AND p.state = 'pending' AND p.id < o.id)
ORDER BY o.id
LIMIT 1
FOR UPDATE OF o SKIP LOCKED
"""


class _Connection(psycopg.Connection[Any]):
    """A connection that knows the audit keys its appends sign the chain head with."""

    audit_keys: AuditKeys | None = None


def migrate(url: str) -> int:
    """Create or bring the schema up to date; return the schema version. Safe to run concurrently."""
    try:
        with psycopg.connect(url, autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            for statement in SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM homeward_schema").fetchone()
            if row is None or row[0] is None:
                conn.execute("INSERT INTO homeward_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            conn.commit()
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot migrate the PostgreSQL store ({type(exc).__name__}: {exc})") from exc
    return SCHEMA_VERSION


class PostgresStore:
    """Store over one PostgreSQL database; callable from the event loop, shared by several processes."""

    # Each claim is an open transaction on a connection of its own: keep well under max_connections.
    max_claims = 16

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        lease_seconds: float = 120.0,
        audit_keys: AuditKeys | None = None,
    ):
        self.url = url
        self.audit_keys = audit_keys
        self.lease_seconds = lease_seconds
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        # outbox id -> (the connection whose open transaction holds the row lock, lease end by the caller's clock)
        self._claims: dict[int, tuple[psycopg.Connection[Any], float]] = {}
        self._idle_claim_conns: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="pg-store")
        self._closed = False
        self._check_schema()

    def _check_schema(self) -> None:
        try:
            with psycopg.connect(self.url, connect_timeout=10) as conn:
                row = conn.execute("SELECT max(version) FROM homeward_schema").fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot reach the PostgreSQL store ({type(exc).__name__})") from exc
        if row is None or row[0] != SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the PostgreSQL store has schema {row[0] if row else None}, not {SCHEMA_VERSION}: run `homeward migrate`"
            )

    # -- connections --------------------------------------------------------------------------

    def _connect(self, lease: bool = False) -> psycopg.Connection[Any]:
        conn = _Connection.connect(self.url, connect_timeout=10)
        conn.audit_keys = self.audit_keys
        if lease:
            # A claim open longer than the lease means a stuck instance: PostgreSQL ends the session.
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (f"{int(self.lease_seconds * 1000)}",),
            )
            conn.commit()
        with self._lock:
            self._all.append(conn)
        return conn

    def _thread_conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._connect()
            self._local.conn = conn
        return conn

    async def _run(self, op: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run `op(conn)` in one committed transaction on a worker thread."""
        if self._closed:
            raise StoreUnavailable("the store is closed")

        def job() -> Any:
            try:
                conn = self._thread_conn()
                with conn.transaction():
                    return op(conn)
            except psycopg.Error as exc:
                raise StoreUnavailable(f"the store could not commit ({type(exc).__name__})") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    def close(self) -> None:
        """Roll back open claims (their rows become claimable again) and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._all:
                # Roll back first (waiting for the server), so the rows are claimable the moment close returns.
                with contextlib.suppress(psycopg.Error):
                    if not conn.closed and not conn.broken:
                        conn.rollback()
                conn.close()
            self._all.clear()
            self._claims.clear()

    # -- intake -------------------------------------------------------------------------------

    async def accept(self, record: InboundRecord, deliveries: list[Delivery], detail: dict[str, Any]) -> AcceptResult:
        def op(conn: psycopg.Connection[Any]) -> AcceptResult:
            # Lock each visit's queue before its rows get ids, so ids follow commit order per visit.
            _lock_queues(conn, [(d.target, d.ordering_key) for d in deliveries])
            inbound_id = _insert_inbound(conn, record, Outcome.ACCEPTED, "AA", "", dedup=True)
            if inbound_id is None:
                original = conn.execute("SELECT id FROM inbound WHERE dedup_key = %s", (record.dedup_key,)).fetchone()
                dup_id = _insert_inbound(conn, record, Outcome.DUPLICATE, "AA", "resend of an accepted message")
                _audit(conn, dup_id, None, "received", _received_detail(record))
                _audit(
                    conn,
                    dup_id,
                    None,
                    "duplicate",
                    {"ack_code": "AA", "original_inbound_id": original[0] if original else None},
                )
                assert dup_id is not None
                return AcceptResult(dup_id, True)
            _audit(conn, inbound_id, None, "received", _received_detail(record))
            ids = []
            for d in deliveries:
                at = record.received_at
                row = conn.execute(
                    "INSERT INTO outbox (inbound_id, target, ordering_key, bundle, next_attempt_at, created_at,"
                    " queued_at, visit_key, event_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (inbound_id, d.target, d.ordering_key, d.bundle, at, at, at, d.visit_key, d.event_time),
                ).fetchone()
                assert row is not None
                ids.append(row[0])
                _audit(conn, inbound_id, row[0], "queued", {"target": d.target, "resources": d.resource_count})
            _audit(conn, inbound_id, None, "accepted", detail)
            return AcceptResult(inbound_id, False, tuple(ids))

        return await self._run(op)  # type: ignore[no-any-return]

    async def record(self, record: InboundRecord, outcome: Outcome, ack_code: str, reason: str) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            inbound_id = _insert_inbound(conn, record, outcome, ack_code, reason)
            _audit(conn, inbound_id, None, "received", _received_detail(record))
            _audit(conn, inbound_id, None, outcome.value, {"ack_code": ack_code, "reason": reason})
            assert inbound_id is not None
            return inbound_id

        return await self._run(op)  # type: ignore[no-any-return]

    # -- the forwarder ------------------------------------------------------------------------

    async def claim_due(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Claim up to `limit` rows, each held by its own open transaction until its outcome is recorded."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._claim, now, limit, lease_seconds)

    def _claim(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        self._expire_leases(now)
        items: list[OutboxItem] = []
        for _ in range(limit):
            try:
                item = self._claim_one(CLAIM_SQL, (now,), now + lease_seconds)
            except StoreUnavailable:
                if items:
                    break
                raise
            if item is None:
                break
            items.append(item)
        return items

    async def claim_next(self, item: OutboxItem, now: float, lease_seconds: float) -> OutboxItem | None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._claim_one, NEXT_SQL, (item.target, item.ordering_key, now), now + lease_seconds
        )

    def _claim_one(self, sql: str, params: tuple[Any, ...], until: float) -> OutboxItem | None:
        """Run a claim query on a claim connection; its open transaction holds the row it returns."""
        conn = self._claim_conn()
        try:
            row = conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"the store could not claim ({type(exc).__name__})") from exc
        if row is None:
            conn.rollback()
            self._release_claim_conn(conn)
            return None
        item = _item(row)
        with self._lock:
            self._claims[item.id] = (conn, until)
        return item

    def _expire_leases(self, now: float) -> None:
        """Let go of this instance's claims whose lease has run out (a send that never reported back)."""
        with self._lock:
            expired = [(oid, held[0]) for oid, held in self._claims.items() if held[1] <= now]
            for oid, _ in expired:
                del self._claims[oid]
        for _, conn in expired:
            try:
                conn.rollback()
            except psycopg.Error:
                conn.close()
            self._release_claim_conn(conn)

    def _claim_conn(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._idle_claim_conns:
                conn = self._idle_claim_conns.pop()
                if not conn.closed and not conn.broken:
                    return conn
        return self._connect(lease=True)

    def _release_claim_conn(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if not conn.closed and not conn.broken:
                self._idle_claim_conns.append(conn)

    async def record_outcomes(
        self, outcomes: list[AttemptOutcome], now: float, lease_seconds: float
    ) -> list[OutboxItem | None]:
        """Each outcome commits on the connection whose transaction holds its row, all at once on the worker
        threads (so PostgreSQL can group their commits), then claims its key's next row."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()

        async def one(outcome: AttemptOutcome) -> OutboxItem | None:
            await loop.run_in_executor(self._executor, self._finish, outcome, now)
            if not outcome.frees_key:
                return None
            key = (outcome.item.target, outcome.item.ordering_key, now)
            return await loop.run_in_executor(self._executor, self._claim_one, NEXT_SQL, key, now + lease_seconds)

        results = await asyncio.gather(*(one(o) for o in outcomes), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # The forwarder lets every row of the batch go: give back the next rows claimed for it.
            for result in results:
                if isinstance(result, OutboxItem):
                    await loop.run_in_executor(self._executor, self._unclaim, result.id)
            if not all(isinstance(r, StoreUnavailable) for r in failed):
                raise failed[0]
            raise StoreUnavailable(f"{len(failed)} of {len(outcomes)} outcomes could not be recorded")
        return [r for r in results if not isinstance(r, BaseException)]

    def _unclaim(self, outbox_id: int) -> None:
        """Roll back one claim of this instance (the row is claimable again at once)."""
        with self._lock:
            held = self._claims.pop(outbox_id, None)
        if held is None:
            return
        try:
            held[0].rollback()
        except psycopg.Error:
            held[0].close()
        self._release_claim_conn(held[0])

    def _finish(self, outcome: AttemptOutcome, now: float) -> None:
        """Record an outcome in the transaction that holds the claim, and commit it (releasing the row)."""
        with self._lock:
            held = self._claims.pop(outcome.item.id, None)
        if held is None:  # not claimed here, or its lease ran out: a transaction of its own
            conn = self._thread_conn()
            try:
                with conn.transaction():
                    _apply(conn, outcome, now)
            except psycopg.Error as exc:
                raise StoreUnavailable(f"the store could not record the outcome ({type(exc).__name__})") from exc
            return
        conn = held[0]
        try:
            _apply(conn, outcome, now)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"the store could not record the outcome ({type(exc).__name__})") from exc
        self._release_claim_conn(conn)

    async def _record_one(self, outcome: AttemptOutcome, now: float) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._finish, outcome, now)

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
            "SELECT max(event_time) FROM outbox WHERE target = %s AND visit_key = %s AND state = 'delivered'",
            (target, visit_key),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    # -- people: dead letters and replay ------------------------------------------------------

    async def list_deliveries(
        self, state: DeliveryState | None = DeliveryState.DEAD, limit: int = 100
    ) -> list[DeliveryRecord]:
        where, params = ("WHERE o.state = %s", (state.value,)) if state is not None else ("", ())
        rows = await self._read(f"{RECORD_SQL} {where} ORDER BY o.id LIMIT %s", (*params, limit))
        return [_record(row) for row in rows]

    async def get_delivery(self, outbox_id: int) -> DeliveryRecord | None:
        rows = await self._read(f"{RECORD_SQL} WHERE o.id = %s", (outbox_id,))
        return _record(rows[0]) if rows else None

    async def retry_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        def op(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = %s, queued_at = %s"
                " WHERE id = %s AND state = 'dead' RETURNING inbound_id",
                (now, now, outbox_id),
            ).fetchone()
            if row is None:
                return False
            _audit(conn, row[0], outbox_id, "dead_letter_retried", actor.detail())
            return True

        return await self._run(op)  # type: ignore[no-any-return]

    async def discard_dead(self, outbox_id: int, now: float, actor: Actor) -> bool:
        def op(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                "UPDATE outbox SET state = 'discarded' WHERE id = %s AND state = 'dead' RETURNING inbound_id",
                (outbox_id,),
            ).fetchone()
            if row is None:
                return False
            _audit(conn, row[0], outbox_id, "dead_letter_discarded", actor.detail())
            return True

        return await self._run(op)  # type: ignore[no-any-return]

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
        clauses = ["o.state = 'delivered'", "octet_length(o.bundle) > 0"]  # a purged body cannot be replayed
        params: list[Any] = []
        for clause, value in (("i.message_control_id = %s", control_id), ("i.received_at >= %s", since)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if target is not None:
            clauses.append("o.target = %s")
            params.append(target)

        def op(conn: psycopg.Connection[Any]) -> list[int]:
            rows = conn.execute(
                "SELECT o.id, o.inbound_id, o.target, o.ordering_key, o.bundle, o.visit_key FROM outbox o"
                f" JOIN inbound i ON i.id = o.inbound_id WHERE {' AND '.join(clauses)} ORDER BY o.id",
                params,
            ).fetchall()
            _lock_queues(conn, [(row[2], row[3]) for row in rows])
            new_ids = []
            for old_id, inbound_id, row_target, ordering_key, bundle, visit_key in rows:
                # event_time stays NULL: a replay re-applies history in arrival order, so the stale rule
                # (meant for events that arrive late) must not skip it.
                new = conn.execute(
                    "INSERT INTO outbox (inbound_id, target, ordering_key, bundle, next_attempt_at, created_at,"
                    " queued_at, visit_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (inbound_id, row_target, ordering_key, bundle, now, now, now, visit_key),
                ).fetchone()
                assert new is not None
                new_ids.append(int(new[0]))
                _audit(conn, inbound_id, new[0], "replayed", {**actor.detail(), "replay_of": old_id})
            return new_ids

        return await self._run(op)  # type: ignore[no-any-return]

    async def purge_bodies(self, before: float, actor: Actor, batch: int = 500) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            ids = [row[0] for row in conn.execute(PURGE_SQL, (before, batch)).fetchall()]
            for inbound_id in ids:
                conn.execute("UPDATE inbound SET raw = NULL WHERE id = %s", (inbound_id,))
                conn.execute(
                    "UPDATE outbox SET bundle = ''::bytea, last_outcome = NULL,"
                    # last_error keeps our reason, not the server's words quoted after it.
                    " last_error = split_part(last_error, '; server said: ', 1) WHERE inbound_id = %s",
                    (inbound_id,),
                )
                _audit(conn, inbound_id, None, "body_purged", {**actor.detail(), "received_before": before})
            return len(ids)

        total = 0
        while True:
            done: int = await self._run(op)
            total += done
            if done < batch:
                return total

    async def audit_trail(self, *, inbound_id: int | None = None, outbox_id: int | None = None) -> list[AuditEntry]:
        if inbound_id is None and outbox_id is None:
            raise ValueError("audit_trail needs an inbound id or an outbox id")
        column, value = ("inbound_id", inbound_id) if inbound_id is not None else ("outbox_id", outbox_id)
        rows = await self._read(
            f"SELECT at, inbound_id, outbox_id, stage, detail FROM audit WHERE {column} = %s ORDER BY id", (value,)
        )
        return [AuditEntry(row[0], row[1], row[2], row[3], orjson.loads(row[4])) for row in rows]

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())  # type: ignore[no-any-return]

    # -- reading (CLI, tests) -----------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read with a connection of its own (%s placeholders)."""
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def queue_stats(self) -> list[tuple[str, int, float | None, int]]:
        rows = self.query(
            "SELECT target, count(*) FILTER (WHERE state = 'pending'),"
            " min(queued_at) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead')"
            " FROM outbox WHERE state IN ('pending', 'dead') GROUP BY target"
        )
        return [(r[0], int(r[1]), r[2], int(r[3])) for r in rows]

    def last_received_at(self) -> float | None:
        value = self.query("SELECT max(received_at) FROM inbound")[0][0]  # inbound_received: one index step
        return None if value is None else float(value)

    def check_writable(self, timeout: float) -> None:
        # Assigning a transaction id and committing writes a commit record: the database takes writes.
        try:
            with psycopg.connect(self.url, connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout * 1000)}",))
                conn.execute("SELECT pg_current_xact_id()")
                conn.commit()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"the store did not commit within {timeout} s ({type(exc).__name__})") from exc

    def pending_count(self) -> int:
        return int(self.query("SELECT count(*) FROM outbox WHERE state = 'pending'")[0][0])

    def audit_head(self) -> tuple[int, str]:
        rows = self.query("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else (0, chain.GENESIS)


# Bodies a person may still need stay: anything still pending or waiting in the dead letters.
# SKIP LOCKED: a row being sent right now is left for the next purge.
PURGE_SQL = """
SELECT i.id FROM inbound i
WHERE i.received_at < %s AND i.raw IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM outbox o WHERE o.inbound_id = i.id AND o.state IN ('pending', 'dead'))
ORDER BY i.id
LIMIT %s
FOR UPDATE OF i SKIP LOCKED
"""

RECORD_SQL = """
SELECT o.id, o.inbound_id, o.target, o.ordering_key, o.state, o.attempts, o.created_at, o.queued_at,
       o.next_attempt_at, o.delivered_at, o.last_error, o.last_outcome,
       i.sending_facility, i.message_control_id, i.event
FROM outbox o JOIN inbound i ON i.id = o.inbound_id
"""


def _record(row: tuple[Any, ...]) -> DeliveryRecord:
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


def _lock_queues(conn: psycopg.Connection[Any], keys: list[tuple[str, str]]) -> None:
    """Lock each (target, ordering_key) queue before its rows get ids, so ids follow commit order per visit.

    Sorted, so two transactions locking the same queues cannot deadlock.
    """
    for key in sorted({f"{target}|{ordering_key}" for target, ordering_key in keys}):
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


# Per audit stage: the outbox update an outcome makes, and its parameters.
_OUTCOME_SQL: dict[str, tuple[str, Callable[[AttemptOutcome, float], tuple[Any, ...]]]] = {
    "delivered": (
        "UPDATE outbox SET state = 'delivered', delivered_at = %s, attempts = attempts + 1, last_error = ''"
        " WHERE id = %s",
        lambda o, now: (now, o.item.id),
    ),
    "retry_scheduled": (
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s, last_outcome = %s"
        " WHERE id = %s",
        lambda o, now: (o.next_attempt_at, o.reason, o.detail.get("outcome"), o.item.id),
    ),
    "dead_lettered": (
        "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = %s, last_outcome = %s WHERE id = %s",
        lambda o, now: (o.reason, o.detail.get("outcome"), o.item.id),
    ),
    "stale": (
        "UPDATE outbox SET state = 'stale', last_error = %s WHERE id = %s",
        lambda o, now: (o.reason, o.item.id),
    ),
}


def _apply(conn: psycopg.Connection[Any], outcome: AttemptOutcome, now: float) -> None:
    sql, params = _OUTCOME_SQL[outcome.stage]
    conn.execute(sql, params(outcome, now))
    _audit(conn, outcome.item.inbound_id, outcome.item.id, outcome.stage, outcome.audit_detail())


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        id=row[0],
        inbound_id=row[1],
        target=row[2],
        ordering_key=row[3],
        bundle=bytes(row[4]),
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


def _insert_inbound(
    conn: psycopg.Connection[Any],
    record: InboundRecord,
    outcome: Outcome,
    ack_code: str,
    reason: str,
    *,
    dedup: bool = False,
) -> int | None:
    """Insert one inbound row; with `dedup`, None when an accepted message already has its key."""
    conflict = " ON CONFLICT (dedup_key) DO NOTHING" if dedup else ""
    row = conn.execute(
        "INSERT INTO inbound (received_at, peer, sending_facility, message_control_id, event, size, sha256, raw,"
        " outcome, ack_code, reason, dedup_key, patient_key)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f"{conflict} RETURNING id",
        (
            record.received_at or time.time(),
            record.peer,
            record.sending_facility,
            record.message_control_id,
            record.event,
            len(record.raw),
            hashlib.sha256(record.raw).hexdigest(),
            record.raw,
            outcome.value,
            ack_code,
            reason,
            record.dedup_key if dedup else None,
            record.patient_key or None,
        ),
    ).fetchone()
    return None if row is None else int(row[0])


def _received_detail(record: InboundRecord) -> dict[str, Any]:
    return {
        "peer": record.peer,
        "sending_facility": record.sending_facility,
        "message_control_id": record.message_control_id,
        "event": record.event,
        "size": len(record.raw),
        "sha256": hashlib.sha256(record.raw).hexdigest(),
    }


def _audit(
    conn: psycopg.Connection[Any], inbound_id: int | None, outbox_id: int | None, stage: str, detail: Any
) -> None:
    """Append one chained audit record in the caller's transaction.

    The head row is locked (FOR UPDATE) until that transaction commits, so appends from every
    instance form one gapless chain; it is the one point where instances wait for each other.
    """
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
    prev = chain.Head(head[0], head[1]) if head and head[0] else None
    at = time.time()
    text = chain.canonical_detail(detail)
    this = chain.link(prev, at, inbound_id, outbox_id, stage, text)
    conn.execute(
        "INSERT INTO audit (id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (this.seq, at, inbound_id, outbox_id, stage, text, prev.hash if prev else chain.GENESIS, this.hash),
    )
    keys = conn.audit_keys if isinstance(conn, _Connection) else None
    mac = chain.head_mac(keys.checkpoint if keys else None, this.seq, this.hash)
    conn.execute("UPDATE audit_head SET seq = %s, hash = %s, mac = %s WHERE id = 1", (this.seq, this.hash, mac))
