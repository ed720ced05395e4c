"""Log lines from a real `homeward serve`: each message line carries its correlation fields and durations."""

from __future__ import annotations

from datetime import datetime

from pytest_httpserver import HTTPServer

from tests.council import Council, outcome
from tests.integration.test_delivery import FAST_RETRY, adt, send

INTAKE = ("peer",)
DELIVERY = ("outbox_id", "target", "attempt")
# Parsed, so MSH-9 is known; the intake lines before parsing (message.received) carry the rest.
TYPED = {"message.stored", "message.acked", "message.delivered", "message.retry_scheduled", "message.dead_lettered"}


def test_message_lines_carry_correlation_fields_and_durations(serve, httpserver: HTTPServer) -> None:  # type: ignore[no-untyped-def]
    """Every message.* line names MSH-10 and MSH-4 plus peer or outbox_id/target/attempt; ACK and delivery lines time themselves."""
    council = Council(httpserver)
    council.fail = lambda cid, attempt: (
        (422, {}, outcome("no"))
        if cid == "LF-DEAD"
        else (503, {}, None)
        if cid == "LF-RETRY" and attempt == 1
        else None
    )
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
    acks = send(
        process.port,
        adt("LF-RETRY", patient=1, visit="VLF1"),
        adt("LF-RETRY", patient=1, visit="VLF1"),
        adt("LF-DEAD", patient=2, visit="VLF2"),
        adt("LF-BAD", patient=3, visit="VLF3").replace(b"ADT^A03^ADT_A03", b"ORM^O01^ORM_O01"),
    )
    assert acks == ["AA", "AA", "AA", "AR"]
    process.wait_for_log("message.delivered")
    process.wait_for_log("message.dead_lettered")
    lines = [line for line in process.log_lines() if str(line.get("event", "")).startswith("message.")]
    seen = {line["event"] for line in lines}
    assert {"message.received", "message.stored", "message.duplicate", "message.refused", "message.acked"} <= seen
    assert {"message.retry_scheduled", "message.delivered", "message.dead_lettered"} <= seen
    for line in lines:
        assert line["message_control_id"].startswith("LF-") and line["sending_facility"] == "RRK", line
        assert all(k in line for k in INTAKE) or all(k in line for k in DELIVERY), line
        assert line["event"] not in TYPED or line["message_type"] in ("ADT^A03", "ORM^O01"), line
        assert line["level"] in ("info", "warning", "error")
        datetime.fromisoformat(line["timestamp"])  # ISO 8601, UTC
        assert line["timestamp"].endswith("Z")
    for line in lines:
        if line["event"] == "message.acked":
            assert line["duration_ms"] > 0 and line["ack_code"] in ("AA", "AR")
        if line["event"] == "message.delivered":
            assert line["duration_ms"] > 0 and line["age_ms"] >= line["duration_ms"]
