"""The crash test: `homeward serve` SIGKILLed under load from several MLLP clients, then restarted.

Every message that got AA must reach the council, and the council must hold no duplicate resources.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from pytest_httpserver import HTTPServer

from adapter.forwarder import MAX_UNRECORDED
from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields
from tests.council import Council
from tests.integration.test_delivery import adt, wait_until

CLIENTS = 4
PER_CLIENT = 75  # 300 messages in all
KILL_AFTER_ACKS = 120
# Only sends in flight at the kill (fhir.max_in_flight, 4) and those whose outcomes were not yet committed
# (the forwarder records without holding its senders, up to MAX_UNRECORDED) can reach the server twice.
MAX_REPEATED = 4 + MAX_UNRECORDED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hospital(threading.Thread):
    """One PAS connection: sends its messages in order, resending a message until it gets AA."""

    def __init__(self, number: int, port: int, acked: set[str], lock: threading.Lock):
        super().__init__(daemon=True)
        self.number, self.port, self.acked, self.lock = number, port, acked, lock
        self.errors = 0

    def run(self) -> None:
        messages = [
            (
                f"K{self.number}-{i}",
                adt(f"K{self.number}-{i}", patient=self.number * 10 + i % 5, visit=f"V{self.number}{i % 5}"),
            )
            for i in range(PER_CLIENT)
        ]
        deadline = time.monotonic() + 120
        client: MllpClient | None = None
        while messages and time.monotonic() < deadline:
            control_id, message = messages[0]
            try:
                if client is None:
                    client = MllpClient("127.0.0.1", self.port, timeout=10)
                ack = ack_fields(client.send(message))
            except OSError:  # killed mid-stream: reconnect and resend, as a PAS does
                self.errors += 1
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.1)
                continue
            if ack["MSA"][1] == "AA":
                with self.lock:
                    self.acked.add(control_id)
                messages.pop(0)
        if client is not None:
            client.close()


def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    council = Council(httpserver)
    port = free_port()
    env = {"HOMEWARD_FHIR_BASE_URL": council.url, "HOMEWARD_MLLP_PORT": str(port)}
    first = serve(**env)
    acked: set[str] = set()
    lock = threading.Lock()
    hospitals = [Hospital(n, port, acked, lock) for n in range(CLIENTS)]
    for h in hospitals:
        h.start()
    wait_until(lambda: len(acked) >= KILL_AFTER_ACKS, what="first acks")
    first.stop(signal.SIGKILL)
    acked_before_kill = len(acked)
    second = serve(**env)  # same store file, same port
    for h in hospitals:
        h.join(150)
    assert len(acked) == CLIENTS * PER_CLIENT, "every message is eventually acknowledged"
    assert acked_before_kill < CLIENTS * PER_CLIENT, "the kill came mid-stream"
    assert sum(h.errors for h in hospitals) >= 1, "at least one client saw the kill"
    wait_until(lambda: acked <= set(council.applied), timeout=60, what="every AA'd message applied")
    second.wait_for_log("message.delivered")
    # Conditional updates: a message delivered again updates its resources, never creates a second copy.
    assert council.creates and all(n == 1 for n in council.creates.values())
    # Only a send in flight or not yet recorded at the kill can reach the server twice; resends after a lost
    # ACK never do.
    assert len(council.posts) - len(set(council.posts)) <= MAX_REPEATED
    assert set(council.posts) == acked
