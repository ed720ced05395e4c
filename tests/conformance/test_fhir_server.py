"""The real test FHIR server starts, answers /metadata and applies Homeward's transaction bundles resend-safely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import GOLDEN, ROOT
from tests.fhir_server import CACHE, FhirServer


def _a03_bundle() -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "adapter", "map", str(GOLDEN / "ADT_A03" / "basic.hl7")],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return result.stdout


def test_metadata_declares_transactions(fhir_server: FhirServer) -> None:
    statement = httpx.get(f"{fhir_server.base_url}/metadata").json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert {"code": "transaction"} in statement["rest"][0]["interaction"]


def test_replayed_bundle_creates_nothing_new(fhir_server: FhirServer) -> None:
    bundle = _a03_bundle()
    headers = {"Content-Type": "application/fhir+json"}
    first = httpx.post(fhir_server.base_url, content=bundle, headers=headers).json()
    second = httpx.post(fhir_server.base_url, content=bundle, headers=headers).json()
    assert first["type"] == second["type"] == "transaction-response"
    locations = [e["response"]["location"].split("/_history")[0] for e in first["entry"]]
    assert [e["response"]["location"].split("/_history")[0] for e in second["entry"]] == locations
    assert {e["response"]["status"] for e in second["entry"]} == {"200"}
    found = httpx.get(
        f"{fhir_server.base_url}/ServiceRequest",
        params={"identifier": "https://homeward.example.org/fhir/Id/RRK/discharge-referral|V0001234"},
    ).json()
    assert found["total"] == 1
    referral = found["entry"][0]["resource"]
    assert referral["subject"]["reference"].startswith("Patient/")


def test_a_server_that_cannot_start_fails_the_run_loudly(tmp_path: Path) -> None:
    """The fixture's failure is pytest.fail with node's own output, never a skip."""
    broken = tmp_path / "broken-server.mjs"
    broken.write_text("import '@medplum/no-such-package';\n")
    try:
        with pytest.raises(pytest.fail.Exception, match="exited at start-up") as caught:
            FhirServer(tmp_path / "broken.log", script=broken)
    finally:
        (CACHE / broken.name).unlink(missing_ok=True)
    assert "no-such-package" in str(caught.value)
