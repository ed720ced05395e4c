"""The admin port of a real `homeward serve`: /metrics after traffic, parsed with prometheus-client's parser."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields, golden_message

A03 = golden_message("ADT_A03/basic.hl7")


def a03(control_id: str, nhs: str = "9449305552") -> bytes:
    return A03.replace(b"|MSG00001|", f"|{control_id}|".encode()).replace(b"9449305552", nhs.encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    status, text = get(f"http://127.0.0.1:{admin}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def quiet_serve(tmp_path: Path, httpserver: HTTPServer):  # type: ignore[no-untyped-def]
    """`homeward serve` at log level error (metrics must not depend on it), on ports chosen here."""
    posts: list[int] = []

    def council(request: Request) -> Response:
        posts.append(1)
        # Three accepted, then a permanent refusal: one dead letter.
        if len(posts) <= 3:
            return Response('{"resourceType":"Bundle","type":"transaction-response","entry":[]}', 200)
        return Response('{"resourceType":"OperationOutcome","issue":[{"code":"invalid"}]}', 422)

    httpserver.expect_request("/fhir", method="POST").respond_with_handler(council)
    mllp, admin = free_port(), free_port()
    env = {
        **os.environ,
        "HOMEWARD_MLLP_PORT": str(mllp),
        "HOMEWARD_ADMIN_PORT": str(admin),
        "HOMEWARD_STORE": str(tmp_path / "m.sqlite3"),
        "HOMEWARD_FHIR_BASE_URL": httpserver.url_for("/fhir"),
        "HOMEWARD_LOG_LEVEL": "error",
        "HOMEWARD_LOG_FORMAT": "json",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "adapter", "serve"], env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        wait_for(lambda: _up(admin) and proc.poll() is None)
        yield mllp, admin
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _up(admin: int) -> bool:
    try:
        return get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    except OSError:
        return False


def test_metrics_match_the_traffic(quiet_serve) -> None:  # type: ignore[no-untyped-def]
    """After 4 A03s (one dead-lettered by the server), 1 unparsable frame and 1 rejected type, counters say so."""
    mllp, admin = quiet_serve
    with MllpClient("127.0.0.1", mllp, timeout=20) as client:
        acks = [ack_fields(client.send(a03(f"M-{n}"))) for n in range(4)]
        acks.append(ack_fields(client.send(b"this is not HL7\r")))
        acks.append(ack_fields(client.send(a03("M-ORM").replace(b"ADT^A03^ADT_A03", b"ORM^O01^ORM_O01"))))
    assert [a["MSA"][1] for a in acks] == ["AA"] * 4 + ["AE", "AR"]

    def settled() -> dict | None:  # type: ignore[type-arg]
        m = scrape(admin)
        done = m.get(("homeward_messages_delivered_total", (("event", "ADT^A03"), ("target", "default"))), 0)
        dead = m.get(("homeward_messages_dead_lettered_total", (("event", "ADT^A03"), ("target", "default"))), 0)
        return m if done == 3 and dead == 1 else None

    m = wait_for(settled)
    a03_labels = (("event", "ADT^A03"),)
    assert m[("homeward_messages_received_total", a03_labels)] == 4
    assert m[("homeward_messages_received_total", (("event", "unknown"),))] == 1
    assert m[("homeward_messages_received_total", (("event", "ORM^O01"),))] == 1
    assert m[("homeward_messages_acked_total", (("code", "AA"), ("event", "ADT^A03")))] == 4
    assert m[("homeward_messages_acked_total", (("code", "AE"), ("event", "unknown")))] == 1
    assert m[("homeward_messages_acked_total", (("code", "AR"), ("event", "ORM^O01")))] == 1
    failure = (("event", "ADT^A03"), ("status", "422"), ("target", "default"))
    assert m[("homeward_delivery_failures_total", failure)] == 1
    assert m[("homeward_ack_latency_seconds_count", ())] == 6
    assert m[("homeward_delivery_latency_seconds_count", (("target", "default"),))] == 4
    assert m[("homeward_queue_depth", (("target", "default"),))] == 0
    assert m[("homeward_oldest_undelivered_age_seconds", (("target", "default"),))] == 0
    assert m[("homeward_dead_letters", (("target", "default"),))] == 1
    assert m[("homeward_last_message_received_timestamp_seconds", ())] > time.time() - 120


def test_health_endpoints(quiet_serve) -> None:  # type: ignore[no-untyped-def]
    """/healthz and /readyz answer 200 on a running adapter; other paths 404."""
    _, admin = quiet_serve
    assert get(f"http://127.0.0.1:{admin}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{admin}/readyz") == (200, "ready\n")
    assert get(f"http://127.0.0.1:{admin}/nope")[0] == 404


def test_no_admin_port_by_default(serve) -> None:  # type: ignore[no-untyped-def]
    """Without HOMEWARD_ADMIN_PORT nothing but MLLP listens."""
    process = serve()
    assert not [line for line in process.log_lines() if line.get("event") == "admin.listening"]


def test_readyz_names_what_is_wrong(tmp_path: Path) -> None:
    """/readyz is 503 naming the cause: listener not bound, then the store closed under it."""
    from adapter.app import App
    from adapter.config import Settings

    settings = Settings.load(
        None,
        environ={"HOMEWARD_STORE": str(tmp_path / "r.sqlite3"), "HOMEWARD_ADMIN_PORT": "0"},
    )
    app = App(settings)
    assert app.admin is not None
    app.admin.start()
    try:
        status, text = get(f"http://127.0.0.1:{app.admin.port}/readyz")
        assert status == 503
        assert text == "the MLLP listener is not bound\n"
        app.store.close()
        status, text = get(f"http://127.0.0.1:{app.admin.port}/readyz")
        assert status == 503
        assert "store not writable" in text
    finally:
        app.admin.stop()
        app.store.close()


def test_metrics_during_an_outage_and_after(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    """While the council answers 503, queue depth and the oldest undelivered age grow and failures are counted by
    status; once it recovers everything is delivered and the gauges fall back to 0."""
    from tests.council import Council
    from tests.integration.test_delivery import adt, send

    council = Council(httpserver)
    down = {"on": True}
    council.fail = lambda cid, attempt: (503, {}, None) if down["on"] else None
    admin = free_port()
    process = serve(
        HOMEWARD_FHIR_BASE_URL=council.url,
        HOMEWARD_ADMIN_PORT=str(admin),
        HOMEWARD_RETRY_INITIAL_SECONDS="0.05",
        HOMEWARD_RETRY_MAX_SECONDS="0.3",
    )
    messages = [adt(f"OUTM-{n}", patient=n, visit=f"VO{n}") for n in range(5)]
    assert send(process.port, *messages) == ["AA"] * 5
    labels = (("event", "ADT^A03"), ("target", "default"))

    def backlog() -> dict | None:  # type: ignore[type-arg]
        m = scrape(admin)
        failed = m.get(("homeward_delivery_failures_total", (*labels[:1], ("status", "503"), labels[1])), 0)
        oldest = m[("homeward_oldest_undelivered_age_seconds", (("target", "default"),))]
        return m if failed >= 10 and oldest >= 1.0 else None

    m = wait_for(backlog)
    assert m[("homeward_queue_depth", (("target", "default"),))] == 5
    assert m.get(("homeward_messages_delivered_total", labels), 0) == 0
    assert m.get(("homeward_messages_dead_lettered_total", labels), 0) == 0
    assert m[("homeward_messages_acked_total", (("code", "AA"), ("event", "ADT^A03")))] == 5
    # Every failed attempt was timed too.
    failures = m[("homeward_delivery_failures_total", (("event", "ADT^A03"), ("status", "503"), ("target", "default")))]
    assert m[("homeward_delivery_latency_seconds_count", (("target", "default"),))] >= failures

    down["on"] = False
    after = wait_for(lambda: (m := scrape(admin)).get(("homeward_messages_delivered_total", labels)) == 5 and m)
    assert sorted(council.applied) == sorted(f"OUTM-{n}" for n in range(5))
    assert after[("homeward_queue_depth", (("target", "default"),))] == 0
    assert after[("homeward_oldest_undelivered_age_seconds", (("target", "default"),))] == 0
    assert after[("homeward_dead_letters", (("target", "default"),))] == 0
    assert after[("homeward_delivery_latency_seconds_count", (("target", "default"),))] == len(council.posts)


def test_readyz_fails_while_the_store_cannot_commit(serve) -> None:  # type: ignore[no-untyped-def]
    """A running serve whose SQLite file another process holds locked answers /readyz 503, and 200 once released."""
    import sqlite3

    admin = free_port()
    process = serve(HOMEWARD_ADMIN_PORT=str(admin))
    wait_for(lambda: _up(admin))
    locker = sqlite3.connect(process.env["HOMEWARD_STORE"], isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        status, text = get(f"http://127.0.0.1:{admin}/readyz")
        assert status == 503 and text.startswith("store not writable")
        assert get(f"http://127.0.0.1:{admin}/healthz") == (200, "ok\n")  # alive, only not ready
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert get(f"http://127.0.0.1:{admin}/readyz") == (200, "ready\n")


def test_last_received_comes_from_the_store(serve) -> None:  # type: ignore[no-untyped-def]
    """Absent on an empty store (no false "quiet since 1970"); after a restart it is the newest stored frame's
    time before anything new arrives; with intake workers (other processes) it still moves."""
    import sqlite3

    from tests.integration.test_delivery import adt, send

    def last(admin: int) -> float | None:
        return scrape(admin).get(("homeward_last_message_received_timestamp_seconds", ()))

    admin = free_port()
    first = serve(HOMEWARD_ADMIN_PORT=str(admin))
    wait_for(lambda: _up(admin))
    assert last(admin) is None
    assert send(first.port, adt("LR-1")) == ["AA"]
    stored = sqlite3.connect(first.env["HOMEWARD_STORE"]).execute("SELECT max(received_at) FROM inbound").fetchone()[0]
    assert last(admin) == stored
    first.stop()

    admin = free_port()
    second = serve(HOMEWARD_ADMIN_PORT=str(admin), HOMEWARD_MLLP_WORKERS="1")
    wait_for(lambda: _up(admin))
    assert last(admin) == stored  # the restart did not reset it
    assert send(second.port, adt("LR-2", patient=2, visit="VLR2")) == ["AA"]  # taken by the worker process
    assert wait_for(lambda: (value := last(admin)) is not None and value > stored)
