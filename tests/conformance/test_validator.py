"""`homeward validate`: R4 structure and Homeward's profiles, each finding naming the element path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapter.conformance.validator import Validator
from tests.conftest import GOLDEN, ROOT

CONFORMANCE = ROOT / "conformance"


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(CONFORMANCE)


def _resource(kind: str) -> dict[str, Any]:
    bundle = json.loads((GOLDEN / "ADT_A03" / "basic.bundle.json").read_text())
    return copy.deepcopy(next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind))


def _errors(validator: Validator, resource: dict[str, Any]) -> list[str]:
    return [f"{i.path}: {i.message}" for i in validator.validate(resource) if i.severity == "error"]


def test_golden_service_request_is_valid(validator: Validator) -> None:
    assert _errors(validator, _resource("ServiceRequest")) == []


@pytest.mark.parametrize(
    ("kind", "change", "expected"),
    [
        (
            "ServiceRequest",
            lambda r: r.pop("identifier"),
            "ServiceRequest.identifier: has 0 values, the profile needs at least 1",
        ),
        (
            "ServiceRequest",
            lambda r: r.update(intent="plan"),
            "ServiceRequest.intent: must be exactly the profile's fixedCode",
        ),
        (
            "ServiceRequest",
            lambda r: r.update(status="sent"),
            "ServiceRequest.status: code is not in the required value set http://hl7.org/fhir/ValueSet/request-status",
        ),
        (
            "ServiceRequest",
            lambda r: r.update(category=[{"coding": [{"system": "http://snomed.info/sct", "code": "306238000"}]}]),
            "ServiceRequest.category: slice homewardDischarge needs 1..1, found 0",
        ),
        (
            "ServiceRequest",
            lambda r: r["code"]["coding"][0].update(code="not-a-service"),
            "ServiceRequest.code: code is not in the required value set https://homeward.example.org/fhir/ValueSet/discharge-service",
        ),
        (
            "ServiceRequest",
            lambda r: r.update(colour="blue"),
            "ServiceRequest.colour: not an element of this resource type",
        ),
        ("CarePlan", lambda r: r.pop("activity"), "CarePlan.activity: has 0 values, the profile needs at least 1"),
        (
            "CarePlan",
            lambda r: r["activity"][0].update(detail={"status": "scheduled"}),
            "CarePlan.activity[0]: invariant cpl-3 not met",
        ),
        ("CarePlan", lambda r: r.update(intent="order"), "CarePlan.intent: must be exactly the profile's fixedCode"),
        ("CarePlan", lambda r: r.pop("category"), "CarePlan.category: has 0 values, the profile needs at least 1"),
        (
            "CarePlan",
            lambda r: r.update(category=[{"coding": [{"system": "http://snomed.info/sct", "code": "734163000"}]}]),
            "CarePlan.category: slice homewardDischarge needs 1..1, found 0",
        ),
        (
            "CarePlan",
            lambda r: r.update(activity=[{"detail": {"status": "not-started"}}]),
            "CarePlan: invariant hw-cp-1 not met",
        ),
    ],
    ids=[
        "sr-identifier",
        "sr-intent",
        "sr-status",
        "sr-category",
        "sr-code",
        "sr-unknown",
        "cp-activity",
        "cp-cpl3",
        "cp-intent",
        "cp-no-category",
        "cp-other-category",
        "cp-hw-cp-1",
    ],
)
def test_each_fault_names_its_element(validator: Validator, kind: str, change: Any, expected: str) -> None:
    resource = _resource(kind)
    change(resource)
    errors = _errors(validator, resource)
    assert any(e.startswith(expected) for e in errors), errors


def test_bundle_paths_name_the_entry(validator: Validator) -> None:
    bundle = json.loads((GOLDEN / "ADT_A03" / "basic.bundle.json").read_text())
    index = next(i for i, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == "CarePlan")
    bundle["entry"][index]["resource"]["intent"] = "order"
    assert _errors(validator, bundle) == [
        f"Bundle.entry[{index}].resource.intent: must be exactly the profile's fixedCode"
    ]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapter", "validate", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_cli_from_hl7_valid() -> None:
    result = _cli("--from-hl7", str(GOLDEN / "ADT_A03" / "basic.hl7"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("Bundle: valid (0 errors, 0 warnings)")


def test_cli_reports_invalid_file_without_values(tmp_path: Path) -> None:
    resource = _resource("ServiceRequest")
    resource["intent"] = "plan"
    path = tmp_path / "sr.json"
    path.write_text(json.dumps(resource))
    result = _cli(str(path))
    assert result.returncode == 1
    assert (
        f"{path}: ServiceRequest.intent: error: must be exactly the profile's fixedCode [HomewardDischargeServiceRequest]"
        in result.stdout
    )
    assert "V0001234" not in result.stdout  # never the values: they may be patient data


# -- UK Core claims: every profile in meta.profile is checked, not only Homeward's own ----------------

NHS = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"


def _with_nhs_number(patient: dict[str, Any]) -> dict[str, Any]:
    patient["identifier"] = [i for i in patient.get("identifier", []) if i.get("system") != NHS]
    patient["identifier"].append({"system": NHS, "value": "9449305552"})
    return patient


@pytest.mark.parametrize(
    ("kind", "change", "expected"),
    [
        (
            "Patient",
            lambda r: _with_nhs_number(r)["identifier"].append({"system": NHS, "value": "9449310394"}),
            "Patient.identifier: slice nhsNumber allows at most 1, found 2 [UKCorePatient]",
        ),
        (
            "Patient",
            lambda r: _with_nhs_number(r)["identifier"][-1].pop("value"),
            "Patient.identifier[{last}].value: has 0 values, slice nhsNumber needs at least 1 [UKCorePatient]",
        ),
        (
            "Organization",
            lambda r: r["identifier"].append({"system": ODS, "value": "RXX"}),
            "Organization.identifier: slice odsOrganisationCode allows at most 1, found 2 [UKCoreOrganization]",
        ),
        (
            "Encounter",
            lambda r: r.update(status="discharged"),
            "Encounter.status: code is not in the required value set http://hl7.org/fhir/ValueSet/encounter-status [UKCoreEncounter]",
        ),
    ],
    ids=[
        "patient-two-nhs-numbers",
        "patient-nhs-number-without-value",
        "organization-two-ods-codes",
        "encounter-status",
    ],
)
def test_claimed_ukcore_profile_is_checked(validator: Validator, kind: str, change: Any, expected: str) -> None:
    """A resource that claims a UK Core profile in meta.profile but does not meet it is an error naming that profile."""
    resource = _resource(kind)
    assert any("UKCore" in p for p in resource["meta"]["profile"])
    assert [str(i) for i in validator.validate(resource) if i.severity == "error"] == []
    change(resource)
    last = len(resource.get("identifier", [])) - 1
    found = [str(i) for i in validator.validate(resource)]
    assert expected.format(last=last) in [f.replace(": error: ", ": ") for f in found], found


def test_without_the_claim_the_ukcore_rules_do_not_apply(validator: Validator) -> None:
    """The check follows the claim: the same content without meta.profile is not held to UK Core."""
    resource = _resource("Organization")
    resource["identifier"].append({"system": ODS, "value": "RXX"})
    assert [str(i) for i in validator.validate(resource) if i.severity == "error"] != []
    resource.pop("meta")
    assert [str(i) for i in validator.validate(resource) if i.severity == "error"] == []


def test_a_claimed_profile_not_held_here_is_reported_not_passed(validator: Validator) -> None:
    resource = _resource("Organization")
    resource["meta"]["profile"].append("https://example.org/StructureDefinition/SomeoneElsesOrganization")
    warnings = [str(i) for i in validator.validate(resource) if i.severity == "warning"]
    assert warnings == [
        "Organization: warning: profile https://example.org/StructureDefinition/SomeoneElsesOrganization is not known here; not checked [profile]"
    ]


@pytest.mark.parametrize(
    ("element", "change"),
    [
        ("name[0].use", lambda r: r["name"][0].update(use="nick")),
        ("telecom[0].system", lambda r: r["telecom"][0].update(system="mobile")),
        ("identifier[0].use", lambda r: r["identifier"][0].update(use="primary")),
        ("address[0].use", lambda r: r["address"][0].update(use="house")),
    ],
    ids=["HumanName.use", "ContactPoint.system", "Identifier.use", "Address.use"],
)
def test_codes_inside_datatypes_meet_their_required_binding(validator: Validator, element: str, change: Any) -> None:
    """A site table (e.g. 0202 -> ContactPoint.system) that maps to a code R4 does not allow is caught offline."""
    bundle = json.loads((GOLDEN / "ADT_A03" / "v26_full.bundle.json").read_text())
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    change(patient)
    errors = _errors(validator, patient)
    assert f"Patient.{element}: code is not one the R4 required binding allows" in errors, errors
    assert all(e.startswith(f"Patient.{element}: ") for e in errors), errors
