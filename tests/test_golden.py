"""Golden mapping tests: every tests/golden/<event>/<case>.hl7 against its <case>.bundle.json.

Cases are found by glob. A case whose message must be refused keeps `<case>.error.txt` (the ACK
code, table 0357 code and HL7 location, e.g. "AE 101 PV1-19") instead of a bundle. Every bundle
produced is validated with fhir.resources R4B, every reference must resolve to an entry of the same
bundle, and a few FHIRPath invariants are checked. `pytest --update-golden` rewrites the expected
files; read the diff before committing it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhirpathpy import evaluate

from adapter.errors import InboundError
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.functions import nhs_number_is_valid
from adapter.mapping.loader import load_mappings
from tests.conftest import GOLDEN, MAPPINGS

CASES = sorted(GOLDEN.glob("*/*.hl7"))
TZ = ZoneInfo("Europe/London")
UKCORE = "https://fhir.hl7.org.uk/StructureDefinition/"

# Invariants every bundle must meet, beyond what the R4B models check (FHIRPath, R4 spec wording).
INVARIANTS = {
    "every entry has a fullUrl and a PUT request": "Bundle.entry.all(fullUrl.exists() and request.method = 'PUT')",
    "fullUrls are unique": "Bundle.entry.fullUrl.isDistinct()",
    "an NHS number is 10 digits": (
        "Bundle.entry.resource.ofType(Patient).identifier"
        ".where(system = 'https://fhir.nhs.uk/Id/nhs-number').all(value.matches('^[0-9]{10}$'))"
    ),
    "a finished Encounter has an end": "Bundle.entry.resource.ofType(Encounter).where(status = 'finished').all(period.end.exists())",
    "cpl-3: an activity has a reference or a detail, not both": (
        "Bundle.entry.resource.ofType(CarePlan).activity.all(detail.empty() or reference.empty())"
    ),
    "every Encounter has a class and a subject": "Bundle.entry.resource.ofType(Encounter).all(class.exists() and subject.exists())",
    "a referral and a plan always name their patient": (
        "Bundle.entry.resource.where(resourceType = 'ServiceRequest' or resourceType = 'CarePlan').all(subject.exists())"
    ),
    "an active CarePlan has a period start": "Bundle.entry.resource.ofType(CarePlan).where(status = 'active').all(period.start.exists())",
    "a RelatedPerson hangs off a Patient of the bundle": (
        "Bundle.entry.resource.ofType(RelatedPerson).all(patient.reference in %bundle.entry.where(resource.resourceType = 'Patient').fullUrl)"
    ),
    "a merged Patient links to another Patient of the bundle": (
        "Bundle.entry.resource.ofType(Patient).link.all(other.reference in %bundle.entry.where(resource.resourceType = 'Patient').fullUrl)"
    ),
    "Provenance targets every other entry": (
        "Bundle.entry.resource.ofType(Provenance).target.count() = Bundle.entry.count() - 1"
    ),
    "every resource that claims a profile claims a UK Core one": (
        "Bundle.entry.resource.meta.profile.all($this.startsWith('https://fhir.hl7.org.uk/StructureDefinition/UKCore-'))"
    ),
    # What the UK Core profiles Homeward claims constrain beyond R4 (their differentials; UK Core 2.x, see README).
    "UKCore-Patient: at most one NHS number (identifier:nhsNumber 0..1), with a value": (
        "Bundle.entry.resource.ofType(Patient).where(meta.profile contains '" + UKCORE + "UKCore-Patient')"
        ".all(identifier.where(system = 'https://fhir.nhs.uk/Id/nhs-number').count() <= 1"
        " and identifier.where(system = 'https://fhir.nhs.uk/Id/nhs-number').all(value.exists()))"
    ),
    "UKCore-Patient: the verification status is coded from UKCore-NHSNumberVerificationStatus, on the NHS number only": (
        "Bundle.entry.resource.ofType(Patient).identifier.where(extension.url = '"
        + UKCORE
        + "Extension-UKCore-NHSNumberVerificationStatus')"
        ".all(system = 'https://fhir.nhs.uk/Id/nhs-number' and extension.valueCodeableConcept.coding.all("
        "system = 'https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland'"
        " and (code = '01' or code = '02' or code = '03' or code = '04' or code = '05' or code = '06' or code = '07' or code = '08')))"
    ),
    "UKCore-Organization: at most one ODS organisation code, with a value": (
        "Bundle.entry.resource.ofType(Organization).where(meta.profile contains '" + UKCORE + "UKCore-Organization')"
        ".all(identifier.where(system = 'https://fhir.nhs.uk/Id/ods-organization-code').count() <= 1"
        " and identifier.where(system = 'https://fhir.nhs.uk/Id/ods-organization-code').all(value.exists()))"
    ),
    "UKCore-RelatedPerson: coded relationships come from the systems of UKCore-PersonRelationshipType (extensible)": (
        "Bundle.entry.resource.ofType(RelatedPerson).relationship.coding.all("
        "system = 'http://terminology.hl7.org/CodeSystem/v3-RoleCode'"
        " or system = 'http://terminology.hl7.org/CodeSystem/v2-0131'"
        " or system = 'https://fhir.hl7.org.uk/CodeSystem/UKCore-AdditionalPersonRelationshipRole')"
    ),
    "UKCore-Encounter: a coded dischargeDisposition is from UKCore-DischargeDestination": (
        "Bundle.entry.resource.ofType(Encounter).hospitalization.dischargeDisposition.coding.all("
        "system = 'https://fhir.hl7.org.uk/CodeSystem/UKCore-DischargeDestinationEngland'"
        " or system = 'https://fhir.hl7.org.uk/CodeSystem/UKCore-DischargeDestinationWales')"
    ),
}


@pytest.fixture(scope="module")
def mappings():  # type: ignore[no-untyped-def]
    return load_mappings(MAPPINGS)


def references(node: Any) -> list[str]:
    """Every Reference.reference anywhere in `node`."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(references(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(references(value))
    return found


