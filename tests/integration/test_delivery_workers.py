"""delivery.workers: the forwarder in several processes, each with its share of the patients' queues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from tests.council import Council
from tests.integration.test_delivery import FAST_RETRY, adt, wait_until
from tests.integration.test_workers import send_concurrently

PATIENTS = 8
PER_PATIENT = 6


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_delivery_workers_keep_order_retries_and_the_audit_chain(  # type: ignore[no-untyped-def]
    serve, httpserver: HTTPServer, request: pytest.FixtureRequest, backend: str
) -> None:
    """Two delivery workers: every message applied once, in arrival order per patient, a retried message
    holds back its patient's later ones, a SIGKILLed worker is replaced and its share goes on at once,
    the audit chain verifies, and SIGTERM stops every worker."""
    council = Council(httpserver)

    def answer(cid: str, attempt: int) -> tuple[int, dict[str, str], None] | None:
        time.sleep(0.05)  # a slow council: each worker has sends in flight (claims held) when one is killed
        # P3's second message fails twice (503): its later messages must wait for it, in whichever worker.
        return (503, {}, None) if cid == "P3-1" and attempt <= 2 else None

    council.fail = answer
    env = {"HOMEWARD_FHIR_BASE_URL": council.url, "HOMEWARD_DELIVERY_WORKERS": "2", **FAST_RETRY}
    if backend == "postgres":
        env["HOMEWARD_STORE_URL"] = request.getfixturevalue("postgres_url")
        migrated = subprocess.run(
            [sys.executable, "-m", "adapter", "migrate"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stderr
    server = serve(**env)
    started = server.wait_for_log("delivery.worker_started", count=2)
    server.wait_for_log("forwarder.started", count=2)
    assert sorted(line["shard"] for line in started) == [0, 1]
    if backend == "sqlite":  # one writer per file: serve commits the workers' claims and outcomes
        for line in started:
            opened = {os.readlink(fd) for fd in Path(f"/proc/{line['pid']}/fd").iterdir() if fd.exists()}
            assert not any(name.endswith(".sqlite3") for name in opened), sorted(opened)

    # One connection per patient, each sending that patient's messages in order.
    first = [[adt(f"P{p}-{i}", patient=p, visit=f"V{p}") for i in range(PER_PATIENT // 2)] for p in range(PATIENTS)]
    assert send_concurrently(server.port, first) == ["AA"] * (PATIENTS * PER_PATIENT // 2)
    wait_until(lambda: len(council.applied) >= 4, what="deliveries under way")
    os.kill(started[0]["pid"], signal.SIGKILL)
    server.wait_for_log("delivery.worker_exited")
    server.wait_for_log("delivery.worker_started", count=3)
    rest = [
        [adt(f"P{p}-{i}", patient=p, visit=f"V{p}") for i in range(PER_PATIENT // 2, PER_PATIENT)]
        for p in range(PATIENTS)
    ]
    assert send_concurrently(server.port, rest) == ["AA"] * (PATIENTS * PER_PATIENT // 2)

    # Well inside the 120 s claim lease: the replacement freed the dead worker's claims itself.
    everything = {f"P{p}-{i}" for p in range(PATIENTS) for i in range(PER_PATIENT)}
    wait_until(lambda: everything <= set(council.applied), timeout=60, what="every message applied")
    time.sleep(0.5)  # anything applied twice would show now
    for p in range(PATIENTS):
        applied = [c for c in council.applied if c.startswith(f"P{p}-")]
        # In order; a send the SIGKILL cut short may be applied again right after itself (same state).
        assert [c for n, c in enumerate(applied) if n == 0 or applied[n - 1] != c] == [
            f"P{p}-{i}" for i in range(PER_PATIENT)
        ], f"patient {p}: {applied}"
    assert council.posts.count("P3-1") == 3  # two 503s, then applied; P3-2.. waited for it
    assert council.creates and all(n == 1 for n in council.creates.values())  # no resource created twice

    verify = subprocess.run(
        [sys.executable, "-m", "adapter", "audit", "verify"], env=server.env, capture_output=True, timeout=60
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    delivered = subprocess.run(
        [sys.executable, "-m", "adapter", "dead-letters", "list", "--state", "delivered", "--limit", "1000", "--json"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert delivered.stdout.count('"state": "delivered"') == PATIENTS * PER_PATIENT, delivered.stderr

    assert server.stop() == 0
    for line in server.log_lines():
        if line.get("event") == "delivery.worker_started":
            assert gone(line["pid"])
