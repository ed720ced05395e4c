"""A03 path: ACK latency and messages/s through `homeward serve` (MLLP -> parse -> map -> validate -> SQLite -> AA).

Run: .venv/bin/python tests/bench/bench_ack.py [--messages 2000] [--connections 1]
Delivery goes to the directory drop, so the figures are for the acknowledgement path only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter.mllp.client import MllpClient  # noqa: E402

TEMPLATE = (ROOT / "tests/golden/ADT_A03/basic.hl7").read_bytes().replace(b"\n", b"\r")


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / "serve.log"
    env = {
        **os.environ,
        "HOMEWARD_MLLP_PORT": "0",
        "HOMEWARD_STORE": str(tmp / "bench.sqlite3"),
        "HOMEWARD_OUTBOX_DIR": str(tmp / "outbox"),
        "HOMEWARD_LOG_FORMAT": "json",
    }
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapter", "serve"], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT
        )
    env_port = None
    deadline = time.monotonic() + 20
    while env_port is None and time.monotonic() < deadline:
        time.sleep(0.1)
        env_port = _port_from_store_log(log)
    if env_port is None:
        proc.kill()
        raise SystemExit(f"server did not start:\n{log.read_text()}")
    return proc, env_port


def _port_from_store_log(log: Path) -> int | None:
    import json

    for line in log.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if item.get("event") == "mllp.listening":
            return int(item["port"])
    return None


def run(port: int, messages: int, connections: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    per_connection = messages // connections

    def sender(c: int) -> None:
        own: list[float] = []
        with MllpClient("127.0.0.1", port) as client:
            for n in range(per_connection):
                msg = TEMPLATE.replace(b"|MSG00001|", f"|B{c}-{n}|".encode())
                started = time.perf_counter()
                ack = client.send(msg)
                own.append(time.perf_counter() - started)
                if b"MSA|AA" not in ack:
                    raise SystemExit(f"not AA: {ack!r}")
        with lock:
            latencies.extend(own)

    started = time.perf_counter()
    threads = [threading.Thread(target=sender, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp))
        try:
            run(port, 50, 1)  # warm-up: model imports, first validation
            latencies, elapsed = run(port, args.messages, args.connections)
        finally:
            proc.terminate()
            proc.wait(20)
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    print(f"A03 ack path, {len(ms)} messages over {args.connections} connection(s), {os.cpu_count()} CPUs")
    print(f"  messages/s acknowledged (AA): {len(ms) / elapsed:.0f}")
    print(f"  ACK latency ms: p50 {q[49]:.2f}  p95 {q[94]:.2f}  p99 {q[98]:.2f}  max {ms[-1]:.2f}")


if __name__ == "__main__":
    main()
