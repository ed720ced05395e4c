"""The mapping path of `homeward map`, per message: parse -> map -> (R4B validation) -> JSON, in one process.

Run: .venv/bin/python tests/bench/bench_map.py [--rounds 200] [--case ADT_A03/v26_full]
Prints CPU-time medians and p95 in ms per message for each stage, over the golden cases given (all
events by default). No assertion: the machine is shared, so the figures are for reading, not gating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from adapter.errors import InboundError  # noqa: E402
from adapter.hl7.parse import parse  # noqa: E402
from adapter.mapping.engine import map_message  # noqa: E402
from adapter.mapping.loader import load_mappings  # noqa: E402
from adapter.mapping.validate import validate_bundle  # noqa: E402

DEFAULT_CASES = [
    "ADT_A03/basic",
    "ADT_A03/v26_full",
    "ADT_A16/cycle",
    "ADT_A13/cycle",
    "ADT_A08/next_of_kin",
    "ADT_A01/social_admission",
    "ADT_A40/merge",
]


def cpu_ms(fn: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.process_time_ns()
        fn()
        times.append((time.process_time_ns() - start) / 1e6)
    return times


def summary(times: list[float]) -> str:
    p95 = sorted(times)[int(len(times) * 0.95) - 1]
    return f"median {statistics.median(times):7.3f} ms  p95 {p95:7.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--case", action="append", help="golden case, e.g. ADT_A03/v26_full (repeatable)")
    args = parser.parse_args()
    mappings = load_mappings(ROOT / "mappings")
    tz = ZoneInfo("Europe/London")
    for case in args.case or DEFAULT_CASES:
        raw = (ROOT / "tests/golden" / f"{case}.hl7").read_bytes()
        try:
            result = map_message(parse(raw), mappings, tz)
        except InboundError as exc:
            print(f"{case}: refused ({exc.reason}); skipped")
            continue
        validate_bundle(result.bundle)  # the first call loads the R4B models (~0.5 s); keep it out of the figures

        def mapped(raw: bytes = raw) -> bytes:
            return orjson.dumps(map_message(parse(raw), mappings, tz).bundle)

        def validated(raw: bytes = raw) -> None:
            validate_bundle(map_message(parse(raw), mappings, tz).bundle)

        print(
            f"{case} ({len(raw)} bytes, {result.resource_count} entries, {len(orjson.dumps(result.bundle))} bytes JSON)"
        )
        print(f"  parse                  {summary(cpu_ms(lambda raw=raw: parse(raw), args.rounds))}")
        print(f"  parse + map + JSON     {summary(cpu_ms(mapped, args.rounds))}")
        print(f"  + R4B validation       {summary(cpu_ms(validated, args.rounds))}")


if __name__ == "__main__":
    main()
