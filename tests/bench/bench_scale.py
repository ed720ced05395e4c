"""The scale benchmark: `homeward serve` as a separate process, MLLP load from separate processes, a fast FHIR sink.

Run: .venv/bin/python tests/bench/bench_scale.py --workers 2     (100,000 messages through serve; ~5-10 min)
     .venv/bin/python tests/bench/bench_scale.py --quick         (small counts, about a minute)
     .venv/bin/python tests/bench/bench_scale.py --validation full   (serve with mapping.validation = full)

Messages are a realistic mix of distinct ADT events (A03, A16, A08, A01, A13 from tests/golden), each
with its own control id, patient, visit and a later event time; all are parsed, mapped and checked
on the path. The load generator is one process per MLLP connection, with blocking sockets and frames
built before the clock starts, so it costs the machine little (but it does share the two cores).
The serve process delivers to tests/bench/sink.py while it acknowledges, as it would in service.
It prints:

  map         `homeward map`'s pipeline in one process (parse + map + checks + JSON), msgs/s, both modes
  max AA      acknowledged (AA, committed) messages/s over N connections, closed loop, while serve
              delivers, with the CPU serve (and its intake workers) used per message
  fixed rate  ACK latency p50/p95/p99 at a fixed offered rate (default 500/s), counted from each
              message's scheduled send time, so a slow ACK delays the clock (no coordinated omission)
  delivered   messages/s delivered end to end: a batch over the most connections, sent as fast as it is
              acknowledged while serve delivers, from its first send to the sink's last POST
  held back   max AA again with the sink stopped (SIGSTOP: the council does not answer, so delivery
              costs next to nothing): what the ACK path alone takes; then how fast that backlog
              drains once the sink answers again (--no-held leaves this out)
  RSS         of the serve process(es), summed: after each step of --total messages, and the peak (VmHWM)

--workers N sets mllp.workers (intake worker processes; 2 on this 2-core machine); the figures in
the README give both 0 and 2.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import signal
import socket
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
LOADGEN_CPU = [0.0]  # CPU seconds the load generator's processes used (they share the cores)


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
    patient = i % PATIENTS
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(1_790_000_000 + i)).encode()
    out = []
    for line in TEMPLATES[i % len(TEMPLATES)]:
        if line.startswith(b"MSH"):
            fields = line.split(b"|")
            fields[9] = f"{run}{i}".encode()
            line = b"|".join(fields)
        elif line.startswith(b"EVN"):
            fields = line.split(b"|")
            line = b"|".join([fields[0], fields[1], stamp, *fields[3:]])
        elif line.startswith(b"PID"):
            line = line.replace(b"9449305552", nhs_number(patient).encode())
            line = line.replace(b"RRK123456", f"RRK{patient:06d}".encode())
        elif line.startswith(b"PV1"):
            line = line.replace(b"V0001234", f"V{patient:07d}".encode())
        out.append(line)
    return b"\r".join(out) + b"\r"


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{what} did not start" + (f":\n{log.read_text()}" if log else ""))


def start_sink(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "sink.port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/bench/sink.py"), str(port_file)])
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    raise SystemExit("the sink did not start")


def sink_count(port: int) -> tuple[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as response:
        posts, last = response.read().decode().split()
    return int(posts), float(last)


def start_serve(tmp: Path, store: Path, sink_port: int, args: Any) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / "serve.log"
    port = free_port()  # the listening line is info, and the log level here is warning
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")},
        "HOMEWARD_MLLP_PORT": str(port),
        "HOMEWARD_STORE": str(store),
        "HOMEWARD_FHIR_BASE_URL": f"http://127.0.0.1:{sink_port}/fhir",
        "HOMEWARD_LOG_FORMAT": "json",
        "HOMEWARD_LOG_LEVEL": args.log_level,
        "HOMEWARD_MAPPING_VALIDATION": args.validation,
        **dict(item.split("=", 1) for item in args.env),
    }
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapter", "serve"], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT
        )
    wait_port(port, proc, "serve", log)
    return proc, port


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (serve may run worker processes)."""
    pids = [pid]
    for p in pids:
        # Every thread's children: serve starts its workers from a thread of its own (adapter/workers.py).
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                pids.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return pids


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB, summed over serve and any processes it started, from /proc."""
    now = peak = 0.0
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                now += int(rest.split()[0]) / 1024
            elif key == "VmHWM":
                peak += int(rest.split()[0]) / 1024
    return now, peak


def pss_mb(pid: int) -> float:
    """PSS in MB summed over serve and its processes: each shared page (the interpreter, libraries)
    counted once across them, where summed RSS counts it once per process."""
    total = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def store_counts(store: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()


def wait_delivered(store: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = store_counts(store)
        if not counts.get("pending"):
            return counts
        time.sleep(0.2)
    return store_counts(store)


# -- the load generator: one process per connection ----------------------------------------------


def _connection(job: tuple[int, list[int], str, float, float]) -> list[float]:
    """One MLLP connection: send each message after the previous ACK (and not before its due time
    when `interval` > 0); returns latencies in seconds, from the due time (or the send) to the ACK."""
    port, indexes, run, start_at, interval = job
    frames = [wrap(message(i, run)) for i in indexes]  # built before the clock starts
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = FrameReader()
    latencies = []
    pending: list[bytes] = []
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    for n, frame in enumerate(frames):
        due = start_at + n * interval if interval else time.monotonic()
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sock.sendall(frame)
        while not pending:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without an ACK")
            pending.extend(e.payload for e in reader.feed(chunk) if isinstance(e, Frame))
        ack = pending.pop(0)
        latencies.append(time.monotonic() - due)
        if b"MSA|AA" not in ack:
            raise SystemExit(f"not AA: {ack[:200]!r}")
    sock.close()
    return latencies


def load(port: int, first: int, count: int, connections: int, run: str, rate: float = 0.0) -> tuple[float, list[float]]:
    """Send messages first..first+count-1 over `connections` connections, one process each; closed loop,
    or `rate` messages/s offered in total. Returns (elapsed seconds, latencies)."""
    interval = connections / rate if rate else 0.0
    start_at = time.monotonic() + 1.0 + count / 20_000  # time for the processes to build their frames
    jobs = []
    for c in range(connections):
        offset = c * interval / connections  # spread the connections' sends evenly in time
        jobs.append((port, list(range(first + c, first + count, connections)), run, start_at + offset, interval))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with multiprocessing.get_context("fork").Pool(connections) as pool:
        results = pool.map(_connection, jobs)
    elapsed = time.monotonic() - start_at
    pool.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LOADGEN_CPU[0] += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, [x for r in results for x in r]


def quantiles(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.1f} ms  p95 {q[94]:.1f} ms  p99 {q[98]:.1f} ms  max {ms[-1]:.1f} ms"


# -- the phases -------------------------------------------------------------------------------


def bench_map(count: int, full: bool) -> float:
    """`homeward map`'s pipeline (adapter/cli.py cmd_map) in-process, without the file reads: msgs/s."""
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


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (from /proc)."""
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def split_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of (the serve process, the worker processes it started: intake and delivery)."""
    own = cpu_seconds([pid])
    return own, cpu_seconds(process_tree(pid)) - own


