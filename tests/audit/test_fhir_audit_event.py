"""AuditEvents (IHE BALP shape) from a real `homeward serve` to an audit server (pytest-httpserver)."""

from __future__ import annotations

import json

from fhir.resources.R4B.auditevent import AuditEvent
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.mllp.client import MllpClient
from tests.audit.test_metrics import a03, wait_for
from tests.conftest import ack_fields


def test_audit_event_per_delivery_attempt(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    """A delivered message gives outcome 0 naming the server's versioned ids; a refused one outcome 8."""

    def council(request: Request) -> Response:
        if '"AE-DEAD"' in request.get_data(as_text=True):
            return Response('{"resourceType":"OperationOutcome","issue":[{"code":"invalid"}]}', 422)
        entry = [{"response": {"status": "200 OK", "location": "Patient/p1/_history/7"}}]
        return Response(json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entry}), 200)

    httpserver.expect_request("/fhir", method="POST").respond_with_handler(council)
    httpserver.expect_request("/audit/AuditEvent", method="POST").respond_with_data("", status=201)
    process = serve(
        HOMEWARD_FHIR_BASE_URL=httpserver.url_for("/fhir"),
        HOMEWARD_AUDIT_FHIR_URL=httpserver.url_for("/audit"),
    )
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        assert ack_fields(client.send(a03("AE-OK")))["MSA"][1] == "AA"
        assert ack_fields(client.send(a03("AE-DEAD", nhs="9449305560")))["MSA"][1] == "AA"

    def events() -> list[dict]:  # type: ignore[type-arg]
        found = [json.loads(r.get_data()) for r, _ in httpserver.log if r.path == "/audit/AuditEvent"]
        return found if len(found) == 2 else []

    by_message = {e["entity"][0]["what"]["identifier"]["value"]: e for e in wait_for(events)}
    for event in by_message.values():
        AuditEvent.model_validate(event)  # a valid R4 AuditEvent
        assert event["type"]["code"] == "rest" and event["subtype"][0]["code"] == "transaction"
        assert [a["requestor"] for a in event["agent"]] == [True, False]
        assert event["agent"][1]["network"]["address"] == httpserver.url_for("/fhir")
        assert "9449305552" not in json.dumps(event) and "SMITH" not in json.dumps(event)
    delivered, dead = by_message["AE-OK"], by_message["AE-DEAD"]
    assert delivered["outcome"] == "0"
    patient = [e for e in delivered["entity"] if e.get("role", {}).get("code") == "1"]
    assert patient[0]["what"]["reference"] == "Patient/p1/_history/7"
    assert dead["outcome"] == "8" and "HTTP 422" in dead["entity"][0]["description"]
