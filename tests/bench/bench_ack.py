"""The Homeward benchmark: `homeward serve` as a separate process, MLLP load in, a fast local FHIR sink out.

Run: .venv/bin/python tests/bench/bench_ack.py            (about 6-8 minutes on 2 cores)
     .venv/bin/python tests/bench/bench_ack.py --quick    (smaller counts, about a minute)

Messages are a realistic mix of distinct ADT events (A03, A16, A08, A01, A13 from tests/golden,
each with its own control id, patient, visit and a later event time), all mapped and validated
with fhir.resources on the path. It prints:

  map        the intake pipeline in one process (parse + map + full validation + JSON), msgs/s
  max AA     acknowledged messages/s over N connections, closed loop (each sends after its ACK)
  fixed rate ACK latency p50/p95/p99 at a fixed offered rate, measured from the scheduled send
             time (so a slow ACK delays the next send's clock: no coordinated omission)
  delivered  messages/s delivered end to end (first send to last POST at the sink)
  backlog    time to drain N stored messages to the sink from a cold start
  RSS        peak RSS of the serve process, and RSS after all messages went through

The load generator runs in this process, on the same two cores as the server: figures are
for the whole machine, and the machine is shared, so they are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter.mllp.framing import Frame, FrameReader, wrap  # noqa: E402

MIX = ["ADT_A03/basic", "ADT_A16/basic", "ADT_A08/demographics_only", "ADT_A01/medical_admission", "ADT_A13/basic"]
TEMPLATES = [
    (ROOT / "tests/golden" / f"{case}.hl7").read_bytes().replace(b"\r\n", b"\n").strip().split(b"\n") for case in MIX
]
PATIENTS = 5000
VALIDATION = ["full"]  # mapping.validation of the serve processes (--validation)


def nhs_number(n: int) -> str:
    """A valid (modulus 11) NHS number made from n."""
    while True:
        base = f"{900000000 + n:09d}"
        check = 11 - sum(int(d) * (10 - i) for i, d in enumerate(base)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            return base + str(check)
        n += 1_000_000


def message(i: int, run: str) -> bytes:
    """Message i of the mix: its own control id, patient, visit, and an event time after message i-1's."""
    lines = list(TEMPLATES[i % len(TEMPLATES)])
    patient = i % PATIENTS
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(1_790_000_000 + i))
    out = []
    for line in lines:
        if line.startswith(b"MSH"):
            fields = line.split(b"|")
            fields[9] = f"{run}{i}".encode()
            line = b"|".join(fields)
        elif line.startswith(b"EVN"):
            fields = line.split(b"|")
            line = b"|".join([fields[0], fields[1], stamp.encode(), *fields[3:]])
        elif line.startswith(b"PID"):
            line = line.replace(b"9449305552", nhs_number(patient).encode()).replace(
                b"RRK123456", f"RRK{patient:06d}".encode()
            )
        elif line.startswith(b"PV1"):
            line = line.replace(b"V0001234", f"V{patient:07d}".encode())
        out.append(line)
    return b"\r".join(out) + b"\r"


# -- processes -------------------------------------------------------------------------------


def start_sink(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "sink.port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/bench/sink.py"), str(port_file)])
    for _ in range(100):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    raise SystemExit("the sink did not start")


