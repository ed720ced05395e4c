"""Delivery end to end: messages/s from MLLP in to FHIR transaction applied, and how long a backlog takes to drain.

Run: .venv/bin/python tests/bench/bench_delivery.py [--messages 1000] [--connections 4] [--patients 50]

A `homeward serve` subprocess (SQLite synchronous=FULL, full R4B validation, default in-flight cap)
delivers to a stand-in FHIR server in this process (tests/council.py on pytest-httpserver, threaded),
which applies conditional updates in memory. Two phases:
1. steady: send N messages over C connections; time from the first send to the last one applied.
2. outage: the server answers 503 while N more messages arrive (all AA, all queued); then it
   recovers, and the drain time is from recovery to the last one applied. Retries are capped at 1 s
   (HOMEWARD_RETRY_MAX_SECONDS=1) so the figure measures delivery capacity, not the backoff.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pytest_httpserver import HTTPServer  # noqa: E402

from adapter.mllp.client import MllpClient  # noqa: E402
from tests.council import Council  # noqa: E402
from tests.integration.test_delivery import adt  # noqa: E402


def start_server(tmp: Path, fhir_url: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    log = tmp / "serve.log"
    env = {
        **os.environ,
        "HOMEWARD_MLLP_PORT": "0",
        "HOMEWARD_STORE": str(tmp / "bench.sqlite3"),
        "HOMEWARD_FHIR_BASE_URL": fhir_url,
        "HOMEWARD_LOG_FORMAT": "json",
        "HOMEWARD_RETRY_INITIAL_SECONDS": "0.2",
        "HOMEWARD_RETRY_MAX_SECONDS": "1",
    }
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapter", "serve"], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if item.get("event") == "mllp.listening":
                return proc, int(item["port"]), log
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def send_all(port: int, prefix: str, count: int, connections: int, patients: int) -> float:
    """Send `count` messages over `connections` connections; return seconds until the last AA."""
    per = [list(range(c, count, connections)) for c in range(connections)]
    failures: list[str] = []

    def client(indexes: list[int]) -> None:
        with MllpClient("127.0.0.1", port, timeout=60) as mllp:
            for i in indexes:
                patient = i % patients
                ack = mllp.send(adt(f"{prefix}{i}", patient=patient + 1, visit=f"V{patient:05d}"))
                if b"MSA|AA" not in ack:
                    failures.append(f"{prefix}{i}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(p,)) for p in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} messages were not AA, e.g. {failures[:3]}")
    return time.perf_counter() - started


def wait_applied(council: Council, expected: int, timeout: float = 600) -> float:
    started = time.perf_counter()
    while len(set(council.applied)) < expected:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"only {len(set(council.applied))} of {expected} applied after {timeout} s")
        time.sleep(0.01)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--patients", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    council = Council(server)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, _log = start_server(Path(tmp), council.url)
        try:
            n = args.messages
            started = time.perf_counter()
            ack_seconds = send_all(port, "STEADY-", n, args.connections, args.patients)
            done = wait_applied(council, n)
            steady = done - started
            print(f"steady: {n} messages over {args.connections} connections, {args.patients} patients")
            print(f"  acknowledged in {ack_seconds:.2f} s ({n / ack_seconds:.0f} AA/s)")
            print(f"  delivered end to end in {steady:.2f} s: {n / steady:.0f} messages/s with delivery on")

            outage = {"on": True}
            council.fail = lambda control_id, attempt: (503, {}, None) if outage["on"] else None
            send_all(port, "BACKLOG-", n, args.connections, args.patients)
            time.sleep(1.5)  # every patient's head row has failed at least once and is waiting to retry
            posts_during = len(council.posts)
            outage["on"] = False
            recovered = time.perf_counter()
            done = wait_applied(council, 2 * n)
            drain = done - recovered
            print(f"outage: {n} messages queued behind 503s ({posts_during - n} failed attempts meanwhile)")
            print(f"  backlog of {n} drained in {drain:.2f} s after recovery ({n / drain:.0f} messages/s)")
            twice = len(council.applied) - len(set(council.applied))
            print(
                f"  messages applied twice: {twice}; resources created once each: {max(council.creates.values()) == 1}"
            )
        finally:
            proc.terminate()
            proc.wait(30)
            server.clear()
            server.stop()


if __name__ == "__main__":
    main()
