"""Golden mapping tests: every tests/golden/<event>/<case>.hl7 against its <case>.bundle.json.

Cases are found by glob. A case whose message must be refused keeps `<case>.error.txt` (the ACK
code, table 0357 code and HL7 location, e.g. "AE 101 PV1-19") instead of a bundle. Every bundle
produced is validated with fhir.resources R4B, every reference must resolve to an entry of the same
bundle, and a few FHIRPath invariants are checked. `pytest --update-golden` rewrites the expected
files; read the diff before committing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhirpathpy import evaluate

from adapter.errors import InboundError
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.loader import load_mappings
from tests.conftest import GOLDEN, MAPPINGS

CASES = sorted(GOLDEN.glob("*/*.hl7"))
TZ = ZoneInfo("Europe/London")

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
