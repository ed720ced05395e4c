"""The audit hash chain: how a record's hash and the signed head are computed, and how a chain is checked.

Storage-free, so every store (SQLite, PostgreSQL) appends and verifies the same way:

* each record carries `seq` (1, 2, 3, ... with no gaps), `prev_hash` and
  `hash = sha256(canonical(seq, at, inbound_id, outbox_id, stage, detail, prev_hash))`;
* the store keeps one head row (last seq, last hash) written in the same transaction as the
  records, with an HMAC over it when an audit key is configured.

The chain alone catches a record changed, inserted or deleted in the middle; the head catches the
newest records deleted; the HMAC on the head catches a chain rebuilt from scratch by someone
without the key. What none of this catches is written in the README ("Audit trail").
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """One audit record as stored; `detail` is the JSON text exactly as written."""

    seq: int
    at: float
    inbound_id: int | None
    outbox_id: int | None
    stage: str
    detail: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Head:
    """The store's own note of where the chain ends."""

    seq: int
    hash: str
    mac: str = ""


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain, in words an operator can act on."""

    seq: int
    kind: str  # changed | inserted | deleted | truncated | head
    message: str


def record_hash(
    seq: int, at: float, inbound_id: int | None, outbox_id: int | None, stage: str, detail: str, prev_hash: str
) -> str:
    """The record's hash. The encoding is a JSON array (orjson: floats shortest round-trip), fixed forever."""
    canonical = orjson.dumps([seq, at, inbound_id, outbox_id, stage, detail, prev_hash])
    return hashlib.sha256(canonical).hexdigest()


def link(prev: Head | None, at: float, inbound_id: int | None, outbox_id: int | None, stage: str, detail: str) -> Head:
    """The seq and hash of the record that follows `prev` (None: the first record)."""
    seq = (prev.seq if prev else 0) + 1
    prev_hash = prev.hash if prev else GENESIS
    return Head(seq, record_hash(seq, at, inbound_id, outbox_id, stage, detail, prev_hash))


def head_mac(key: bytes | None, seq: int, hash: str) -> str:
    """HMAC-SHA256 of the head under the checkpoint key, or '' when no key is configured."""
    if not key:
        return ""
    return hmac.new(key, f"{seq}:{hash}".encode(), hashlib.sha256).hexdigest()


def verify(
    records: Iterable[ChainRecord],
    head: Head | None,
    key: bytes | None = None,
    checkpoints: dict[int, str] | None = None,
) -> tuple[int, Problem | None]:
    """Walk records in seq order; return how many were checked and the first problem, if any.

    `checkpoints` ({seq: hash}, e.g. from `audit.checkpoint` log lines kept elsewhere) must still be
    in the chain: this catches a file rolled back or rebuilt, which the chain and head alone cannot.
    """
    checkpoints = checkpoints or {}
    expected_seq = 1
    prev_hash = GENESIS
    checked = 0
    for r in records:
        if r.seq < expected_seq:
            return checked, Problem(r.seq, "inserted", f"record {r.seq} appears after record {expected_seq - 1}")
        if r.seq > expected_seq:
            missing = f"{expected_seq}" if r.seq == expected_seq + 1 else f"{expected_seq}..{r.seq - 1}"
            return checked, Problem(expected_seq, "deleted", f"record(s) {missing} are missing before record {r.seq}")
        if r.prev_hash != prev_hash:
            return checked, Problem(
                r.seq, "inserted", f"record {r.seq} does not follow record {r.seq - 1} (its prev_hash differs)"
            )
        if record_hash(r.seq, r.at, r.inbound_id, r.outbox_id, r.stage, r.detail, r.prev_hash) != r.hash:
            return checked, Problem(r.seq, "changed", f"record {r.seq} ({r.stage}) does not match its hash")
        if r.seq in checkpoints and checkpoints[r.seq] != r.hash:
            return checked, Problem(
                r.seq, "changed", f"record {r.seq} is not the one checkpointed: history was rewritten"
            )
        checked += 1
        expected_seq += 1
        prev_hash = r.hash
    last_seq = expected_seq - 1
    beyond = [seq for seq in checkpoints if seq > last_seq]
    if beyond:
        return checked, Problem(
            min(beyond), "truncated", f"checkpointed record {min(beyond)} is gone: the store was rolled back or cut"
        )
    if head is None:
        if last_seq:
            return checked, Problem(last_seq, "head", "the audit head is missing")
        return checked, None
    if head.seq > last_seq:
        return checked, Problem(
            last_seq + 1, "truncated", f"the chain ends at record {last_seq} but the head says {head.seq}"
        )
    if head.seq < last_seq:
        return checked, Problem(head.seq + 1, "inserted", f"records after {head.seq} are not covered by the head")
    if head.hash != prev_hash:
        return checked, Problem(last_seq, "head", f"the head's hash does not match record {last_seq}")
    if key and not hmac.compare_digest(head.mac, head_mac(key, head.seq, head.hash)):
        return checked, Problem(last_seq, "head", "the head's signature is wrong (chain rebuilt, or another key)")
    return checked, None


def canonical_detail(detail: dict[str, Any]) -> str:
    """The JSON text stored (and hashed) for a detail dict.

    A server's response body (`outcome`: an OperationOutcome may quote the refused resource) is kept
    as its sha256 and size: audit records outlive the retention purge and cannot be edited without
    breaking the chain, so they must not hold patient data. The text itself stays on the outbox row.
    """
    outcome = detail.get("outcome")
    if isinstance(outcome, str):
        detail = {k: v for k, v in detail.items() if k != "outcome"}
        detail["outcome_sha256"] = hashlib.sha256(outcome.encode()).hexdigest()
        detail["outcome_size"] = len(outcome)
    return orjson.dumps(detail).decode()