def check_bundle(bundle: dict[str, Any]) -> None:
    """Assert that `bundle` is valid R4B, self-contained, and meets the invariants above."""
    Bundle.model_validate(bundle)
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
    dangling = [ref for ref in references(bundle) if ref not in full_urls]
    assert not dangling, f"references that resolve to no entry: {dangling}"
    broken = [name for name, expr in INVARIANTS.items() if evaluate(bundle, expr, {"bundle": bundle}) != [True]]
    assert not broken, f"invariants not met: {broken}"


def canonical(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def outcome(path: Path, mappings) -> tuple[str, dict[str, Any] | None]:  # type: ignore[no-untyped-def]
    """Map one golden message: ("bundle", bundle) or ("error", None) with the refusal as text."""
    message = parse(path.read_bytes())
    try:
        result = map_message(message, mappings, TZ)
    except InboundError as exc:
        return f"{exc.ack_code.value} {exc.hl7_error_code} {exc.location or '-'}\n", None
    return canonical(result.bundle), result.bundle


@pytest.mark.parametrize("case", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden(case: Path, mappings, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    """The message maps to exactly the stored bundle (or refusal), and the bundle is valid and self-contained."""
    text, bundle = outcome(case, mappings)
    expected = case.with_suffix(".bundle.json") if bundle is not None else case.with_suffix(".error.txt")
    stale = case.with_suffix(".error.txt") if bundle is not None else case.with_suffix(".bundle.json")
    if request.config.getoption("--update-golden"):
        expected.write_text(text, encoding="utf-8")
        stale.unlink(missing_ok=True)
    assert not stale.exists(), f"{stale.name} is stale: the case now gives {expected.name}"
    assert expected.exists(), f"no {expected.name}; run pytest --update-golden and review it"
    if bundle is not None:
        check_bundle(bundle)
        assert canonical(bundle) == canonical(json.loads(expected.read_text(encoding="utf-8")))
    else:
        assert text == expected.read_text(encoding="utf-8")


def test_there_are_golden_cases() -> None:
    """The glob finds the golden cases (a moved folder must not silently pass with zero cases)."""
    assert len(CASES) >= 1


def test_check_bundle_catches_a_dangling_reference() -> None:
    """The self-containment check fails a bundle whose reference points at no entry."""
    bundle = json.loads((GOLDEN / "ADT_A03" / "basic.bundle.json").read_text(encoding="utf-8"))
    bundle["entry"][2]["resource"]["subject"]["reference"] = "urn:uuid:00000000-0000-0000-0000-000000000000"
    with pytest.raises(AssertionError, match="resolve to no entry"):
        check_bundle(bundle)


# -- what the golden set must cover (issue 3): a deleted or rewritten case must not quietly drop a requirement --

VERSIONS = {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"}
REPEATING_PID_FIELDS = (3, 5, 11, 13)


def _segments(path: Path) -> list[list[str]]:
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\r").replace("\n", "\r")
    return [line.split("|") for line in text.split("\r") if line]


def test_the_golden_set_covers_what_the_issue_asks() -> None:
    """At least 40 cases: every mapped event, each v2 version 2.3-2.8, CR / LF / CRLF, escapes, Z-segments, repeats, ..."""
    assert len(CASES) >= 40
    mapped_events = {p.stem for p in (MAPPINGS / "messages").glob("ADT_*.yaml")}
    assert {p.parent.name for p in CASES} >= mapped_events
    segments = {p: _segments(p) for p in CASES}
    assert {segs[0][11] for segs in segments.values()} >= VERSIONS
    raw = {p: p.read_bytes() for p in CASES}
    assert any(b"\r\n" in data for data in raw.values()), "a CRLF case"
    assert any(b"\r" not in data for data in raw.values()), "an LF case"
    assert any(b"\r" in data and b"\n" not in data for data in raw.values()), "a CR case"
    assert any(re.search(rb"\\[FSTRE]\\|\\\.br\\", data) for data in raw.values()), "escape sequences"
    assert any(seg[0].startswith("Z") for segs in segments.values() for seg in segs), "a Z-segment"
    assert any(
        "~" in seg[n] for segs in segments.values() for seg in segs if seg[0] == "PID" for n in REPEATING_PID_FIELDS
    ), "repeating PID fields"
    assert any(sum(seg[0] == "NK1" for seg in segs) > 1 for segs in segments.values()), "repeating segments"
    assert any(
        not {"EVN", "PD1", "NK1", "PV2"} & {seg[0] for seg in segs}
        for p, segs in segments.items()
        if p.with_suffix(".bundle.json").exists()
    ), "a mapped case without the optional segments"
    nhs_numbers = [
        rep.split("^")[0]
        for segs in segments.values()
        for seg in segs
        if seg[0] == "PID"
        for rep in seg[3].split("~")
        if rep.split("^")[4:5] == ["NH"]
    ]
    assert any(not nhs_number_is_valid(n) for n in nhs_numbers), "a bad NHS number"
    councils = {
        json.dumps(performer, sort_keys=True)
        for p in CASES
        if p.with_suffix(".bundle.json").exists()
        for entry in json.loads(p.with_suffix(".bundle.json").read_text(encoding="utf-8"))["entry"]
        if entry["resource"]["resourceType"] == "ServiceRequest"
        for performer in entry["resource"].get("performer", [])
    }
    assert len(councils) >= 2, "two councils"
    assert all((GOLDEN / event / "cycle.hl7").exists() for event in ("ADT_A16", "ADT_A03", "ADT_A13")), "the life cycle"
    refusals = {
        p.with_suffix(".error.txt").read_text(encoding="utf-8").split()[-1]
        for p in CASES
        if p.with_suffix(".error.txt").exists()
    }
    assert {"PV1", "PID-3"} <= refusals, "an A03 with no PV1 and one with no patient identifier are refused"


def _patient(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")


@pytest.mark.parametrize(
    ("change", "invariant"),
    [
        (lambda b: _patient(b)["identifier"].append(dict(_patient(b)["identifier"][0])), "at most one NHS number"),
        (
            lambda b: _patient(b)["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0].update(
                code="09"
            ),
            "verification status is coded",
        ),
        (
            lambda b: next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Encounter")[
                "hospitalization"
            ]["dischargeDisposition"]["coding"][0].update(system="http://example.org/local"),
            "dischargeDisposition is from UKCore-DischargeDestination",
        ),
    ],
    ids=["two-nhs-numbers", "verification-code", "disposition-system"],
)
def test_check_bundle_catches_a_ukcore_breach(change: Any, invariant: str) -> None:
    """The UK Core invariants fail a bundle that breaks what the claimed profile constrains."""
    bundle = json.loads((GOLDEN / "ADT_A03" / "v26_full.bundle.json").read_text(encoding="utf-8"))
    change(bundle)
    with pytest.raises(AssertionError, match=invariant):
        check_bundle(bundle)
