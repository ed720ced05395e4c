"""Reading the audit trail of a SQLite store: verify the chain, a message's timeline, filtered lists.

Read-only connections (WAL lets them run beside a serving adapter); nothing here writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from adapter.audit import chain
from adapter.audit.keys import AuditKeys
from adapter.errors import ConfigError


def connect(path: Path) -> sqlite3.Connection:
    """A read-only connection; a missing store is a clear error, not a new empty file."""
    if not Path(path).exists():
        raise ConfigError(f"no store at {path} (store.path / HOMEWARD_STORE)")
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


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


def _records(conn: sqlite3.Connection) -> Iterator[chain.ChainRecord]:
    cursor = conn.execute("SELECT id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash FROM audit ORDER BY id")
    for row in cursor:
        yield chain.ChainRecord(*row)


def verify(conn: sqlite3.Connection, keys: AuditKeys | None) -> VerifyResult:
    """Walk the whole chain against the head (and the head's signature when a key is given)."""
    row = conn.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1").fetchone()
    head = chain.Head(row[0], row[1], row[2]) if row else None
    checked, problem = chain.verify(_records(conn), head, keys.checkpoint if keys else None)
    return VerifyResult(checked, head, problem, signed=keys is not None)


def timeline(conn: sqlite3.Connection, control_id: str) -> list[dict[str, Any]]:
    """Every audit record of every inbound frame with this MSH-10, oldest first."""
    rows = conn.execute(
        "SELECT a.id, a.at, a.inbound_id, a.outbox_id, a.stage, a.detail, i.sending_facility, i.message_control_id"
        " FROM audit a JOIN inbound i ON i.id = a.inbound_id"
        " WHERE i.message_control_id = ? ORDER BY a.id",
        (control_id,),
    ).fetchall()
    return [_record(row) for row in rows]


def list_messages(
    conn: sqlite3.Connection,
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
    rows = conn.execute(
        "SELECT i.id, i.received_at, i.peer, i.sending_facility, i.message_control_id, i.event, i.size, i.sha256,"
        f" i.outcome, i.ack_code, i.reason, ({STATUS_SQL}) AS status,"
        " (SELECT group_concat(DISTINCT o.target) FROM outbox o WHERE o.inbound_id = i.id) AS targets,"
        " i.raw IS NULL AS body_purged"
        f" FROM inbound i WHERE {' AND '.join(where)} ORDER BY i.id DESC LIMIT ?",
        params,
    ).fetchall()
    return [
        {
            "inbound_id": r["id"],
            "received_at": r["received_at"],
            "peer": r["peer"],
            "sending_facility": r["sending_facility"],
            "message_control_id": r["message_control_id"],
            "event": r["event"],
            "size": r["size"],
            "sha256": r["sha256"],
            "outcome": r["outcome"],
            "ack_code": r["ack_code"],
            "reason": r["reason"],
            "status": r["status"],
            "targets": (r["targets"] or "").split(",") if r["targets"] else [],
            "body_purged": bool(r["body_purged"]),
        }
        for r in rows
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


def _record(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "seq": row["id"],
        "at": row["at"],
        "inbound_id": row["inbound_id"],
        "outbox_id": row["outbox_id"],
        "stage": row["stage"],
        "detail": orjson.loads(row["detail"]),
        "sending_facility": row["sending_facility"],
        "message_control_id": row["message_control_id"],
    }