def live(tmp: Path, sink: subprocess.Popen[bytes], sink_port: int, args: Any) -> None:
    store = tmp / "live.sqlite3"
    serve, port = start_serve(tmp, store, sink_port, args)
    sent = 0

    def step(count: int, connections: int, rate: float = 0.0) -> tuple[float, list[float]]:
        nonlocal sent
        result = load(port, sent, count, connections, "L", rate)
        sent += count
        return result

    try:
        step(500, 2)  # warm-up: model imports, first commits
        wait_delivered(store, 120)

        def delivered_rows() -> int:
            return store_counts(store).get("delivered", 0)  # the sink cannot be asked while it is stopped

        def max_aa(connections: int, how: str) -> None:
            (own, workers), posts, loadgen = split_cpu(serve.pid), delivered_rows(), LOADGEN_CPU[0]
            elapsed, latencies = step(args.max_messages, connections)
            loadgen = LOADGEN_CPU[0] - loadgen
            (own2, workers2), posts = split_cpu(serve.pid), delivered_rows() - posts
            own, workers = own2 - own, workers2 - workers
            n = len(latencies)
            print(
                f"  max AA/s, {connections} connections, closed loop, {how}, {n} messages:"
                f" {n / elapsed:.0f} msgs/s  (ACK {quantiles(latencies)})  [load {load_average()}]"
            )
            where = f"serve {own:.1f} + its workers {workers:.1f}" if workers else f"serve {own:.1f}"
            print(
                f"    CPU s used: {where} ({(own + workers) / elapsed:.2f} cores) while {n} were acknowledged"
                f" and {posts} delivered: {(own + workers) * 1000 / n:.2f} ms CPU per message acknowledged"
                + (f" (workers {workers * 1000 / n:.2f} ms)" if workers else "")
                + f"; the load generator {loadgen:.1f} s ({loadgen * 1000 / n:.2f} ms per message, frames built included)"
            )

        for connections in args.connections:
            max_aa(connections, "delivery running")
        n = int(args.rate * args.rate_seconds)
        elapsed, latencies = step(n, args.rate_connections, args.rate)
        print(
            f"  ACK latency at {args.rate:.0f} msgs/s offered over {args.rate_connections} connections"
            f" ({n} messages, achieved {n / elapsed:.0f}/s): {quantiles(latencies)}  [load {load_average()}]"
        )
        # End to end: a batch sent as fast as it is acknowledged while serve delivers, timed from its first
        # send to the sink's last POST: what the whole pipeline carries when both sides run at once.
        wait_delivered(store, 1800)
        posts_before, _ = sink_count(sink_port)
        connections = max(args.connections)
        elapsed, _ = step(args.e2e_messages, connections)
        first_send = time.monotonic() - elapsed
        counts = wait_delivered(store, 1800)
        posts, last = sink_count(sink_port)
        delivered = posts - posts_before
        print(
            f"  delivered end to end: {delivered} messages over {connections} connections, acknowledged in"
            f" {elapsed:.1f} s ({delivered / elapsed:.0f}/s), the last delivered {last - first_send:.1f} s after the"
            f" first send = {delivered / (last - first_send):.0f} msgs/s (outbox {counts})  [load {load_average()}]"
        )
        now, peak = rss_mb(serve.pid)
        print(
            f"  RSS of serve after {sent} messages: {now:.0f} MB (peak {peak:.0f} MB; PSS {pss_mb(serve.pid):.0f} MB)"
        )
        if not args.no_held:
            # The council stops answering (the sink is SIGSTOPped): the forwarder's requests wait and
            # delivery costs next to nothing, so this is what the ACK path alone can take; the backlog
            # it leaves is then drained with the council back.
            sink.send_signal(signal.SIGSTOP)
            try:
                for connections in args.connections:
                    max_aa(connections, "delivery held back (council not answering)")
            finally:
                sink.send_signal(signal.SIGCONT)
            posts_before, _ = sink_count(sink_port)
            backlog = store_counts(store).get("pending", 0)
            resumed = time.monotonic()
            wait_delivered(store, 1800)
            drained = time.monotonic() - resumed
            print(
                f"  that backlog ({backlog} pending) drained in {drained:.1f} s once the council answered:"
                f" {backlog / drained:.0f} msgs/s  [load {load_average()}]"
            )
        marks = []
        while sent < args.total:
            count = min(args.total - sent, 20_000)
            step(count, max(args.connections))
            marks.append((sent, rss_mb(serve.pid)[0], pss_mb(serve.pid)))
        if marks:
            print(
                "  RSS (PSS) of serve as messages go through: "
                + ", ".join(f"{n}: {mb:.0f} ({pss:.0f}) MB" for n, mb, pss in marks)
            )
        # Printed whether or not the phases above already sent --total (with 32 connections they send 110,500).
        wait_delivered(store, 1800)
        now, peak = rss_mb(serve.pid)
        print(
            f"  RSS of serve after {sent} messages, all delivered: {now:.0f} MB (peak {peak:.0f} MB;"
            f" PSS {pss_mb(serve.pid):.0f} MB)"
        )
    finally:
        serve.terminate()
        serve.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32], help="e.g. 1,8,16"
    )
    parser.add_argument("--max-messages", type=int, default=10_000, help="closed-loop messages per connection count")
    parser.add_argument("--rate", type=float, default=500.0, help="offered messages/s for the latency phase")
    parser.add_argument("--rate-seconds", type=float, default=20.0)
    parser.add_argument("--rate-connections", type=int, default=8)
    parser.add_argument("--total", type=int, default=100_000, help="messages through serve before the last RSS")
    parser.add_argument("--map-messages", type=int, default=3000)
    parser.add_argument("--e2e-messages", type=int, default=20_000, help="the end-to-end batch")
    parser.add_argument("--validation", choices=["full", "datatypes"], default="datatypes", help="mapping.validation")
    parser.add_argument("--log-level", default="warning", help="serve's log.level (info: a line per stage)")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for serve")
    parser.add_argument("--workers", type=int, default=None, help="mllp.workers for serve (default: serve's own)")
    parser.add_argument("--delivery-workers", type=int, default=None, help="delivery.workers for serve")
    parser.add_argument(
        "--no-held", action="store_true", help="leave out the max AA phase with delivery held back and its drain"
    )
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.max_messages, args.rate_seconds, args.total, args.map_messages = 2000, 5, 0, 500
        args.e2e_messages = 4000
    if args.workers is not None:
        args.env.append(f"HOMEWARD_MLLP_WORKERS={args.workers}")
    if args.delivery_workers is not None:
        args.env.append(f"HOMEWARD_DELIVERY_WORKERS={args.delivery_workers}")

    print(
        f"Homeward scale benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load {load_average()},"
        f" mix {', '.join(MIX)}"
    )
    print(f"  serve: mapping.validation = {args.validation}, log level {args.log_level}, {' '.join(args.env)}")
    print(f"  map, parse + map + R4B validation + JSON, one process: {bench_map(args.map_messages, True):.0f} msgs/s")
    print(f"  map, parse + map + datatype checks + JSON, one process: {bench_map(args.map_messages, False):.0f} msgs/s")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sink, sink_port = start_sink(tmp)
        try:
            live(tmp, sink, sink_port, args)
        finally:
            sink.terminate()
            sink.wait(10)


if __name__ == "__main__":
    main()
