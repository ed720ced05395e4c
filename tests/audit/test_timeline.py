"""Whole timelines from a real `homeward serve` (MLLP in, a real HTTP server out), read back with `homeward audit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.cli import main
from tests.audit.test_metrics import a03, wait_for
from tests.conftest import ack_fields

KEY = "timeline test audit key 0123456789"
NHS = {"T-OK": "9449305552", "T-RETRY": "9449305560", "T-DEAD": "9449305579"}


def transaction_response(control_id: str) -> str:
    # What a server returns: where each entry landed, with its version.
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "200 OK", "location": f"Patient/{control_id}/_history/3"}}],
        }
    )


@pytest.fixture
def council(httpserver: HTTPServer) -> HTTPServer:
    """T-OK: accepted; T-RETRY: 503 once, then accepted; T-DEAD: 422 (permanent)."""
    seen: list[str] = []

    def handle(request: Request) -> Response:
        body = request.get_data(as_text=True)
        control_id = next(c for c in NHS if f'"{c}"' in body)
        seen.append(control_id)
        if control_id == "T-DEAD":
            outcome = {"resourceType": "OperationOutcome", "issue": [{"code": "invalid", "diagnostics": "no"}]}
            return Response(json.dumps(outcome), 422, content_type="application/fhir+json")
        if control_id == "T-RETRY" and seen.count("T-RETRY") == 1:
            return Response("busy", 503)
        return Response(transaction_response(control_id), 200, content_type="application/fhir+json")

    httpserver.expect_request("/fhir", method="POST").respond_with_handler(handle)
    return httpserver


def audit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object]:
    code = main(["audit", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def stages(capsys: pytest.CaptureFixture[str], control_id: str) -> list[dict]:  # type: ignore[type-arg]
    code, records = audit(capsys, "show", control_id)
    assert code == 0
    return records  # type: ignore[return-value]


def test_timelines(  # type: ignore[no-untyped-def]
    serve, council: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Delivered, retried, dead-lettered and replayed messages each show every stage, in order, with details."""
    store = tmp_path / "homeward.sqlite3"
    process = serve(
        HOMEWARD_FHIR_BASE_URL=council.url_for("/fhir"),
        HOMEWARD_AUDIT_HMAC_KEY=KEY,
        HOMEWARD_RETRY_INITIAL_SECONDS="0.2",
        HOMEWARD_RETRY_MAX_SECONDS="0.5",
    )
    from adapter.mllp.client import MllpClient

    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        for control_id, nhs in NHS.items():
            assert ack_fields(client.send(a03(control_id, nhs)))["MSA"][1] == "AA"
    process.wait_for_log("message.delivered", count=2)
    process.wait_for_log("message.dead_lettered")
    monkeypatch.setenv("HOMEWARD_STORE", str(store))
    monkeypatch.setenv("HOMEWARD_AUDIT_HMAC_KEY", KEY)

    ok = stages(capsys, "T-OK")
    assert [r["stage"] for r in ok] == ["received", "queued", "accepted", "delivered"]
    received = ok[0]["detail"]
    assert received["message_control_id"] == "T-OK" and received["sending_facility"] == "RRK"
    assert received["event"] == "ADT^A03" and received["size"] > 100 and len(received["sha256"]) == 64
    assert received["peer"].startswith("127.0.0.1:")
    assert ok[1]["detail"]["target"] == "default"
    accepted = ok[2]["detail"]
    assert accepted["ack_code"] == "AA"
    # The Patient's fullUrl is derived from the NHS number, so only its type is recorded.
    assert "Patient" in accepted["entries"]
    assert any(e.startswith("Encounter urn:uuid:") for e in accepted["entries"])
    delivered = ok[3]["detail"]
    assert delivered["status"] == 200 and delivered["duration_ms"] > 0
    assert delivered["response"] == ["Patient/T-OK/_history/3"]

    retry = wait_for(lambda: (s := stages(capsys, "T-RETRY")) and s[-1]["stage"] == "delivered" and s)
    assert [r["stage"] for r in retry] == ["received", "queued", "accepted", "retry_scheduled", "delivered"]
    assert retry[3]["detail"]["status"] == 503 and retry[3]["detail"]["attempt"] == 1
    assert retry[3]["detail"]["retry_in_seconds"] > 0

    dead = stages(capsys, "T-DEAD")
    assert [r["stage"] for r in dead] == ["received", "queued", "accepted", "dead_lettered"]
    assert dead[3]["detail"]["status"] == 422 and "permanent" in dead[3]["detail"]["reason"]

    # Replayed (issue 4's command, beside the running server): the new delivery joins the same timeline.
    assert main(["replay", "--control-id", "T-OK", "--by", "auditor", "--reason", "council restored a backup"]) == 0
    capsys.readouterr()
    replayed = wait_for(lambda: (s := stages(capsys, "T-OK")) and s[-1]["stage"] == "delivered" and len(s) == 6 and s)
    assert [r["stage"] for r in replayed] == ["received", "queued", "accepted", "delivered", "replayed", "delivered"]
    assert replayed[4]["detail"] == {
        "actor": "auditor",
        "why": "council restored a backup",
        "replay_of": ok[3]["outbox_id"],
    }
    assert replayed[5]["outbox_id"] == replayed[4]["outbox_id"] != ok[3]["outbox_id"]

    # Queries over the same store.
    code, rows = audit(capsys, "list", "--status", "dead")
    assert code == 0 and [r["message_control_id"] for r in rows] == ["T-DEAD"]  # type: ignore[index]
    code, rows = audit(capsys, "list", "--event", "ADT^A03", "--target", "default", "--since", "1h")
    assert sorted(r["message_control_id"] for r in rows) == sorted(NHS)  # type: ignore[union-attr]
    code, rows = audit(capsys, "list", "--until", "2000-01-01T00:00:00+00:00")
    assert rows == []
    code, rows = audit(capsys, "find", "--nhs-number", "944 930 5560")
    assert [r["message_control_id"] for r in rows] == ["T-RETRY"]  # type: ignore[index]
    code, result = audit(capsys, "verify")
    assert code == 0 and result["ok"] and result["signature_checked"]  # type: ignore[index]


