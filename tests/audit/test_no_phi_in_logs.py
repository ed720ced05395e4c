"""No patient data in any log line: a full flow through `homeward serve` at debug level, faults included."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.mapping.functions import deterministic_id
from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields, golden_message

A03 = golden_message("ADT_A03/basic.hl7")

# Distinctive values, each searched for in every form a careless line might print it.
NAME = ("ZEBEDEE", "QUIXOTIC-FANSHAWE", "Zebedee", "Quixotic")
NHS_NUMBER = ("9449305609", "944 930 5609", "944-930-5609")
BIRTH_DATE = ("19270418", "1927-04-18", "18/04/1927")
BAD_BIRTH_DATE = ("19270431", "1927-04-31")  # not a date: the refused message's value
ADDRESS = ("XYLOPHONE", "Xylophone", "WHITBY-ON-MARSH", "YO99 9ZZ", "YO999ZZ")
PHONE = ("07700 900461", "07700900461")
FORBIDDEN = NAME + NHS_NUMBER + BIRTH_DATE + BAD_BIRTH_DATE + ADDRESS + PHONE

PID = (
    b"PID|1||9449305609^^^NHS^NH~RRK777^^^RRK^MR||QUIXOTIC-FANSHAWE^ZEBEDEE^^^MR||19270418|M|||"
    b"77 XYLOPHONE CRESCENT^^WHITBY-ON-MARSH^^YO99 9ZZ^GBR||07700 900461"
)

# An internal bug (a fault no real part can produce on demand), whose message quotes patient data:
# loaded into the serve process through sitecustomize, only for MSH-10 PHI-BUG.
SITECUSTOMIZE = """
import adapter.intake as intake

_real = intake.map_message

def _buggy(message, *args, **kwargs):
    if message.message_control_id == "PHI-BUG":
        raise ValueError("cannot map QUIXOTIC-FANSHAWE ZEBEDEE 9449305609 born 19270418 at 77 XYLOPHONE CRESCENT")
    return _real(message, *args, **kwargs)

intake.map_message = _buggy
"""


def message(control_id: str, pid: bytes = PID) -> bytes:
    lines = A03.split(b"\r")
    lines = [pid if line.startswith(b"PID|") else line for line in lines]
    return b"\r".join(lines).replace(b"|MSG00001|", f"|{control_id}|".encode())


def echo_patient(request: Request) -> str:
    """What a careless server does: quote the resource it refuses."""
    bundle = json.loads(request.get_data())
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    return f"Patient {json.dumps(patient)} refused"


def test_no_patient_data_in_logs(serve, httpserver: HTTPServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Accepted (retried, then delivered), dead-lettered, refused and crashing messages leave no PHI in the log."""
    calls: list[str] = []

    def council(request: Request) -> Response:
        body = request.get_data(as_text=True)
        calls.append(body)
        diagnostics = echo_patient(request)
        outcome = json.dumps(
            {"resourceType": "OperationOutcome", "issue": [{"code": "invalid", "diagnostics": diagnostics}]}
        )
        if '"PHI-DEAD"' in body:
            return Response(outcome, 422, content_type="application/fhir+json")
        if len(calls) == 1:
            return Response(outcome, 503, content_type="application/fhir+json")
        return Response('{"resourceType":"Bundle","type":"transaction-response","entry":[]}', 200)

    httpserver.expect_request("/fhir", method="POST").respond_with_handler(council)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    process = serve(
        HOMEWARD_FHIR_BASE_URL=httpserver.url_for("/fhir"),
        HOMEWARD_LOG_LEVEL="debug",
        HOMEWARD_RETRY_INITIAL_SECONDS="0.2",
        HOMEWARD_RETRY_MAX_SECONDS="0.5",
        PYTHONPATH=str(site),
    )
    bad_pid = PID.replace(b"19270418", b"19270431")
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        codes = {
            "PHI-OK": ack_fields(client.send(message("PHI-OK")))["MSA"][1],
            "PHI-DEAD": ack_fields(client.send(message("PHI-DEAD")))["MSA"][1],
            "PHI-BAD": ack_fields(client.send(message("PHI-BAD", bad_pid)))["MSA"][1],
            "PHI-BUG": ack_fields(client.send(message("PHI-BUG")))["MSA"][1],
        }
    assert codes == {"PHI-OK": "AA", "PHI-DEAD": "AA", "PHI-BAD": "AE", "PHI-BUG": "AE"}
    process.wait_for_log("message.retry_scheduled")
    process.wait_for_log("message.delivered")
    process.wait_for_log("message.dead_lettered")
    process.wait_for_log("message.internal_error")
    assert process.stop() == 0

    text = process.log_path.read_text(encoding="utf-8", errors="replace")
    # The flow really produced the lines under test (a traceback included), so their absence of PHI means something.
    events = [line.get("event") for line in process.log_lines()]
    for event in ("message.received", "message.refused", "message.acked", "message.internal_error"):
        assert event in events
    assert any("exception" in line for line in process.log_lines())
    leaks = sorted({value for value in FORBIDDEN if value in text})
    assert not leaks, f"patient data in the log: {leaks}\n{text[-3000:]}"

    # The audit records outlive the retention purge and cannot be edited: they must not hold PHI either
    # (the server's OperationOutcome quoting the patient is kept there only as a hash).
    conn = sqlite3.connect(tmp_path / "homeward.sqlite3")
    audit_text = "\n".join(row[0] for row in conn.execute("SELECT stage || ' ' || detail FROM audit"))
    conn.close()
    assert "dead_lettered" in audit_text and "outcome_sha256" in audit_text
    # The last audit.checkpoint line (at shutdown) names the chain's real head: a witness outside the store.
    last = [line for line in process.log_lines() if line.get("event") == "audit.checkpoint"][-1]
    conn = sqlite3.connect(tmp_path / "homeward.sqlite3")
    assert (last["seq"], last["hash"]) == conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    conn.close()
    # Nor a stand-in that can be brute-forced back to the NHS number (the Patient's uuid5 fullUrl).
    derived = deterministic_id("Patient", "https://fhir.nhs.uk/Id/nhs-number", "9449305609")
    leaks = sorted({value for value in (*FORBIDDEN, derived) if value in audit_text or value in text})
    assert not leaks, f"patient data in the audit records: {leaks}"
