"""A visit's events through `homeward serve` over MLLP into the council stand-in: one set of resources moved on."""

from __future__ import annotations

from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from adapter.conformance.validator import Validator
from adapter.mllp.client import MllpClient
from tests.conftest import ROOT, ack_fields, golden_message
from tests.council import Council
from tests.integration.test_delivery import wait_until

REFERRAL = "ServiceRequest|https://homeward.example.org/fhir/Id/RRK/discharge-referral|V0009001"


@pytest.fixture
def council(httpserver: HTTPServer) -> Council:
    return Council(httpserver)


def a08_of_the_cycle(expected: str) -> bytes:
    """The A08 the PAS sends between the A16 and the A03 of the cycle visit: every segment, PV2-9 moved."""
    lines = []
    for line in golden_message("ADT_A16/cycle.hl7").decode().split("\r"):
        fields = line.split("|")
        if fields[0] == "MSH":
            fields[8], fields[9] = "ADT^A08^ADT_A01", "CYCLE-A08"
        elif fields[0] == "EVN":
            fields[1:3] = ["A08", "20261122090000"]  # after the A16, before the A03
        elif fields[0] == "PV2":
            fields[9] = expected
        lines.append("|".join(fields))
    return "\r".join(lines).encode()


def current(council: Council, resource_type: str) -> list[dict[str, Any]]:
    return [r for key, r in council.resources.items() if key.startswith(f"{resource_type}/")]


def only(council: Council, resource_type: str) -> dict[str, Any]:
    (resource,) = current(council, resource_type)
    return resource


def test_pending_update_discharge_cancel_move_one_set_of_resources(serve, council: Council) -> None:  # type: ignore[no-untyped-def]
    """A16 -> A08 -> A03 -> A13 of one visit leave one Patient, Encounter, referral, CarePlan and carer at the council, each created once."""
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url)
    messages = [
        ("CYCLE-1", golden_message("ADT_A16/cycle.hl7")),
        ("CYCLE-A08", a08_of_the_cycle("20261123")),
        ("CYCLE-2", golden_message("ADT_A03/cycle.hl7")),
        ("CYCLE-3", golden_message("ADT_A13/cycle.hl7")),
    ]
    seen: list[dict[str, Any]] = []
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        for control_id, message in messages:
            assert ack_fields(client.send(message))["MSA"][1:3] == ["AA", control_id]
            wait_until(lambda c=control_id: c in council.applied, what=f"{control_id} applied")  # type: ignore[misc]
            seen.append(
                {
                    rtype: {k: v for k, v in only(council, rtype).items() if k in ("status", "period", "extension")}
                    | {"occurrence": only(council, rtype).get("occurrenceDateTime")}
                    for rtype in ("Encounter", "ServiceRequest")
                }
                | {"CarePlan": [p["status"] for p in current(council, "CarePlan")]}
            )
    assert council.applied == [c for c, _ in messages]
    # One resource per identifier, however many messages wrote it (a second create would be a parallel copy).
    assert council.creates and set(council.creates.values()) == {1}, council.creates
    for rtype in ("Patient", "Encounter", "ServiceRequest", "CarePlan", "RelatedPerson"):
        assert len(current(council, rtype)) == 1, rtype
    assert council.creates[REFERRAL] == 1
    planned = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"
    encounters = [s["Encounter"] for s in seen]
    assert [e["status"] for e in encounters] == ["in-progress", "in-progress", "finished", "in-progress"]
    assert [e.get("extension", [{}])[0].get("valueDateTime") for e in encounters] == [
        "2026-11-24",
        "2026-11-23",
        None,
        "2026-11-26",
    ]
    assert [e["extension"][0]["url"] for e in encounters if "extension" in e] == [planned] * 3
    # Times in the default zone (Europe/London, GMT in November), with seconds and offset; the A13 removes the end.
    assert [e["period"].get("end") for e in encounters] == [None, None, "2026-11-24T10:45:00+00:00", None]
    referrals = [s["ServiceRequest"] for s in seen]
    assert [r["status"] for r in referrals] == ["active"] * 4
    assert [r["occurrence"] for r in referrals] == [
        "2026-11-24",
        "2026-11-23",
        "2026-11-24T10:45:00+00:00",
        "2026-11-26",
    ]
    assert [s["CarePlan"] for s in seen] == [["draft"], ["draft"], ["active"], ["revoked"]]
    referral = only(council, "ServiceRequest")
    assert {c["coding"][0]["code"] for c in referral["category"]} == {"discharge-support", "1"}
    assert [d["coding"][0]["code"] for d in referral["orderDetail"]] == ["bridging-care", "equipment"]
    assert only(council, "RelatedPerson")["relationship"][0]["coding"][0]["code"] == "Carer"
    # What the council holds at the end is valid R4 and meets every profile it claims (UK Core) and Homeward's.
    validator = Validator(ROOT / "conformance")
    assert [str(i) for key, r in council.resources.items() for i in validator.validate_resource(r, key)] == []


