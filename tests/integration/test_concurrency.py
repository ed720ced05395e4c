"""Different patients deliver concurrently, up to fhir.max_in_flight; one patient's stuck delivery holds only that patient."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.council import control_id_of
from tests.integration.test_delivery import adt, send, wait_until

MAX_IN_FLIGHT = 3


class SlowCouncil:
    """A threaded server (requests really overlap) that holds SLOW-* requests until released; counts overlap."""

    def __init__(self, server: HTTPServer):
        self.url = server.url_for("/fhir")
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.posted: list[str] = []
        self.applied: list[str] = []
        server.expect_request("/fhir", method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        control_id = control_id_of(json.loads(request.get_data()))
        with self.lock:
            self.posted.append(control_id)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            # The slow patient's request, and enough fast ones to fill every slot, wait for the release.
            if control_id.startswith(("SLOW", "HOLD")):
                self.gate.wait(30)
            with self.lock:
                self.applied.append(control_id)
        finally:
            with self.lock:
                self.in_flight -= 1
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
        return Response(json.dumps(body), 200, content_type="application/fhir+json")


@pytest.fixture
def threaded_server() -> Iterator[HTTPServer]:
    server = HTTPServer(threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


def test_patients_deliver_concurrently_up_to_the_cap(serve, threaded_server: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    council = SlowCouncil(threaded_server)
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url, HOMEWARD_FHIR_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT))
    try:
        # Patient 1's first message hangs at the server; its second must wait behind it.
        assert send(process.port, adt("SLOW-1", patient=1, visit="VS1", evn="20261124100000")) == ["AA"]
        wait_until(lambda: council.posted == ["SLOW-1"], what="SLOW-1 in flight")
        assert send(process.port, adt("SLOW-2", patient=1, visit="VS1", evn="20261124110000")) == ["AA"]
        others = [adt(f"FAST-{n}", patient=n, visit=f"VF{n}") for n in range(2, 8)]
        assert send(process.port, *others) == ["AA"] * 6
        # Other patients go past the stuck one.
        wait_until(lambda: len(council.applied) == 6, what="the other patients delivered")
        assert sorted(council.applied) == sorted(f"FAST-{n}" for n in range(2, 8))
        assert "SLOW-2" not in council.posted  # never overtakes SLOW-1
        assert council.most_in_flight >= 2  # they really overlapped with SLOW-1

        # Fill every slot: SLOW-1 and two HOLD patients hang; the next patient waits for a free slot.
        holds = [adt(f"HOLD-{n}", patient=10 + n, visit=f"VH{n}") for n in range(MAX_IN_FLIGHT + 2)]
        assert send(process.port, *holds) == ["AA"] * len(holds)
        wait_until(lambda: council.in_flight == MAX_IN_FLIGHT, what="every slot busy")
        with council.lock:
            posted_holds = [c for c in council.posted if c.startswith("HOLD")]
        assert len(posted_holds) == MAX_IN_FLIGHT - 1  # the cap holds: SLOW-1 uses the third slot
    finally:
        council.gate.set()
    wait_until(lambda: len(council.applied) == 8 + MAX_IN_FLIGHT + 2, what="everything delivered after release")
    slow = [c for c in council.applied if c.startswith("SLOW")]
    assert slow == ["SLOW-1", "SLOW-2"]
    assert council.most_in_flight == MAX_IN_FLIGHT
