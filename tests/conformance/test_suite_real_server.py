"""`homeward conformance` against the real FHIR server: every required check passes, and the reports say so."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx

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
    ):
        assert checks[required]["status"] == "passed", checks[required]
        assert checks[required]["required"] is True
    assert checks["cleanup"]["status"] == "passed"
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
