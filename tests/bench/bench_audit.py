"""What the audit trail costs per message: the hash chain per record, the store's work per message, verify speed.

Run: .venv/bin/python tests/bench/bench_audit.py [--messages 5000] [--rounds 3]

1. chain: `_audit` (read head, hash, insert) against a bare INSERT of the same row, in one transaction,
   synchronous=OFF, so the figure is CPU, not fsync (the records share the state change's commit).
2. store: accept (received, queued, accepted) + mark_delivered (delivered) per message through the
   real SqliteStore, with the chained `_audit` and with a bare insert, synchronous=NORMAL.
3. verify: `homeward audit verify`'s walk, records per second.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter.audit import query  # noqa: E402
from adapter.audit.keys import AuditKeys  # noqa: E402
from adapter.store import sqlite as sqlite_store  # noqa: E402
from adapter.store.base import Delivery, InboundRecord  # noqa: E402

DETAIL = {"target": "default", "status": 200, "duration_ms": 12.345, "response": ["Patient/123/_history/2"] * 5}
RAW = (ROOT / "tests/golden/ADT_A03/basic.hl7").read_bytes().replace(b"\n", b"\r")
BUNDLE = b"{" + b'"x":"' + b"y" * 6000 + b'"}'


def plain_audit(conn: sqlite3.Connection, inbound_id: Any, outbox_id: Any, stage: str, detail: dict[str, Any]) -> None:
    """The audit insert as it was before the chain: the baseline."""
    import orjson

    conn.execute(
        "INSERT INTO audit (at, inbound_id, outbox_id, stage, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, '', '')",
        (time.time(), inbound_id, outbox_id, stage, orjson.dumps(detail).decode()),
    )


def per_record(records: int, tmp: Path) -> tuple[float, float]:
    results = []
    for name, fn in (("chained", sqlite_store._audit), ("plain", plain_audit)):
        conn = sqlite3.connect(tmp / f"records-{name}.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(sqlite_store.SCHEMA)
        conn.execute("BEGIN")
        started = time.perf_counter()
        for n in range(records):
            fn(conn, n, n, "delivered", DETAIL)
        elapsed = time.perf_counter() - started
        conn.execute("COMMIT")
        conn.close()
        results.append(elapsed / records * 1e6)
    return results[0], results[1]


def per_message(messages: int, tmp: Path, chained: bool) -> float:
    original = sqlite_store._audit
    if not chained:
        sqlite_store._audit = plain_audit  # type: ignore[assignment]
    keys = AuditKeys.from_secret(b"bench key 0123456789abcdef")
    tmp.mkdir(exist_ok=True)
    store = sqlite_store.SqliteStore(tmp / "msgs.sqlite3", synchronous="NORMAL", audit_keys=keys)

    async def one(n: int) -> None:
        record = InboundRecord(
            raw=RAW,
            peer="127.0.0.1:1",
            sending_facility="RRK",
            message_control_id=f"B{n}",
            event="ADT^A03",
            received_at=time.time(),
        )
        await store.accept(record, [Delivery("default", f"k{n}", BUNDLE, 6)], {"resources": 6, "ack_code": "AA"})

    async def run() -> float:
        started = time.perf_counter()
        # 8 in flight, as several MLLP connections would: the writer group-commits them.
        for start in range(0, messages, 8):
            await asyncio.gather(*(one(n) for n in range(start, min(start + 8, messages))))
        done = 0
        while done < messages:
            items = await store.claim_due(time.time() + 1, 64, 60)
            await asyncio.gather(*(store.mark_delivered(i, time.time(), DETAIL) for i in items))
            done += len(items)
        return time.perf_counter() - started

    try:
        elapsed = asyncio.run(run())
    finally:
        store.close()
        sqlite_store._audit = original
    return elapsed / messages * 1e6


def verify_rate(tmp: Path) -> tuple[int, float]:
    with query.Reader(sqlite3.connect(tmp / "c0" / "msgs.sqlite3", isolation_level=None), "?") as reader:
        started = time.perf_counter()
        result = query.verify(reader, AuditKeys.from_secret(b"bench key 0123456789abcdef"))
        elapsed = time.perf_counter() - started
    assert result.problem is None, result.problem
    return result.checked, result.checked / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        chained, plain = per_record(args.messages * 4, tmp)
        print(
            f"audit record, chained _audit : {chained:7.1f} us   (bare insert {plain:.1f} us; chain +{chained - plain:.1f} us)"
        )
        # Alternating rounds, best of each: the machine is shared, so single runs swing by tens of percent.
        chained_runs, bare_runs = [], []
        for r in range(args.rounds):
            chained_runs.append(per_message(args.messages, tmp / f"c{r}", chained=True))
            bare_runs.append(per_message(args.messages, tmp / f"b{r}", chained=False))
        with_chain, without = min(chained_runs), min(bare_runs)
        print(
            f"store per message (accept + deliver, 4 audit records, synchronous=NORMAL): {with_chain:7.1f} us chained,"
            f" {without:.1f} us bare; audit chain costs {with_chain - without:+.1f} us a message"
            f" ({(with_chain - without) / without * 100:+.1f} %)"
        )
        checked, rate = verify_rate(tmp)
        print(f"audit verify: {checked} records at {rate:,.0f} records/s")


if __name__ == "__main__":
    main()
