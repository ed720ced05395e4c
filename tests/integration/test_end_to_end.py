"""`homeward serve` as a subprocess: MLLP in over a real socket, FHIR out to a real HTTP server, SQLite on disk."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pytest_httpserver import HTTPServer

from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields, golden_message

A03 = golden_message("ADT_A03/basic.hl7")
TRANSACTION_RESPONSE = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


def a03(control_id: str) -> bytes:
    return A03.replace(b"|MSG00001|", f"|{control_id}|".encode())


def send(port: int, *messages: bytes) -> list[dict[str, list[str]]]:
    with MllpClient("127.0.0.1", port, timeout=20) as client:
        return [ack_fields(client.send(m)) for m in messages]


def wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def fhir_posts(httpserver: HTTPServer) -> list[bytes]:
    return [req.get_data() for req, _ in httpserver.log if req.method == "POST"]


@pytest.fixture
def fhir(httpserver: HTTPServer) -> HTTPServer:
    httpserver.expect_request("/fhir", method="POST").respond_with_json(TRANSACTION_RESPONSE, status=200)
    return httpserver


class TestEndToEnd:
    def test_a03_arrives_as_valid_transaction(self, serve, fhir: HTTPServer) -> None:  # type: ignore[no-untyped-def]
        """An A03 is acknowledged AA and POSTed to the base URL as a valid R4 transaction with the five resources."""
        process = serve(HOMEWARD_FHIR_BASE_URL=fhir.url_for("/fhir"))
        (ack,) = send(process.port, a03("E2E-1"))
        assert ack["MSA"][1:3] == ["AA", "E2E-1"]
        wait_until(lambda: len(fhir_posts(fhir)) == 1)
        request, _ = fhir.log[0]
        assert request.headers["Content-Type"] == "application/fhir+json"
        bundle = json.loads(request.get_data())
        Bundle.model_validate(bundle)
        assert bundle["type"] == "transaction"
        types = {e["resource"]["resourceType"] for e in bundle["entry"]}
        assert {"Patient", "Encounter", "Organization", "ServiceRequest", "CarePlan"} <= types
        for entry in bundle["entry"]:
            assert entry["request"]["method"] == "PUT"
            if entry["resource"]["resourceType"] != "Provenance":
                assert "?identifier=" in entry["request"]["url"]
        process.wait_for_log("message.delivered")

    def test_same_message_gives_identical_requests(self, serve, fhir: HTTPServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """The same message through two fresh adapters produces byte-identical requests (resend-safe)."""
        first = serve(HOMEWARD_FHIR_BASE_URL=fhir.url_for("/fhir"), HOMEWARD_STORE=str(tmp_path / "a.sqlite3"))
        send(first.port, a03("SAME-1"))
        wait_until(lambda: len(fhir_posts(fhir)) == 1)
        first.stop()
        second = serve(HOMEWARD_FHIR_BASE_URL=fhir.url_for("/fhir"), HOMEWARD_STORE=str(tmp_path / "b.sqlite3"))
        send(second.port, a03("SAME-1"))
        wait_until(lambda: len(fhir_posts(fhir)) == 2)
        posts = fhir_posts(fhir)
        assert posts[0] == posts[1]

    def test_resend_is_delivered_once(self, serve, fhir: HTTPServer) -> None:  # type: ignore[no-untyped-def]
        """A resend with the same MSH-10 gets AA again but reaches the server only once."""
        process = serve(HOMEWARD_FHIR_BASE_URL=fhir.url_for("/fhir"))
        acks = send(process.port, a03("DUP-1"), a03("DUP-1"))
        assert [a["MSA"][1] for a in acks] == ["AA", "AA"]
        process.wait_for_log("message.delivered")
        time.sleep(1.5)  # give a wrong second delivery the chance to happen
        assert len(fhir_posts(fhir)) == 1

    def test_directory_target_writes_whole_files(self, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """With no FHIR URL, each message becomes one complete JSON file; no reader ever sees a partial file."""
        outbox = tmp_path / "drop"
        process = serve(HOMEWARD_OUTBOX_DIR=str(outbox))
        seen_bad: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for path in outbox.glob("*.json") if outbox.exists() else []:
                    try:
                        json.loads(path.read_bytes())
                    except (json.JSONDecodeError, FileNotFoundError) as exc:
                        seen_bad.append(f"{path.name}: {type(exc).__name__}")

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            send(process.port, *[a03(f"DIR-{n}") for n in range(30)])
            wait_until(lambda: len(list(outbox.glob("*.json"))) == 30)
        finally:
            stop.set()
            watcher.join()
        assert not seen_bad
        assert not list(outbox.glob(".*"))  # no temp files left behind
        names = sorted(p.name for p in outbox.glob("*.json"))
        assert all(n.startswith("RRK_DIR-") for n in names)
        for path in outbox.glob("*.json"):
            assert json.loads(path.read_bytes())["type"] == "transaction"

    def test_sigkill_after_aa_loses_nothing(self, serve, fhir: HTTPServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """Messages acknowledged AA while the council is unreachable survive SIGKILL and are delivered on restart."""
        with socket.socket() as sock:  # a port with nothing listening: every delivery fails to connect
            sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
        env = {
            "HOMEWARD_STORE": str(tmp_path / "kill.sqlite3"),
            "HOMEWARD_RETRY_INITIAL_SECONDS": "0.2",
            "HOMEWARD_RETRY_MAX_SECONDS": "0.5",
        }
        first = serve(HOMEWARD_FHIR_BASE_URL=f"http://127.0.0.1:{dead_port}/fhir", **env)
        acks = send(first.port, *[a03(f"KILL-{n}") for n in range(5)])
        assert all(a["MSA"][1] == "AA" for a in acks)
        first.wait_for_log("message.retry_scheduled")
        first.stop(signal.SIGKILL)
        assert fhir_posts(fhir) == []
        second = serve(HOMEWARD_FHIR_BASE_URL=fhir.url_for("/fhir"), **env)
        second.wait_for_log("message.delivered", count=5)
        delivered = sorted(
            next(
                e["resource"]["entity"][0]["what"]["identifier"]["value"]
                for e in json.loads(body)["entry"]
                if e["resource"]["resourceType"] == "Provenance"
            )
            for body in fhir_posts(fhir)
        )
        assert delivered == [f"KILL-{n}" for n in range(5)]

    def test_graceful_shutdown_on_sigterm(self, serve) -> None:  # type: ignore[no-untyped-def]
        """SIGTERM stops the listener and the process exits 0 after logging homeward.stopped."""
        process = serve()
        send(process.port, a03("TERM-1"))
        assert process.stop(signal.SIGTERM) == 0
        assert any(line.get("event") == "homeward.stopped" for line in process.log_lines())
