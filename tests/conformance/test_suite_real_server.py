"""`homeward conformance` against the real FHIR server: every required check passes, and the reports say so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.fhir_server import FhirServer


def test_full_run_is_conformant_and_cleans_up(fhir_server: FhirServer, tmp_path: Path) -> None:
    junit, report = tmp_path / "conformance.xml", tmp_path / "conformance.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "adapter", "conformance", "--server", fhir_server.base_url, "--load-profiles"),
            *("--junit", str(junit), "--json", str(report)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("CONFORMANT")
    data = json.loads(report.read_text())
    assert data["conformant"] is True
    checks = {c["id"]: c for c in data["checks"]}
    for required in (
        "metadata.transaction",
        "lifecycle.A16.readback",
        "lifecycle.A03.readback",
        "lifecycle.A13.readback",
        "replay.no-duplicates",
        "merge.links",
        "validate.ServiceRequest",
        "validate.CarePlan",
        "metadata.format",
        # every profile the life cycle's resources claim in meta.profile, the carer's RelatedPerson included
        "validate.UKCore-Patient",
        "validate.UKCore-Encounter",
        "validate.UKCore-Organization",
        "validate.UKCore-ServiceRequest",
        "validate.UKCore-CarePlan",
        "validate.UKCore-RelatedPerson",
    ):
        assert checks[required]["status"] == "passed", checks[required]
        assert checks[required]["required"] is True
    assert checks["cleanup"]["status"] == "passed"
    # No OAuth2 in this run: the security check is skipped with its reason, never passed.
    assert (checks["metadata.security"]["status"], checks["metadata.security"]["required"]) == ("skipped", False)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "0" and int(suite.get("tests", "0")) == len(data["checks"])
    # The test patient is gone again: its MRN finds nothing.
    mrn = data["facts"]["test_patient_mrn"]
    found = httpx.get(f"{fhir_server.base_url}/Patient", params={"identifier": mrn}).json()
    assert found.get("entry") is None


def test_without_profiles_on_the_server_validate_is_skipped_not_passed(tmp_path: Path) -> None:
    """A fresh server process holds no profiles: $validate cannot run, and the report says why."""
    fresh = FhirServer(tmp_path / "fresh.log")
    try:
        report = tmp_path / "r.json"
        result = subprocess.run(
            [sys.executable, "-m", "adapter", "conformance", "--server", fresh.base_url, "--json", str(report)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        fresh.stop()
    checks = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["validate.ServiceRequest"]["status"] == "skipped"
    assert "does not hold the profile" in checks["validate.ServiceRequest"]["detail"]
    assert result.returncode == 0, result.stdout  # an optional check that could not run does not fail the run
    assert "SKIP    validate.ServiceRequest" in result.stdout


def _run(server: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, dict]:  # type: ignore[type-arg]
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    result = subprocess.run(
        [sys.executable, "-m", "adapter", "conformance", "--server", server, "--json", str(report), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout, {c["id"]: c for c in json.loads(report.read_text())["checks"]}


@pytest.mark.parametrize("mode", ["batch", "conditional"])
def test_other_delivery_modes_pass_the_life_cycle(fhir_server: FhirServer, tmp_path: Path, mode: str) -> None:
    """batch (references by identifier) and conditional (one PUT per entry) give the same results on a real server."""
    code, stdout, checks = _run(fhir_server.base_url, tmp_path, "--mode", mode, "--load-profiles")
    assert code == 0, stdout
    assert checks["replay.no-duplicates"]["status"] == "passed"
    assert checks["merge.links"]["status"] == "passed"


def test_an_event_the_site_does_not_map_is_a_mapping_gap(fhir_server: FhirServer, tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    (mappings / "messages" / "ADT_A13.yaml").unlink()
    site = mappings / "site.yaml"
    site.write_text(re.sub(r"(?m)^  A13: process.*\n", "", site.read_text()))
    code, stdout, checks = _run(fhir_server.base_url, tmp_path, env={"HOMEWARD_MAPPINGS_DIR": str(mappings)})
    assert code == 1
    assert checks["lifecycle.A13.map"]["status"] == "failed"
    assert checks["lifecycle.A13.map"]["detail"] == "mapping gap: no mappings/messages/ADT_A13.yaml"
    assert checks["lifecycle.A13.deliver"]["status"] == "skipped"
    assert checks["lifecycle.A03.readback"]["status"] == "passed"  # the rest still runs
    assert "FAIL    lifecycle.A13.map" in stdout


def test_a_ukcore_claim_the_content_does_not_meet_fails_offline_and_on_the_server(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    """A site rule that gives the hospital a second ODS organisation code breaks the UK Core Organization it claims:
    `homeward validate` names the slice offline, and the suite's $validate against the claimed profile fails."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    with open(mappings / "segments" / "MSH-Organization.yaml", "a") as fh:
        fh.write('  - element: "identifier[+]"\n')
        fh.write('    value: {system: "https://fhir.nhs.uk/Id/ods-organization-code", value: RXX}\n')
    env = {"HOMEWARD_MAPPINGS_DIR": str(mappings)}
    offline = subprocess.run(
        [sys.executable, "-m", "adapter", "validate", "--from-hl7", str(ROOT / "tests/golden/ADT_A16/basic.hl7")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert offline.returncode == 1
    assert (
        "Bundle.entry[1].resource.identifier: error: slice odsOrganisationCode allows at most 1, found 2 [UKCoreOrganization]"
        in offline.stdout
    ), offline.stdout
    code, stdout, checks = _run(fhir_server.base_url, tmp_path, "--load-profiles", env=env)
    assert "FAIL    validate.UKCore-Organization" in stdout
    assert code == 1
    check = checks["validate.UKCore-Organization"]
    assert (check["status"], check["required"]) == ("failed", True)
    assert check["detail"].startswith("Organization.identifier: "), check
    assert "odsOrganisationCode" in check["detail"]
    assert checks["validate.UKCore-Patient"]["status"] == "passed"  # the other claims still hold
