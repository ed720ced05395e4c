"""What the audit trail costs per message: the hash chain per record, the store's work per message, verify speed.

Run: .venv/bin/python tests/bench/bench_audit.py [--messages 5000] [--rounds 3]

1. chain: `_audit` (read head, hash, insert) against a bare INSERT of the same row, in one transaction,
   synchronous=OFF, so the figure is CPU, not fsync (the records share the state change's commit).
2. store: accept (received, queued, accepted) + mark_delivered (delivered) per message through the
   real SqliteStore, with the chained `_audit` and with a bare insert, synchronous=NORMAL.
3. verify: `homeward audit verify`'s walk, records per second.

Wall time on a shared machine swings with the other work; CPU time (process_time: every thread of this
process, the store's writer included) does much less, so both are printed and the CPU figure is the one
to quote for "what the audit costs".
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


def per_record(records: int, tmp: Path) -> tuple[float, float, float, float]:
    """(chained wall, plain wall, chained CPU, plain CPU), microseconds a record."""
    wall, cpu = [], []
    for name, fn in (("chained", sqlite_store._audit), ("plain", plain_audit)):
        conn = sqlite3.connect(tmp / f"records-{name}.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(sqlite_store.SCHEMA)
        conn.execute("BEGIN")
        started, cpu_started = time.perf_counter(), time.process_time()
        for n in range(records):
            fn(conn, n, n, "delivered", DETAIL)
        elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
        conn.execute("COMMIT")
        conn.close()
        wall.append(elapsed / records * 1e6)
        cpu.append(cpu_elapsed / records * 1e6)
    return wall[0], wall[1], cpu[0], cpu[1]


def per_message(messages: int, tmp: Path, chained: bool) -> tuple[float, float]:
    """(wall, CPU) microseconds a message."""
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

    async def run() -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        # 8 in flight, as several MLLP connections would: the writer group-commits them.
        for start in range(0, messages, 8):
            await asyncio.gather(*(one(n) for n in range(start, min(start + 8, messages))))
        done = 0
        while done < messages:
            items = await store.claim_due(time.time() + 1, 64, 60)
            await asyncio.gather(*(store.mark_delivered(i, time.time(), DETAIL) for i in items))
            done += len(items)
        return time.perf_counter() - started, time.process_time() - cpu_started

    try:
        elapsed, cpu = asyncio.run(run())
    finally:
        store.close()
        sqlite_store._audit = original
    return elapsed / messages * 1e6, cpu / messages * 1e6


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
        chained, plain, chained_cpu, plain_cpu = per_record(args.messages * 4, tmp)
        print(
            f"audit record, chained _audit : {chained:7.1f} us wall, {chained_cpu:.1f} us CPU"
            f"   (bare insert {plain:.1f} us wall, {plain_cpu:.1f} us CPU;"
            f" chain +{chained - plain:.1f} us wall, +{chained_cpu - plain_cpu:.1f} us CPU)"
        )
        # Alternating rounds, best of each: the machine is shared, so single runs swing by tens of percent.
        chained_runs, bare_runs = [], []
        for r in range(args.rounds):
            chained_runs.append(per_message(args.messages, tmp / f"c{r}", chained=True))
            bare_runs.append(per_message(args.messages, tmp / f"b{r}", chained=False))
        for what, pick in (("wall", 0), ("CPU", 1)):
            with_chain = min(run[pick] for run in chained_runs)
            without = min(run[pick] for run in bare_runs)
            print(
                f"store per message (accept + deliver, 4 audit records, synchronous=NORMAL), {what}:"
                f" {with_chain:7.1f} us chained, {without:.1f} us bare;"
                f" audit chain costs {with_chain - without:+.1f} us a message"
                f" ({(with_chain - without) / without * 100:+.1f} %)"
            )
        checked, rate = verify_rate(tmp)
        print(f"audit verify: {checked} records at {rate:,.0f} records/s")


if __name__ == "__main__":
    main()
