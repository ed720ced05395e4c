"""`homeward conformance` against servers that fall short (pytest-httpserver): each gap is one precise failing line."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.conformance.artefacts import SERVICE_REQUEST_PROFILE
from adapter.conformance.suite import Suite, load_requirements
from adapter.mapping.loader import load_mappings
from adapter.targets import FhirTarget
from tests.conftest import MAPPINGS, ROOT

CONFORMANCE = ROOT / "conformance"
FHIR_JSON = "application/fhir+json"


def statement(*, transaction: bool = True) -> dict[str, Any]:
    """A server CapabilityStatement that offers exactly what Homeward requires (optionally no transaction)."""
    requirements, _ = load_requirements(CONFORMANCE)
    cs = copy.deepcopy(requirements)
    cs["kind"] = "instance"
    rest = cs["rest"][0]
    rest["interaction"] = [{"code": "batch"}] + ([{"code": "transaction"}] if transaction else [])
    return cs


def outcome(text: str, expression: str, code: str = "processing") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text, "expression": [expression]}],
    }


def run_cli(server: HTTPServer, tmp_path: Path) -> tuple[int, str, dict[str, dict[str, Any]]]:
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "adapter", "conformance", "--server", server.url_for("/fhir")),
            *("--json", str(report), "--junit", str(junit)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    checks = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    return result.returncode, result.stdout, checks


def test_server_without_transactions(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/fhir/metadata").respond_with_json(statement(transaction=False))
    httpserver.expect_request("/fhir", method="POST").respond_with_json(
        outcome("Bundle type transaction is not supported", "Bundle.type", code="not-supported"), status=400
    )
    code, stdout, checks = run_cli(httpserver, tmp_path)
    assert code == 1
    assert stdout.rstrip().endswith("NOT CONFORMANT")
    assert "FAIL    metadata.transaction     required  transaction: not declared in rest.interaction" in stdout
    # CI systems read the JUnit file: the same line is a <failure> there.
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    failure = suite.find(".//testcase[@name='metadata.transaction']/failure")
    assert failure is not None and failure.get("message") == "transaction: not declared in rest.interaction"
    deliver = checks["lifecycle.A16.deliver"]
    assert deliver["status"] == "failed" and deliver["required"] is True
    assert (
        deliver["detail"]
        == "HTTP 400 from conformance: error not-supported (Bundle.type); Bundle type transaction is not supported"
    )


def test_server_without_metadata(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/fhir/metadata").respond_with_data("Not Found", status=404, content_type="text/plain")
    httpserver.expect_request("/fhir", method="POST").respond_with_data("Not Found", status=404)
    code, stdout, checks = run_cli(httpserver, tmp_path)
    assert code == 1
    assert checks["metadata.read"]["status"] == "failed"
    assert checks["metadata.read"]["detail"] == (
        "GET /metadata: HTTP 404, no FHIR resource (a FHIR server must publish its CapabilityStatement)"
    )
    assert "FAIL    metadata.read" in stdout
    assert "metadata.transaction" not in checks  # nothing to compare: reported once, at its cause


def test_server_rejecting_a_claimed_profile(httpserver: HTTPServer, tmp_path: Path) -> None:
    """A server that refuses UK Core's Patient profile on write: the delivery line names the element and the reason."""
    httpserver.expect_request("/fhir/metadata").respond_with_json(statement())
    httpserver.expect_request("/fhir", method="POST").respond_with_json(
        outcome(
            "Profile https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient is not supported",
            "Bundle.entry[0].resource.meta.profile[0]",
        ),
        status=422,
    )
    code, _, checks = run_cli(httpserver, tmp_path)
    assert code == 1
    detail = checks["lifecycle.A16.deliver"]["detail"]
    assert detail.startswith("HTTP 422 from conformance: error processing (Bundle.entry[0].resource.meta.profile[0])")
    assert "UKCore-Patient is not supported" in detail


def test_validate_rejecting_the_profile(httpserver: HTTPServer) -> None:
    """$validate says the referral breaks Homeward's profile: the check fails with the server's path and text."""
    referral = {"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order"}
    httpserver.expect_request("/fhir/StructureDefinition").respond_with_json(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "StructureDefinition"}}],
        }
    )
    httpserver.expect_request("/fhir/ServiceRequest/sr1").respond_with_json(referral)

    def validate(request: Request) -> Response:
        params = json.loads(request.data)
        profile = next(p["valueUri"] for p in params["parameter"] if p["name"] == "profile")
        assert profile == SERVICE_REQUEST_PROFILE
        body = outcome("Slice 'homewardDischarge': expected 1..1, found 0", "ServiceRequest.category", code="structure")
        return Response(json.dumps(body), status=200, content_type=FHIR_JSON)

    httpserver.expect_request("/fhir/ServiceRequest/$validate", method="POST").respond_with_handler(validate)
    requirements, profiles = load_requirements(CONFORMANCE)
    target = FhirTarget("conformance", httpserver.url_for("/fhir"), connect_timeout=5, read_timeout=10)
    suite = Suite(target, load_mappings(MAPPINGS), requirements, profiles, tz=ZoneInfo("Europe/London"))
    suite.statement = statement()
    suite.found["ServiceRequest?identifier=x|1"] = "ServiceRequest/sr1"

    async def run() -> None:
        await suite.validate()
        await target.aclose()

    asyncio.run(run())
    check = next(c for c in suite.report.checks if c.id == "validate.ServiceRequest")
    assert (check.status, check.required) == ("failed", True)
    assert check.detail == "ServiceRequest.category: Slice 'homewardDischarge': expected 1..1, found 0"
    assert not suite.report.ok


def test_server_without_json(httpserver: HTTPServer, tmp_path: Path) -> None:
    """A server that lists only XML cannot take what Homeward sends: a required failing line naming the formats."""
    cs = statement()
    cs["format"] = ["application/fhir+xml", "xml"]
    httpserver.expect_request("/fhir/metadata").respond_with_json(cs)
    code, stdout, checks = run_cli(httpserver, tmp_path)
    assert code == 1
    assert checks["metadata.format"] == {
        **checks["metadata.format"],
        "status": "failed",
        "required": True,
        "detail": "format: application/fhir+json not in CapabilityStatement.format (application/fhir+xml, xml)",
    }
    assert "FAIL    metadata.format" in stdout


def test_a_malformed_answer_fails_its_stage_and_the_run_goes_on(httpserver: HTTPServer, tmp_path: Path) -> None:
    """A CapabilityStatement of the wrong shape: one failing line for the stage, then the other stages and the reports."""
    cs = statement()
    cs["rest"][0]["resource"] = "not a list of resources"
    httpserver.expect_request("/fhir/metadata").respond_with_json(cs)
    code, stdout, checks = run_cli(httpserver, tmp_path)
    assert code == 1
    assert checks["metadata.error"]["status"] == "failed"
    assert checks["metadata.error"]["detail"] == (
        "metadata stopped: AttributeError (the server's answer was not what FHIR R4 specifies)"
    )
    assert "lifecycle.A16.deliver" in checks and "cleanup" in checks  # the run went on
    assert "Traceback" not in stdout
