"""Backlog drain: how fast `homeward serve` empties a store of N queued messages into a fast FHIR sink.

Run: .venv/bin/python tests/bench/bench_backlog.py [--messages 100000] [--patients 1000] [--runs 2]
     [--workers 2] [--store-url postgresql://postgres@127.0.0.1:5432/test]

1. Fill: N distinct ADT^A03 (one visit per patient, `--patients` patients) are written to one file and
   taken in with `homeward import` (the same intake as live traffic: parse, map, validate, store, audit)
   while no server runs, so all N wait in the outbox. SQLite: the filled file is kept under
   .cache/bench/ and copied for each run (the fill takes minutes). PostgreSQL: a fresh schema per run.
2. Drain: the sink (tests/bench/sink.py, a raw asyncio HTTP/1.1 server in its own process) is up,
   then `homeward serve` starts on the filled store; the drain time runs from the serve process's
   start (start-up included) to the sink's last POST. `--workers N` sets delivery.workers (N delivery
   processes under serve). CPU is that of serve and its workers together, per message; RSS is sampled
   per process while it drains (the largest, and the sum of all; peak from /proc VmHWM). Afterwards the
   store is checked: every row delivered, none sent twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_delivery import adt  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
# The import needs some FHIR URL so its outbox rows are for the `default` FHIR target; nothing listens here.
NOWHERE = "http://127.0.0.1:9/fhir"


def write_backlog(path: Path, count: int, patients: int) -> None:
    """`count` messages, one after another (blank line between), patients round-robin."""
    with open(path, "wb") as out:
        for i in range(count):
            patient = i % patients
            out.write(adt(f"BL{i:07d}", patient=patient + 1, visit=f"V{patient:05d}").replace(b"\n", b"\r"))
            out.write(b"\r\n\r\n")


def fill(env: dict[str, str], count: int, patients: int, work: Path) -> float:
    """Import the backlog into the store named by `env`; return the messages/s of the import."""
    backlog = work / "backlog.hl7"
    write_backlog(backlog, count, patients)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "adapter", "import", "--no-progress", "--state", str(work / "state.json"), str(backlog)],
        env={**env, "HOMEWARD_FHIR_BASE_URL": NOWHERE},
        cwd=work,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or f"{count} accepted" not in done.stdout:
        raise SystemExit(f"import failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    backlog.unlink()
    return count / elapsed


def sqlite_store(count: int, patients: int, work: Path) -> tuple[dict[str, str], str]:
    """A copy of the cached filled SQLite store (filled first if there is none)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    template = CACHE / f"backlog-{count}-{patients}.sqlite3"
    note = "cached fill"
    if not template.exists():
        partial = CACHE / "filling.sqlite3"
        for leftover in CACHE.glob("filling.sqlite3*"):
            leftover.unlink()
        rate = fill({**os.environ, "HOMEWARD_STORE": str(partial)}, count, patients, work)
        partial.rename(template)
        note = f"filled by `homeward import` at {rate:.0f} messages/s"
    store = work / "store.sqlite3"
    shutil.copyfile(template, store)
    return {**os.environ, "HOMEWARD_STORE": str(store)}, note


def postgres_store(url: str, count: int, patients: int, work: Path) -> tuple[dict[str, str], str, str]:
    from tests.conftest import new_schema

    schema_url = new_schema(url)
    env = {**os.environ, "HOMEWARD_STORE_URL": schema_url}
    migrated = subprocess.run([sys.executable, "-m", "adapter", "migrate"], env=env, capture_output=True, text=True)
    if migrated.returncode != 0:
        raise SystemExit(migrated.stderr)
    rate = fill(env, count, patients, work)
    return env, f"filled by `homeward import` at {rate:.0f} messages/s", schema_url


