"""CPU a POST costs the delivery's HTTP client: httpx over its default transport (anyio) and over Homeward's.

Run: .venv/bin/python tests/bench/bench_http.py [--posts 20000] [--in-flight 4] [--rounds 3]

Starts tests/bench/sink.py (the scale benchmark's fast local FHIR sink) and, in this process on uvloop
(as a delivery worker runs), POSTs a 6 KB Bundle from tests/golden over keep-alive connections, the
default transport and adapter/http_transport.py's taking turns. Prints the CPU time this process used
a POST (the sink's is not counted) and POSTs a second, per round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter.http_transport import asyncio_transport  # noqa: E402

BUNDLE = (ROOT / "tests" / "golden" / "ADT_A03" / "basic.bundle.json").read_bytes()


def start_sink(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / "sink.port"
    sink = subprocess.Popen([sys.executable, str(ROOT / "tests" / "bench" / "sink.py"), str(port_file)])
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or sink.poll() is not None:
            raise SystemExit("the sink did not start")
        time.sleep(0.05)
    return sink, int(port_file.read_text())


async def posts(
    url: str, transport: httpx.AsyncBaseTransport | None, count: int, in_flight: int
) -> tuple[float, float]:
    """(CPU seconds a POST, POSTs a second) for `count` POSTs, `in_flight` at a time, after a warm-up."""
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(
        transport=transport, limits=limits, headers={"Content-Type": "application/fhir+json"}
    ) as client:

        async def sender(n: int) -> None:
            for _ in range(n):
                response = await client.post(url, content=BUNDLE)
                response.raise_for_status()

        await asyncio.gather(*(sender(50) for _ in range(in_flight)))
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(sender(count // in_flight) for _ in range(in_flight)))
        return (time.process_time() - cpu) / count, count / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=4, help="fhir.max_in_flight's default")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"HTTP POST of a {len(BUNDLE):,}-byte Bundle to a local sink, {args.in_flight} in flight, uvloop,"
          f" load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sink, port = start_sink(Path(tmp))
        url = f"http://127.0.0.1:{port}/fhir"
        try:
            for n in range(1, args.rounds + 1):
                limits = httpx.Limits(max_connections=args.in_flight, max_keepalive_connections=args.in_flight)
                for name, transport in (("httpx default", None), ("Homeward's", asyncio_transport(True, limits))):
                    cpu, rate = uvloop.run(posts(url, transport, args.posts, args.in_flight))
                    print(f"  round {n}, {name:13} transport: {cpu * 1e3:.3f} ms CPU a POST, {rate:,.0f} POSTs/s")
        finally:
            sink.terminate()
            sink.wait(10)


if __name__ == "__main__":
    main()
