"""Two `homeward serve` instances on one PostgreSQL database, one SIGKILLed mid-stream.

Hospitals spread their messages over both instances (as a TCP load balancer would) and move to the
survivor when one dies. Every message that got AA must reach the council once as far as its
resources go, each patient's messages in the order they were acknowledged, and the shared audit
chain must still verify.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import psycopg
from pytest_httpserver import HTTPServer

from adapter.audit import chain
from adapter.forwarder import CLAIM_AHEAD
from adapter.mllp.client import MllpClient
from adapter.store.postgres import PostgresStore
from tests.conftest import ack_fields
from tests.council import Council
from tests.integration.test_delivery import adt, wait_until

HOSPITALS = 4
PER_HOSPITAL = 50  # 200 messages, 5 patients per hospital
KILL_AFTER_ACKS = 70
# Only the dead instance's rows sent but not yet recorded can reach the council twice: outcomes are recorded
# without holding the senders, so up to the rows it holds at once (Forwarder.max_held), not just 4 in flight.
MAX_RESENT = max(4, min(PostgresStore.max_claims, CLAIM_AHEAD * 4))


def message(hospital: int, i: int) -> tuple[str, int, bytes]:
    """(control id, patient, bytes): each patient's events are one minute apart, in sending order."""
    control_id = f"H{hospital}-{i}"
    patient = hospital * 10 + i % 5
    evn = f"20261124{10 + i // 60:02d}{i % 60:02d}00"
    return control_id, patient, adt(control_id, patient=patient, visit=f"V{patient}", evn=evn)


class Hospital(threading.Thread):
    """One PAS: sends in order, each message to the next instance in turn, resending until AA."""

    def __init__(self, number: int, ports: list[int], acked: list[str], lock: threading.Lock):
        super().__init__(daemon=True)
        self.number, self.ports, self.acked, self.lock = number, list(ports), acked, lock
        self.clients: dict[int, MllpClient] = {}
        self.errors = 0

    def run(self) -> None:
        pending = [message(self.number, i) for i in range(PER_HOSPITAL)]
        deadline = time.monotonic() + 120
        turn = self.number
        while pending and time.monotonic() < deadline and self.ports:
            control_id, _, data = pending[0]
            port = self.ports[turn % len(self.ports)]
            try:
                if port not in self.clients:
                    self.clients[port] = MllpClient("127.0.0.1", port, timeout=10)
                ack = ack_fields(self.clients[port].send(data))
            except OSError:  # that instance is gone: the balancer takes it out, the PAS resends
                self.errors += 1
                client = self.clients.pop(port, None)
                if client is not None:
                    client.close()
                self.ports.remove(port)
                continue
            if ack["MSA"][1] == "AA":
                with self.lock:
                    self.acked.append(control_id)
                pending.pop(0)
                turn += 1
        for client in self.clients.values():
            client.close()


def first_seen(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]


def test_two_instances_one_killed_lose_and_reorder_nothing(serve, httpserver: HTTPServer, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL one of two instances under load: all AA'd messages are applied once, in order per patient."""
    migrated = subprocess.run(
        [sys.executable, "-m", "adapter", "migrate"],
        env={**serve_env(), "HOMEWARD_STORE_URL": postgres_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0 and "schema version 1" in migrated.stdout, migrated.stderr
    council = Council(httpserver)
    env = {"HOMEWARD_FHIR_BASE_URL": council.url, "HOMEWARD_STORE_URL": postgres_url}
    doomed, survivor = serve(**env), serve(**env)
    acked: list[str] = []
    lock = threading.Lock()
    hospitals = [Hospital(n, [doomed.port, survivor.port], acked, lock) for n in range(HOSPITALS)]
    for h in hospitals:
        h.start()
    wait_until(lambda: len(acked) >= KILL_AFTER_ACKS, what="first acks")
    doomed.stop(signal.SIGKILL)
    for h in hospitals:
        h.join(150)

    assert len(set(acked)) == HOSPITALS * PER_HOSPITAL, "every message is eventually acknowledged"
    assert sum(h.errors for h in hospitals) >= 1, "a hospital saw the kill mid-stream"
    wait_until(lambda: set(acked) <= set(council.applied), timeout=90, what="every AA'd message applied")
    # Nothing reordered: per patient, the council first applies messages in the order they were acknowledged.
    for patient_hospital in range(HOSPITALS):
        for patient in range(patient_hospital * 10, patient_hospital * 10 + 5):
            sent = [message(patient_hospital, i)[0] for i in range(PER_HOSPITAL) if i % 5 == patient % 10]
            applied = [c for c in first_seen(council.applied) if c in set(sent)]
            assert applied == sent, f"patient {patient} applied out of order"
    # Nothing duplicated: one resource per conditional URL; only the dead instance's unrecorded sends went twice.
    assert council.creates and all(n == 1 for n in council.creates.values())
    assert len(council.posts) - len(set(council.posts)) <= MAX_RESENT
    with psycopg.connect(postgres_url) as conn:
        accepted = conn.execute("SELECT count(*) FROM inbound WHERE outcome = 'accepted'").fetchone()
        states = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
        records = conn.execute(
            "SELECT id, at, inbound_id, outbox_id, stage, detail, prev_hash, hash FROM audit ORDER BY id"
        ).fetchall()
        head = conn.execute("SELECT seq, hash, mac FROM audit_head").fetchone()
    assert accepted == (HOSPITALS * PER_HOSPITAL,), "each message stored once across both instances"
    assert states == {"delivered": HOSPITALS * PER_HOSPITAL}
    checked, problem = chain.verify((chain.ChainRecord(*r) for r in records), chain.Head(*head))
    assert problem is None and checked == len(records)


def serve_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")}