def start_sink(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = work / "sink.port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "bench" / "sink.py"), str(port_file)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("sink did not start")


def sink_count(port: int) -> tuple[int, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /count HTTP/1.1\r\nHost: sink\r\n\r\n")
        data = b""
        # The sink keeps connections alive: read up to the end of its Content-Length body.
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            data += sock.recv(4096)
    posts, last = data.split(b"\r\n\r\n", 1)[1].split()
    return int(posts), float(last)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (on a shared machine, steadier than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def family(pid: int) -> list[int]:
    """A process and its children (serve's delivery workers)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(child) for child in task.read_text().split()]
    return pids


def drain(env: dict[str, str], count: int, work: Path, timeout: float) -> dict[str, float]:
    sink, port = start_sink(work)
    log = work / "serve.log"
    serve_env = {
        **env,
        "HOMEWARD_MLLP_PORT": "0",
        "HOMEWARD_FHIR_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "HOMEWARD_LOG_FORMAT": "json",
    }
    try:
        with open(log, "wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "adapter", "serve"],
                env=serve_env,
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        rss: list[float] = []
        rss_sum: list[float] = []
        try:
            posts, last = 0, 0.0
            while posts < count:
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"only {posts} of {count} delivered after {timeout} s")
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
                sizes = [rss_mb(p) for p in family(proc.pid)]
                rss.append(max(sizes))
                rss_sum.append(sum(sizes))
                posts, last = sink_count(port)
            pids = family(proc.pid)
            peak = max(rss_mb(p, "VmHWM") for p in pids)
            peak_sum = sum(rss_mb(p, "VmHWM") for p in pids)
            cpu = sum(cpu_seconds(p) for p in pids)
            time.sleep(0.5)  # anything sent twice would show up now
            posts, _ = sink_count(port)
        finally:
            proc.terminate()
            proc.wait(60)
        return {
            "seconds": last - started,
            "posts": posts,
            "rss_median": sorted(rss)[len(rss) // 2],
            "rss_peak": peak,
            "rss_sum_median": sorted(rss_sum)[len(rss_sum) // 2],
            "rss_sum_peak": peak_sum,
            "processes": len(pids),
            "cpu": cpu,
        }
    finally:
        sink.terminate()
        sink.wait(10)


def check_store(env: dict[str, str], count: int) -> str:
    """Every outbox row delivered exactly once in the store's own records."""
    sql = "SELECT state, count(*) FROM outbox GROUP BY state"
    if "HOMEWARD_STORE_URL" in env:
        import psycopg

        with psycopg.connect(env["HOMEWARD_STORE_URL"]) as conn:
            states = dict(conn.execute(sql).fetchall())
            audited = conn.execute("SELECT count(*) FROM audit WHERE stage = 'delivered'").fetchone()[0]
    else:
        import sqlite3

        with sqlite3.connect(env["HOMEWARD_STORE"]) as conn:
            states = dict(conn.execute(sql).fetchall())
            audited = conn.execute("SELECT count(*) FROM audit WHERE stage = 'delivered'").fetchone()[0]
    ok = states == {"delivered": count} and audited == count
    return f"store: {json.dumps(states)}, 'delivered' audit records: {audited} ({'OK' if ok else 'MISMATCH'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--store-url", default="", help="PostgreSQL server URL; a fresh schema per run")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workers", type=int, default=0, help="delivery.workers for serve (0: serve delivers)")
    parser.add_argument("--in-flight", type=int, default=4, help="fhir.max_in_flight (per delivery process)")
    args = parser.parse_args()
    n = args.messages
    backend = "postgresql" if args.store_url else "sqlite"
    print(
        f"backlog drain: {n} messages, {args.patients} patients, {backend} store, delivery.workers {args.workers},"
        f" fhir.max_in_flight {args.in_flight}, load {os.getloadavg()[0]:.1f}"
    )
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            schema_url = ""
            if args.store_url:
                env, note, schema_url = postgres_store(args.store_url, n, args.patients, work)
            else:
                env, note = sqlite_store(n, args.patients, work)
            env = {
                **env,
                "HOMEWARD_DELIVERY_WORKERS": str(args.workers),
                "HOMEWARD_FHIR_MAX_IN_FLIGHT": str(args.in_flight),
            }
            load = os.getloadavg()[0]
            try:
                result = drain(env, n, work, args.timeout)
                checked = check_store(env, n)
            finally:
                if schema_url:
                    from tests.conftest import drop_schema

                    drop_schema(schema_url)
            print(
                f"run {run} ({note}; load {load:.1f} -> {os.getloadavg()[0]:.1f}): drained in {result['seconds']:.1f} s"
                f" = {n / result['seconds']:.0f} messages/s; posts {result['posts']:.0f} for {n} messages;"
                f" serve CPU {result['cpu'] / n * 1000:.2f} ms a message (start-up included, all"
                f" {result['processes']:.0f} processes); RSS of the largest process median {result['rss_median']:.0f} MB,"
                f" peak {result['rss_peak']:.0f} MB; all processes together median {result['rss_sum_median']:.0f} MB,"
                f" peak {result['rss_sum_peak']:.0f} MB"
            )
            print(f"  {checked}")


if __name__ == "__main__":
    main()