def test_show_unknown_control_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MSH-10 with no records exits 1 and says so."""
    from adapter.store.sqlite import SqliteStore

    SqliteStore(tmp_path / "e.sqlite3").close()
    monkeypatch.setenv("HOMEWARD_STORE", str(tmp_path / "e.sqlite3"))
    assert main(["audit", "show", "NOPE"]) == 1


def test_find_needs_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an audit key, find refuses with a configuration error instead of matching nothing."""
    from adapter.store.sqlite import SqliteStore

    SqliteStore(tmp_path / "e.sqlite3").close()
    monkeypatch.setenv("HOMEWARD_STORE", str(tmp_path / "e.sqlite3"))
    monkeypatch.delenv("HOMEWARD_AUDIT_HMAC_KEY", raising=False)
    assert main(["audit", "find", "--nhs-number", "9449305552"]) == 2


def test_verify_beside_a_busy_server(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """`audit verify` run while messages flow reads one snapshot: no false alarm from records landing mid-walk."""
    import threading

    from adapter.mllp.client import MllpClient

    process = serve()
    monkeypatch.setenv("HOMEWARD_STORE", str(tmp_path / "homeward.sqlite3"))
    done = threading.Event()

    def traffic() -> None:
        with MllpClient("127.0.0.1", process.port, timeout=20) as client:
            for n in range(150):
                client.send(a03(f"BUSY-{n}"))
        done.set()

    sender = threading.Thread(target=traffic)
    sender.start()
    runs = 0
    while not done.is_set() or runs < 3:
        assert main(["audit", "verify"]) == 0
        runs += 1
    sender.join()
    assert runs >= 3


def test_timelines_of_the_other_outcomes(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    """A resend, a filtered and a refused frame, a stale event, and dead letters discarded or retried by a person."""
    from tests.council import Council, outcome
    from tests.integration.test_delivery import FAST_RETRY, adt, homeward_json, send, wait_until

    council = Council(httpserver)
    refusing = {"TL-DISCARD", "TL-FIXED"}
    council.fail = lambda cid, attempt: (422, {}, outcome("no")) if cid in refusing else None
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
    acks = send(
        process.port,
        adt("TL-DUP", patient=1, visit="VTL1"),
        adt("TL-FILTER", event="A05", patient=2, visit="VTL2"),
        adt("TL-REFUSED", patient=3, visit="VTL3").replace(b"ADT^A03^ADT_A03", b"ORM^O01^ORM_O01"),
        adt("TL-NEW", patient=4, visit="VTL4", evn="20261124120000"),
        adt("TL-OLD", patient=4, visit="VTL4", evn="20261124090000"),
        adt("TL-DISCARD", patient=5, visit="VTL5"),
        adt("TL-FIXED", patient=6, visit="VTL6"),
    )
    assert acks == ["AA", "AA", "AR", "AA", "AA", "AA", "AA"]

    def show(control_id: str) -> list[dict]:  # type: ignore[type-arg]
        return homeward_json(process, "audit", "show", control_id)  # type: ignore[no-any-return]

    wait_for(lambda: show("TL-DUP")[-1]["stage"] == "delivered")
    assert send(process.port, adt("TL-DUP", patient=1, visit="VTL1")) == ["AA"]  # the hospital resends it
    process.wait_for_log("message.dead_lettered", count=2)
    process.wait_for_log("message.stale")

    dup = show("TL-DUP")
    assert [r["stage"] for r in dup] == ["received", "queued", "accepted", "delivered", "received", "duplicate"]
    assert dup[4]["inbound_id"] != dup[0]["inbound_id"] and dup[4]["detail"]["size"] == dup[0]["detail"]["size"]
    assert dup[5]["detail"] == {"ack_code": "AA", "original_inbound_id": dup[0]["inbound_id"]}
    assert [r["stage"] for r in show("TL-FILTER")] == ["received", "filtered"]
    assert show("TL-FILTER")[1]["detail"]["ack_code"] == "AA"
    refused = show("TL-REFUSED")
    assert [r["stage"] for r in refused] == ["received", "refused"]
    assert refused[1]["detail"]["ack_code"] == "AR" and refused[1]["detail"]["reason"].startswith("200")
    stale = show("TL-OLD")
    assert [r["stage"] for r in stale] == ["received", "queued", "accepted", "stale"]
    assert stale[3]["detail"]["target"] == "default" and "older than" in stale[3]["detail"]["reason"]

    by_id = {r["message_control_id"]: r["id"] for r in homeward_json(process, "dead-letters", "list")}
    discard = ["dead-letters", "discard", str(by_id["TL-DISCARD"]), "--by", "on-call", "--reason", "test patient"]
    assert homeward_json(process, *discard)["discarded"] == [by_id["TL-DISCARD"]]
    discarded = show("TL-DISCARD")
    assert [r["stage"] for r in discarded][-2:] == ["dead_lettered", "dead_letter_discarded"]
    assert discarded[-1]["detail"] == {"actor": "on-call", "why": "test patient"}

    refusing.discard("TL-FIXED")
    homeward_json(process, "dead-letters", "retry", str(by_id["TL-FIXED"]), "--by", "on-call", "--reason", "fixed")
    wait_until(lambda: "TL-FIXED" in council.applied, what="retried dead letter delivered")
    fixed = wait_for(lambda: (s := show("TL-FIXED")) and s[-1]["stage"] == "delivered" and s)
    assert [r["stage"] for r in fixed] == [
        "received", "queued", "accepted", "dead_lettered", "dead_letter_retried", "delivered",
    ]  # fmt: skip
    assert fixed[4]["detail"] == {"actor": "on-call", "why": "fixed"}
    assert fixed[5]["outbox_id"] == fixed[3]["outbox_id"]  # the same delivery, retried


def test_bulk_actions_audit_every_message(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    """`dead-letters retry --all` and `replay --since` write one record per message they touch, with who and why."""
    from tests.council import Council, outcome
    from tests.integration.test_delivery import FAST_RETRY, adt, homeward, homeward_json, send, wait_until

    council = Council(httpserver)
    refusing = {"BULK-1", "BULK-2"}
    council.fail = lambda cid, attempt: (422, {}, outcome("no")) if cid in refusing else None
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
    assert send(process.port, *(adt(f"BULK-{n}", patient=n, visit=f"VB{n}") for n in (1, 2, 3))) == ["AA"] * 3
    process.wait_for_log("message.dead_lettered", count=2)
    wait_until(lambda: council.applied == ["BULK-3"], what="BULK-3 delivered")

    def show(control_id: str) -> list[dict]:  # type: ignore[type-arg]
        return homeward_json(process, "audit", "show", control_id)  # type: ignore[no-any-return]

    refusing.clear()
    retried = homeward_json(process, "dead-letters", "retry", "--all", "--by", "on-call", "--reason", "fixed")
    assert len(retried["retried"]) == 2 and retried["not_dead_letters"] == []
    wait_until(lambda: sorted(council.applied) == ["BULK-1", "BULK-2", "BULK-3"], what="retried ones delivered")
    for control_id in ("BULK-1", "BULK-2"):
        trail = wait_for(lambda c=control_id: (s := show(c)) and s[-1]["stage"] == "delivered" and s)
        (action,) = [r for r in trail if r["stage"] == "dead_letter_retried"]
        assert action["detail"] == {"actor": "on-call", "why": "fixed"}

    replayed = homeward_json(process, "replay", "--since", "2000-01-01", "--by", "dpo", "--reason", "restore")
    assert len(replayed["queued"]) == 3
    wait_until(lambda: len(council.applied) == 6, what="replay drained")
    for control_id in ("BULK-1", "BULK-2", "BULK-3"):
        trail = wait_for(lambda c=control_id: (s := show(c)) and s[-1]["stage"] == "delivered" and s[-2:])
        assert trail[0]["stage"] == "replayed" and trail[0]["outbox_id"] in replayed["queued"]
        assert {k: trail[0]["detail"][k] for k in ("actor", "why")} == {"actor": "dpo", "why": "restore"}
    verified = homeward(process, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
