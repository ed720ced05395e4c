"""`homeward conformance` with OAuth2 client credentials: a token endpoint (pytest-httpserver) in front of the
real FHIR server started so that it answers 401 to any request without that endpoint's bearer token."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import ROOT
from tests.fhir_server import FhirServer

CLIENT_ID = "homeward-conformance"
SECRET = "client-secret-for-the-test"
ACCESS_TOKEN = "token-issued-by-the-test-endpoint"


class TokenEndpoint:
    """RFC 6749 client credentials with HTTP Basic client authentication; records each grant it sees."""

    def __init__(self) -> None:
        self.grants: list[dict[str, Any]] = []

    def __call__(self, request: Request) -> Response:
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
        self.grants.append(dict(request.form))
        if request.form.get("grant_type") != "client_credentials":
            return Response(json.dumps({"error": "unsupported_grant_type"}), 400, content_type="application/json")
        if request.headers.get("Authorization") != expected:
            return Response(json.dumps({"error": "invalid_client"}), 401, content_type="application/json")
        body = {"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 300}
        return Response(json.dumps(body), 200, content_type="application/json")


@pytest.fixture(scope="module")
def token_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture(scope="module")
def protected_server(token_server: HTTPServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    server = FhirServer(
        tmp_path_factory.mktemp("oauth-fhir") / "server.log",
        env={"BEARER_TOKEN": ACCESS_TOKEN, "TOKEN_URL": token_server.url_for("/token")},
    )
    yield server
    server.stop()


@pytest.fixture
def endpoint(token_server: HTTPServer) -> Iterator[TokenEndpoint]:
    handler = TokenEndpoint()
    token_server.expect_request("/token", method="POST").respond_with_handler(handler)
    yield handler
    token_server.clear()


def _run(server: FhirServer, tmp_path: Path, *args: str, secret: str = SECRET) -> tuple[int, str, dict[str, Any]]:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "adapter", "conformance", "--server", server.base_url, "--json", str(report), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HW_CONFORMANCE_SECRET": secret},
    )
    data = json.loads(report.read_text())
    return result.returncode, result.stdout + result.stderr, data


def _oauth(token_server: HTTPServer) -> list[str]:
    return [
        *("--token-url", token_server.url_for("/token"), "--client-id", CLIENT_ID),
        *("--client-secret-env", "HW_CONFORMANCE_SECRET", "--scope", "system/*.write"),
    ]


def test_full_run_with_client_credentials_is_conformant(
    protected_server: FhirServer, token_server: HTTPServer, endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    code, output, data = _run(protected_server, tmp_path, "--load-profiles", *_oauth(token_server))
    assert code == 0, output
    checks = {c["id"]: c for c in data["checks"]}
    assert checks["auth.token"]["status"] == "passed"
    assert checks["metadata.security"] == {**checks["metadata.security"], "status": "passed", "required": False}
    assert checks["metadata.security"]["detail"] == "security: SMART-on-FHIR declared"
    for required in ("lifecycle.A03.readback", "replay.no-duplicates", "merge.links", "validate.CarePlan"):
        assert checks[required]["status"] == "passed", checks[required]
    assert checks["cleanup"]["status"] == "passed"
    # One token for the whole run (cached), fetched with the client credentials grant and the scope asked for.
    assert endpoint.grants == [{"grant_type": "client_credentials", "scope": "system/*.write"}]
    assert ACCESS_TOKEN not in output and SECRET not in output  # neither is ever printed


def test_without_a_token_the_server_refuses_and_the_run_fails(
    protected_server: FhirServer, endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    """The same server without auth options: the 401 is a failing line, and the security check says why it is skipped."""
    code, output, data = _run(protected_server, tmp_path)
    assert code == 1
    checks = {c["id"]: c for c in data["checks"]}
    assert "auth.token" not in checks
    assert checks["metadata.security"]["status"] == "skipped"
    assert checks["metadata.security"]["detail"] == "no OAuth2 configured for this run (--token-url or a target's auth)"
    assert checks["lifecycle.A16.deliver"]["status"] == "failed"
    assert checks["lifecycle.A16.deliver"]["detail"].startswith("HTTP 401"), checks["lifecycle.A16.deliver"]
    assert "FAIL    lifecycle.A16.deliver" in output
    assert endpoint.grants == []


def test_a_refused_client_stops_the_run_at_the_token(
    protected_server: FhirServer, token_server: HTTPServer, endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    code, output, data = _run(protected_server, tmp_path, *_oauth(token_server), secret="wrong")
    assert code == 1
    assert [(c["id"], c["status"]) for c in data["checks"]] == [("auth.token", "failed")]
    detail = data["checks"][0]["detail"]
    assert (
        detail == f"{token_server.url_for('/token')}: token endpoint answered HTTP 401 invalid_client; nothing else run"
    )
    assert "NOT CONFORMANT" in output


def test_a_configured_target_with_private_key_jwt(
    protected_server: FhirServer, token_server: HTTPServer, tmp_path: Path
) -> None:
    """`--config FILE --target NAME`: mode and OAuth2 (SMART backend services: a signed client assertion) come from
    the site's own target settings, so the run proves the configuration that will go live."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "jwt.pem").write_bytes(pem)
    token_url = token_server.url_for("/token")
    claims: list[dict[str, Any]] = []

    def endpoint(request: Request) -> Response:
        try:
            claims.append(
                jwt.decode(request.form["client_assertion"], key.public_key(), algorithms=["RS384"], audience=token_url)
            )
        except (KeyError, jwt.PyJWTError):
            return Response(json.dumps({"error": "invalid_client"}), 401, content_type="application/json")
        body = {"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 300}
        return Response(json.dumps(body), 200, content_type="application/json")

    token_server.expect_request("/token", method="POST").respond_with_handler(endpoint)
    config = tmp_path / "homeward.toml"
    config.write_text(
        f"""
[[targets]]
name = "council"
kind = "fhir"
mode = "batch"
base_url = "{protected_server.base_url}"

[targets.auth]
kind = "oauth2"
token_url = "{token_url}"
client_id = "homeward-rrk"
client_auth = "private_key_jwt"
private_key_file = "{tmp_path / "jwt.pem"}"
key_id = "homeward-2026"
"""
    )
    report = tmp_path / "report.json"
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "adapter", "conformance", "--config", str(config), "--target", "council"),
                *("--load-profiles", "--json", str(report)),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        token_server.clear()
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["facts"]["mode"] == "batch" and data["facts"]["auth"] == "oauth2"
    checks = {c["id"]: c for c in data["checks"]}
    assert checks["auth.token"]["status"] == "passed"
    assert checks["lifecycle.A03.deliver"]["title"] == "A03 delivered as a batch"
    assert [(c["iss"], c["sub"]) for c in claims] == [("homeward-rrk", "homeward-rrk")]