def sink_count(port: int) -> tuple[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as response:
        posts, last = response.read().decode().split()
    return int(posts), float(last)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(tmp: Path, store: Path, sink_port: int, name: str) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / f"{name}.log"
    port = free_port()  # the listening line is info, and the log level here is warning
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")},
        "HOMEWARD_MLLP_PORT": str(port),
        "HOMEWARD_STORE": str(store),
        "HOMEWARD_FHIR_BASE_URL": f"http://127.0.0.1:{sink_port}/fhir",
        "HOMEWARD_LOG_FORMAT": "json",
        "HOMEWARD_LOG_LEVEL": "warning",  # one JSON line per stage per message would be part of the figure
        "HOMEWARD_MAPPING_VALIDATION": VALIDATION[0],
    }
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapter", "serve"], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT
        )
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"serve did not start:\n{log.read_text()}")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def store_counts(store: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()


# -- load ------------------------------------------------------------------------------------


class Connection:
    """One MLLP connection on asyncio: send one message, wait for its ACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.frames = reader, writer, FrameReader()
        self.pending: list[bytes] = []

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bytes:
        self.writer.write(wrap(data))
        while not self.pending:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("closed without an ACK")
            self.pending.extend(e.payload for e in self.frames.feed(chunk) if isinstance(e, Frame))
        return self.pending.pop(0)

    def close(self) -> None:
        self.writer.close()


async def closed_loop(port: int, messages: list[bytes], connections: int) -> tuple[float, list[float]]:
    """Each connection sends its share one after another; returns (elapsed seconds, ACK latencies)."""
    conns = [await Connection.open(port) for _ in range(connections)]
    latencies: list[float] = []

    async def sender(c: int) -> None:
        for data in messages[c::connections]:
            started = time.perf_counter()
            ack = await conns[c].send(data)
            latencies.append(time.perf_counter() - started)
            if b"MSA|AA" not in ack:
                raise SystemExit(f"not AA: {ack[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(sender(c) for c in range(connections)))
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return elapsed, latencies


async def fixed_rate(port: int, messages: list[bytes], connections: int, rate: float) -> tuple[float, list[float]]:
    """Offer `rate` messages/s spread over the connections; latency counts from each scheduled send time."""
    conns = [await Connection.open(port) for _ in range(connections)]
    latencies: list[float] = []
    interval = connections / rate
    began = time.perf_counter() + 0.05

    async def sender(c: int) -> None:
        for n, data in enumerate(messages[c::connections]):
            due = began + c * (interval / connections) + n * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            ack = await conns[c].send(data)
            latencies.append(time.perf_counter() - due)
            if b"MSA|AA" not in ack:
                raise SystemExit(f"not AA: {ack[:200]!r}")

    await asyncio.gather(*(sender(c) for c in range(connections)))
    elapsed = time.perf_counter() - began
    for conn in conns:
        conn.close()
    return elapsed, latencies


def quantiles(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.1f} ms  p95 {q[94]:.1f} ms  p99 {q[98]:.1f} ms  max {ms[-1]:.1f} ms"


def wait_delivered(store: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = store_counts(store)
        if not counts.get("pending"):
            return counts
        time.sleep(0.2)
    return store_counts(store)


# -- the phases -------------------------------------------------------------------------------


def bench_map(count: int, full: bool) -> float:
    """The intake pipeline in-process, as `homeward map` runs it per file: msgs/s."""
    from zoneinfo import ZoneInfo

    import orjson

    from adapter.hl7.parse import parse
    from adapter.mapping.engine import map_message
    from adapter.mapping.loader import load_mappings
    from adapter.mapping.validate import validate_bundle

    mappings = load_mappings(ROOT / "mappings")
    tz = ZoneInfo("Europe/London")
    data = [message(i, "M") for i in range(count)]
    for d in data[:50]:
        validate_bundle(map_message(parse(d), mappings, tz).bundle)  # warm-up: model imports
    started = time.perf_counter()
    for d in data:
        result = map_message(parse(d), mappings, tz)
        if full:
            validate_bundle(result.bundle)
        orjson.dumps(result.bundle)
    return count / (time.perf_counter() - started)


def build_backlog(store: Path, count: int) -> None:
    """A store holding `count` accepted messages waiting for delivery, written through the Store API."""
    from zoneinfo import ZoneInfo

    import orjson

    from adapter.hl7.parse import parse
    from adapter.mapping.engine import map_message
    from adapter.mapping.loader import load_mappings
    from adapter.store.base import Delivery, InboundRecord
    from adapter.store.sqlite import SqliteStore

    mappings = load_mappings(ROOT / "mappings")
    tz = ZoneInfo("Europe/London")
    # Map each template once and vary the control id in the bytes: mapping 100k messages is not what is measured.
    mapped = []
    for t in range(len(TEMPLATES)):
        result = map_message(parse(message(t, "T")), mappings, tz)
        mapped.append((orjson.dumps(result.bundle), f"T{t}".encode(), result.resource_count))
    db = SqliteStore(store, synchronous="NORMAL")

    async def fill() -> None:
        for start in range(0, count, 500):
            batch = []
            for i in range(start, min(start + 500, count)):
                bundle, marker, resources = mapped[i % len(mapped)]
                record = InboundRecord(
                    raw=message(i, "Q"),
                    peer="bench",
                    sending_facility="RRK",
                    message_control_id=f"Q{i}",
                    event="ADT^A03",
                    received_at=time.time(),
                )
                delivery = Delivery(
                    "default", f"RRK|P{i % PATIENTS}", bundle.replace(marker, f"Q{i}".encode()), resources
                )
                batch.append(db.accept(record, [delivery], {}))
            await asyncio.gather(*batch)

    asyncio.run(fill())
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-messages", type=int, default=20_000, help="closed-loop messages for max AA/s")
    parser.add_argument("--rate", type=float, default=500.0, help="offered messages/s for the latency phase")
    parser.add_argument("--rate-seconds", type=float, default=20.0)
    parser.add_argument("--total", type=int, default=100_000, help="messages through serve before the final RSS")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--map-messages", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--validation", choices=["full", "datatypes"], default="full", help="mapping.validation")
    parser.add_argument("--skip-backlog", action="store_true")
    args = parser.parse_args()
    VALIDATION[0] = args.validation
    if args.quick:
        args.max_messages, args.rate_seconds, args.total, args.backlog, args.map_messages = 2000, 5, 5000, 5000, 500

    print(f"Homeward benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, mix {', '.join(MIX)}")
    print(f"  serve: mapping.validation = {args.validation}, SQLite synchronous=FULL, log level warning")
    print(f"  map (parse + map + R4B validation + JSON, one process): {bench_map(args.map_messages, True):.0f} msgs/s")
    print(
        f"  map (parse + map + datatype checks + JSON, one process): {bench_map(args.map_messages, False):.0f} msgs/s"
    )

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sink, sink_port = start_sink(tmp)
        try:
            live_phases(tmp, sink_port, args)
            if not args.skip_backlog:
                backlog_phase(tmp, sink_port, args)
        finally:
            sink.terminate()
            sink.wait(10)


def live_phases(tmp: Path, sink_port: int, args: Any) -> None:
    store = tmp / "live.sqlite3"
    serve, port = start_serve(tmp, store, sink_port, "live")
    try:
        sent = 0

        def batch(n: int) -> list[bytes]:
            nonlocal sent
            out = [message(i, "L") for i in range(sent, sent + n)]
            sent += n
            return out

        asyncio.run(closed_loop(port, batch(200), 2))  # warm-up: model imports, first validation
        wait_delivered(store, 60)
        first_send = time.monotonic()
        posts_before, _ = sink_count(sink_port)
        elapsed, latencies = asyncio.run(closed_loop(port, batch(args.max_messages), args.connections))
        print(
            f"  max AA/s, {args.connections} connections closed loop, {len(latencies)} messages: {len(latencies) / elapsed:.0f} msgs/s  ({quantiles(latencies)})"
        )
        n = int(args.rate * args.rate_seconds)
        elapsed, latencies = asyncio.run(fixed_rate(port, batch(n), args.connections, args.rate))
        print(
            f"  ACK latency at {args.rate:.0f} msgs/s offered over {args.connections} connections ({n} messages, achieved {n / elapsed:.0f}/s): {quantiles(latencies)}"
        )
        counts = wait_delivered(store, 900)
        posts, last = sink_count(sink_port)
        delivered = posts - posts_before
        print(
            f"  delivered end to end: {delivered} messages in {last - first_send:.1f} s = {delivered / (last - first_send):.0f} msgs/s (outbox {counts})"
        )
        rest = args.total - sent
        while rest > 0:
            step = min(rest, 20_000)
            asyncio.run(closed_loop(port, batch(step), args.connections))
            rest -= step
        now, peak = rss_mb(serve.pid)
        print(f"  RSS of serve after {sent} messages: {now:.0f} MB (peak {peak:.0f} MB)")
        wait_delivered(store, 900)
        now, peak = rss_mb(serve.pid)
        print(f"  RSS of serve after delivering them: {now:.0f} MB (peak {peak:.0f} MB)")
    finally:
        serve.terminate()
        serve.wait(30)


def backlog_phase(tmp: Path, sink_port: int, args: Any) -> None:
    store = tmp / "backlog.sqlite3"
    started = time.monotonic()
    build_backlog(store, args.backlog)
    print(
        f"  backlog of {args.backlog} stored messages built in {time.monotonic() - started:.0f} s (Store API, group commits)"
    )
    posts_before, _ = sink_count(sink_port)
    began = time.monotonic()
    serve, _ = start_serve(tmp, store, sink_port, "backlog")
    try:
        counts = wait_delivered(store, 1800)
        posts, last = sink_count(sink_port)
        drained = posts - posts_before
        now, peak = rss_mb(serve.pid)
        print(
            f"  backlog drained: {drained} messages in {last - began:.1f} s from process start"
            f" = {drained / (last - began):.0f} msgs/s (outbox {counts}); RSS {now:.0f} MB, peak {peak:.0f} MB"
        )
    finally:
        serve.terminate()
        serve.wait(30)


if __name__ == "__main__":
    main()