def test_refused_and_filtered_messages_reach_no_council(serve, council: Council) -> None:  # type: ignore[no-untyped-def]
    """Over MLLP: an A03 without PV1 or PID-3 gets AE with ERR naming the field, an A05 AA as filtered; only the good A03 is sent."""
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url)
    a05 = golden_message("ADT_A01/medical_admission.hl7").replace(b"ADT^A01^ADT_A01|A01-3|", b"ADT^A05^ADT_A05|A05-1|")
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        refused = [
            ack_fields(client.send(golden_message(f"ADT_A03/{case}.hl7")))
            for case in ("no_pv1", "no_patient_identifier")
        ]
        filtered = ack_fields(client.send(a05))
        summer = ack_fields(client.send(golden_message("ADT_A03/bst_offset.hl7")))
    assert [(a["MSA"][1], a["ERR"][2], a["ERR"][3].split("^")[0]) for a in refused] == [
        ("AE", "PV1^1", "101"),
        ("AE", "PID^1^3", "101"),
    ]
    assert filtered["MSA"][1] == "AA" and "ERR" not in filtered
    assert summer["MSA"][1] == "AA"
    wait_until(lambda: "A03-BST" in council.applied, what="A03-BST applied")
    assert council.posts == ["A03-BST"]
    # The default zone in July is BST: wall-clock PV1-44 / PV1-45 are written with +01:00.
    assert only(council, "Encounter")["period"] == {
        "start": "2026-07-10T08:30:00+01:00",
        "end": "2026-07-15T10:15:00+01:00",
    }
    outcomes = {
        line.get("message_control_id"): line.get("outcome")
        for line in process.log_lines()
        if line.get("event") == "message.acked"
    }
    assert outcomes == {
        "A03-NOPV1": "refused",
        "A03-NOPID3": "refused",
        "A05-1": "filtered",
        "A03-BST": "accepted",
    }


def test_the_feeds_time_zone_is_a_setting(serve, council: Council) -> None:  # type: ignore[no-untyped-def]
    """With HOMEWARD_MAPPING_TIMEZONE=Asia/Kolkata, v2 times without an offset reach the council at +05:30."""
    process = serve(HOMEWARD_FHIR_BASE_URL=council.url, HOMEWARD_MAPPING_TIMEZONE="Asia/Kolkata")
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        assert ack_fields(client.send(golden_message("ADT_A03/basic.hl7")))["MSA"][1] == "AA"
    wait_until(lambda: "MSG00001" in council.applied, what="MSG00001 applied")
    assert only(council, "Encounter")["period"] == {
        "start": "2026-11-20T08:30:00+05:30",
        "end": "2026-11-24T10:15:00+05:30",
    }
    assert only(council, "ServiceRequest")["authoredOn"] == "2026-11-24T10:25:00+05:30"  # EVN-2
