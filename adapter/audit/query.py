"""Reading the audit trail: verify the chain, a message's timeline, filtered lists; SQLite or PostgreSQL.

Read-only connections (beside a serving adapter); nothing here writes. The SQL is the common
subset of both databases, with the placeholder style of the connection's driver.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from adapter.audit import chain
from adapter.audit.keys import AuditKeys
from adapter.config import Settings
from adapter.errors import ConfigError, StoreUnavailable


class Reader:
    """A read-only DB-API connection and its placeholder ('?' for sqlite3, '%s' for psycopg)."""

    def __init__(self, conn: Any, placeholder: str):
        self.conn = conn
        self.ph = placeholder

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(sql.replace("?", self.ph), tuple(params))
        return [tuple(row) for row in cursor.fetchall()]

    def snapshot(self) -> None:
        """Read everything after this from one snapshot, so a serving adapter's new records and head
        (committed together) are seen together or not at all."""
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if self.ph == "%s" else "BEGIN")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def connect(settings: Settings) -> Reader:
    """Open the configured store read-only; a missing SQLite file is a clear error, not a new empty file."""
    if settings.store.url:
        import psycopg

        try:
            conn = psycopg.connect(settings.store.url, autocommit=True)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot reach the PostgreSQL store ({type(exc).__name__})") from exc
        conn.read_only = True
        return Reader(conn, "%s")
    path = Path(settings.store.path)
    if not path.exists():
        raise ConfigError(f"no store at {path} (store.path / HOMEWARD_STORE)")
    return Reader(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, isolation_level=None), "?")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    checked: int
    head: chain.Head | None
    problem: chain.Problem | None
    signed: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.problem is None,
            "checked": self.checked,
            "head": {"seq": self.head.seq, "hash": self.head.hash} if self.head else None,
            "signature_checked": self.signed,
            "problem": (
                {"seq": self.problem.seq, "kind": self.problem.kind, "message": self.problem.message}
                if self.problem
                else None
            ),
        }


def _records(reader: Reader, page: int = 10_000) -> Iterator[chain.ChainRecord]:
    """The chain in seq order, a page at a time (keyset), so memory stays flat on a long trail."""
    after = 0
    while True:
        rows = reader.rows(
            "SELECT id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash FROM audit"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after, page),
        )
        for row in rows:
            yield chain.ChainRecord(*row)
        if len(rows) < page:
            return
        after = rows[-1][0]


def verify(reader: Reader, keys: AuditKeys | None, checkpoints: dict[int, str] | None = None) -> VerifyResult:
    """Walk the whole chain against the head (and the head's signature when a key is given)."""
    reader.snapshot()
    found = reader.rows("SELECT seq, hash, mac FROM audit_head WHERE id = 1")
    head = chain.Head(*found[0]) if found else None
    checked, problem = chain.verify(_records(reader), head, keys.checkpoint if keys else None, checkpoints)
    return VerifyResult(checked, head, problem, signed=keys is not None)


def timeline(reader: Reader, control_id: str) -> list[dict[str, Any]]:
    """Every audit record of every inbound frame with this MSH-10, oldest first."""
    rows = reader.rows(
        "SELECT a.id, a.at, a.inbound_id, a.outbox_id, a.stage, a.detail, i.sending_facility, i.message_control_id"
        " FROM audit a JOIN inbound i ON i.id = a.inbound_id"
        " WHERE i.message_control_id = ? ORDER BY a.id",
        (control_id,),
    )
    return [
        {
            "seq": r[0],
            "at": r[1],
            "inbound_id": r[2],
            "outbox_id": r[3],
            "stage": r[4],
            "detail": orjson.loads(r[5]),
            "sending_facility": r[6],
            "message_control_id": r[7],
        }
        for r in rows
    ]


def list_messages(
    reader: Reader,
    *,
    since: float | None = None,
    until: float | None = None,
    event: str | None = None,
    status: str | None = None,
    target: str | None = None,
    patient_key: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Inbound messages with their current state, newest first, filtered."""
    where = ["1 = 1"]
    params: list[Any] = []
    if since is not None:
        where.append("i.received_at >= ?")
        params.append(since)
    if until is not None:
        where.append("i.received_at < ?")
        params.append(until)
    if event:
        where.append("i.event = ?")
        params.append(event)
    if patient_key:
        where.append("i.patient_key = ?")
        params.append(patient_key)
    if target:
        where.append("EXISTS (SELECT 1 FROM outbox t WHERE t.inbound_id = i.id AND t.target = ?)")
        params.append(target)
    if status:
        # A message's status: its delivery state when it was queued, else its intake outcome.
        where.append(f"({STATUS_SQL}) = ?")
        params.append(status)
    params.append(limit)
    columns = [
        "inbound_id",
        "received_at",
        "peer",
        "sending_facility",
        "message_control_id",
        "event",
        "size",
        "sha256",
        "outcome",
        "ack_code",
        "reason",
        "status",
        "targets",
        "body_purged",
    ]
    rows = reader.rows(
        "SELECT i.id, i.received_at, i.peer, i.sending_facility, i.message_control_id, i.event, i.size, i.sha256,"
        f" i.outcome, i.ack_code, i.reason, ({STATUS_SQL}) AS status,"
        " (SELECT count(DISTINCT o.target) FROM outbox o WHERE o.inbound_id = i.id) AS targets,"
        " i.raw IS NULL AS body_purged"
        f" FROM inbound i WHERE {' AND '.join(where)} ORDER BY i.id DESC LIMIT ?",
        params,
    )
    found = [dict(zip(columns, row, strict=True)) for row in rows]
    for item in found:
        item["body_purged"] = bool(item["body_purged"])
        item["targets"] = _targets(reader, item["inbound_id"]) if item["targets"] else []
    return found


def _targets(reader: Reader, inbound_id: int) -> list[str]:
    return [
        r[0]
        for r in reader.rows("SELECT DISTINCT target FROM outbox WHERE inbound_id = ? ORDER BY target", (inbound_id,))
    ]


# pending while any delivery is pending, dead while any waits in the dead letters, delivered when one
# was; else the last delivery's state (discarded, stale); with no deliveries, the intake outcome.
STATUS_SQL = """
CASE
  WHEN EXISTS (SELECT 1 FROM outbox s WHERE s.inbound_id = i.id AND s.state = 'pending') THEN 'pending'
  WHEN EXISTS (SELECT 1 FROM outbox s WHERE s.inbound_id = i.id AND s.state = 'dead') THEN 'dead'
  WHEN EXISTS (SELECT 1 FROM outbox s WHERE s.inbound_id = i.id AND s.state = 'delivered') THEN 'delivered'
  ELSE coalesce((SELECT s.state FROM outbox s WHERE s.inbound_id = i.id ORDER BY s.id DESC LIMIT 1), i.outcome)
END
"""
