"""The ACK path in one process: CPU per message of `Intake.handle` over a real SQLite store (no sockets).

Run: .venv/bin/python tests/bench/bench_intake.py [--messages 5000] [--in-flight 8] [--validation datatypes]
     [--synchronous FULL] [--profile 25]   (--profile N: cProfile, print the top N functions by own time)

Messages are bench_scale.py's mix (distinct A03, A16, A08, A01, A13). `--in-flight` coroutines each
hand the intake one message after another, as that many MLLP connections would; the store
group-commits what they have in flight. It prints CPU ms per message (process time: the event loop
and the store's writer thread together) and messages/s, with the load average: compare the CPU
figure before and after a change, the wall figure is only as good as the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adapter.intake import Intake, IntakeOptions  # noqa: E402
from adapter.logging import configure  # noqa: E402
from adapter.mapping.loader import load_mappings  # noqa: E402
from adapter.store.sqlite import SqliteStore  # noqa: E402
from tests.bench.bench_scale import load_average, message  # noqa: E402


async def drive(intake: Intake, frames: list[bytes], in_flight: int) -> None:
    async def connection(part: list[bytes]) -> None:
        for frame in part:
            handled = await intake.handle(frame, "127.0.0.1:1")
            if handled.code.value != "AA":
                raise SystemExit(f"not AA: {handled.reason}")

    await asyncio.gather(*(connection(frames[c::in_flight]) for c in range(in_flight)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--validation", choices=["datatypes", "full"], default="datatypes")
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    args = parser.parse_args()

    configure("json", args.log_level, open("/dev/null", "w"))  # noqa: SIM115 - kept for the process
    mappings = load_mappings(ROOT / "mappings")
    options = IntakeOptions(validation=args.validation)
    print(
        f"Intake.handle over SQLite (synchronous={args.synchronous}), {args.in_flight} in flight,"
        f" validation {args.validation}, log level {args.log_level}, load {load_average()}"
    )
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(Path(tmp) / "s.sqlite3", synchronous=args.synchronous)
            intake = Intake(store, mappings, options)
            asyncio.run(drive(intake, [message(i, f"W{run}") for i in range(300)], args.in_flight))  # warm-up
            frames = [message(i, f"R{run}") for i in range(args.messages)]
            profiler = cProfile.Profile() if args.profile else None
            start, wall = os.times(), time.perf_counter()
            if profiler:
                profiler.enable()
            asyncio.run(drive(intake, frames, args.in_flight))
            if profiler:
                profiler.disable()
            end, wall = os.times(), time.perf_counter() - wall
            user, system = end.user - start.user, end.system - start.system
            cpu = user + system
            store.close()
        print(
            f"  run {run + 1}: {cpu * 1000 / args.messages:.3f} ms CPU/message"
            f" ({user * 1000 / args.messages:.3f} user, {system * 1000 / args.messages:.3f} system),"
            f" {args.messages / wall:.0f} msgs/s wall  [load {load_average()}]"
        )
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
