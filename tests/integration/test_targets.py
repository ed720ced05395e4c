"""FHIR targets against real HTTP(S) servers: delivery modes, OAuth2 client credentials, mutual TLS, headers."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fhir.resources.R4B.bundle import Bundle
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from adapter.config import AuthSettings, Settings, TargetSettings
from adapter.errors import ConfigError, PermanentDelivery, RetryableDelivery
from adapter.store.base import OutboxItem
from adapter.targets import build_target, build_targets
from tests.conftest import GOLDEN

BUNDLE = (GOLDEN / "ADT_A03" / "basic.bundle.json").read_bytes()
OK = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


def item(n: int = 1) -> OutboxItem:
    return OutboxItem(
        id=n, inbound_id=n, target="t", ordering_key="k", bundle=BUNDLE, attempts=0, created_at=0.0,
        sending_facility="RRK", message_control_id=f"M{n}", event="ADT^A03",
    )  # fmt: skip


def deliver(t: TargetSettings, *items: OutboxItem) -> list[dict[str, Any]]:
    async def body() -> list[dict[str, Any]]:
        target = build_target(t)
        try:
            return [await target.send(i) for i in items]
        finally:
            await target.aclose()

    return asyncio.run(body())


def fhir(server: HTTPServer, **kw: Any) -> TargetSettings:
    return TargetSettings(name="t", base_url=server.url_for("/fhir"), **kw)


class TokenEndpoint:
    """/token on the test server: checks the client's credentials, hands out tok-1, tok-2, ..."""

    def __init__(self, server: HTTPServer, check, expires_in: int = 3600):  # type: ignore[no-untyped-def]
        self.issued: list[str] = []
        self.check = check
        self.expires_in = expires_in
        self.url = server.url_for("/token")
        server.expect_request("/token", method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        if request.form.get("grant_type") != "client_credentials" or not self.check(request):
            return Response(json.dumps({"error": "invalid_client"}), 401, content_type="application/json")
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}
        return Response(json.dumps(body), 200, content_type="application/json")


def basic_ok(request: Request) -> bool:
    expected = "Basic " + base64.b64encode(b"homeward:s3cret-value").decode()
    return request.headers.get("Authorization") == expected and request.form.get("scope") == "system/*.write"


class TestOAuth2:
    def _fhir_accepting(self, server: HTTPServer, valid: set[str]) -> list[str]:
        seen: list[str] = []

        def handle(request: Request) -> Response:
            auth = request.headers.get("Authorization", "")
            seen.append(auth)
            if auth.removeprefix("Bearer ") not in valid:
                return Response("", 401)
            return Response(json.dumps(OK), 200, content_type="application/fhir+json")

        server.expect_request("/fhir", method="POST").respond_with_handler(handle)
        return seen

    def test_client_secret_token_is_cached(self, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
        """client_secret: HTTP Basic at the token endpoint, one token for several requests, and no secret in the logs."""
        monkeypatch.setenv("COUNCIL_SECRET", "s3cret-value")
        tokens = TokenEndpoint(httpserver, basic_ok)
        seen = self._fhir_accepting(httpserver, {"tok-1"})
        auth = AuthSettings(
            kind="oauth2", token_url=tokens.url, client_id="homeward", scope="system/*.write",
            client_secret_env="COUNCIL_SECRET",
        )  # fmt: skip
        with structlog.testing.capture_logs() as logs:
            results = deliver(fhir(httpserver, auth=auth), item(1), item(2))
        assert [r["status"] for r in results] == [200, 200]
        assert tokens.issued == ["tok-1"] and seen == ["Bearer tok-1", "Bearer tok-1"]
        assert "s3cret-value" not in repr(logs) and "tok-1" not in repr(logs)
        assert [line["event"] for line in logs] == ["auth.token_fetched"]

    @pytest.fixture(params=["client_secret", "private_key_jwt"])
    def credentials(self, request: pytest.FixtureRequest, httpserver: HTTPServer, tmp_path: Path):  # type: ignore[no-untyped-def]
        """Both client auth methods, each from a file: (AuthSettings fields, token endpoint check, assertions seen)."""
        token_url = httpserver.url_for("/token")
        if request.param == "client_secret":
            (tmp_path / "secret").write_text("s3cret-value\n")
            return {"client_secret_file": tmp_path / "secret", "scope": "system/*.write"}, basic_ok, []
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp_path / "jwt.pem").write_bytes(pem)
        claims: list[dict[str, Any]] = []

        def check(request: Request) -> bool:
            assertion = request.form.get("client_assertion", "")
            claims.append(jwt.decode(assertion, key.public_key(), algorithms=["RS384"], audience=token_url))
            return "Authorization" not in request.headers

        fields = {"client_auth": "private_key_jwt", "private_key_file": tmp_path / "jwt.pem", "key_id": "k1"}
        return fields, check, claims

    def test_expiry_renews_the_token(self, httpserver: HTTPServer, credentials) -> None:  # type: ignore[no-untyped-def]
        """A token that would expire within the refresh margin is replaced before the next request (both methods)."""
        fields, check, claims = credentials
        tokens = TokenEndpoint(httpserver, check, expires_in=30)
        seen = self._fhir_accepting(httpserver, {"tok-1", "tok-2"})
        auth = AuthSettings(
            kind="oauth2", token_url=tokens.url, client_id="homeward", refresh_margin_seconds=60, **fields
        )
        deliver(fhir(httpserver, auth=auth), item(1), item(2))
        assert tokens.issued == ["tok-1", "tok-2"] and seen == ["Bearer tok-1", "Bearer tok-2"]
        if fields.get("client_auth") == "private_key_jwt":  # a fresh assertion per fetch, never replayed
            assert len(claims) == 2 and claims[0]["jti"] != claims[1]["jti"]

    def test_401_refreshes_the_token_once(self, httpserver: HTTPServer, credentials) -> None:  # type: ignore[no-untyped-def]
        """A 401 with a cached token fetches a new one and repeats the request once; a second 401 is the server's answer."""
        fields, check, _ = credentials
        tokens = TokenEndpoint(httpserver, check)
        seen = self._fhir_accepting(httpserver, {"tok-2"})  # tok-1 was revoked
        auth = AuthSettings(kind="oauth2", token_url=tokens.url, client_id="homeward", **fields)
        (result,) = deliver(fhir(httpserver, auth=auth), item(1))
        assert result["status"] == 200
        assert seen == ["Bearer tok-1", "Bearer tok-2"] and tokens.issued == ["tok-1", "tok-2"]
        seen.clear()
        # A fresh target gets tok-3, refused too; its one refresh (tok-4) is refused: that answer stands.
        with pytest.raises(PermanentDelivery):
            deliver(fhir(httpserver, auth=auth), item(2))
        assert seen == ["Bearer tok-3", "Bearer tok-4"]

    def test_refused_client_is_retryable_with_the_oauth_error(
        self, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("COUNCIL_SECRET", "wrong")
        tokens = TokenEndpoint(httpserver, basic_ok)
        self._fhir_accepting(httpserver, set())
        auth = AuthSettings(
            kind="oauth2", token_url=tokens.url, client_id="homeward", client_secret_env="COUNCIL_SECRET"
        )
        with pytest.raises(RetryableDelivery, match="HTTP 401 invalid_client"):
            deliver(fhir(httpserver, auth=auth), item(1))

    def test_private_key_jwt(self, httpserver: HTTPServer, tmp_path: Path) -> None:
        """private_key_jwt: a signed client assertion (iss = sub = client id, aud = token URL, kid) instead of a secret."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp_path / "jwt.pem").write_bytes(pem)
        token_url = httpserver.url_for("/token")
        claims: list[dict[str, Any]] = []

        def check(request: Request) -> bool:
            if request.form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return False
            assertion = request.form["client_assertion"]
            assert jwt.get_unverified_header(assertion)["kid"] == "k1"
            claims.append(jwt.decode(assertion, key.public_key(), algorithms=["RS384"], audience=token_url))
            return "Authorization" not in request.headers

        TokenEndpoint(httpserver, check)
        self._fhir_accepting(httpserver, {"tok-1"})
        auth = AuthSettings(
            kind="oauth2", token_url=token_url, client_id="homeward", client_auth="private_key_jwt",
            private_key_file=tmp_path / "jwt.pem", key_id="k1",
        )  # fmt: skip
        (result,) = deliver(fhir(httpserver, auth=auth), item(1))
        assert result["status"] == 200
        assert claims[0]["iss"] == claims[0]["sub"] == "homeward" and claims[0]["exp"] - claims[0]["iat"] == 300

    def test_missing_secret_fails_at_start_up(self, httpserver: HTTPServer) -> None:
        auth = AuthSettings(
            kind="oauth2", token_url="https://x/token", client_id="c", client_secret_env="NOT_SET_ANYWHERE"
        )
        with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
            build_target(fhir(httpserver, auth=auth))
        with pytest.raises(ValueError, match="client_secret_env or client_secret_file"):
            AuthSettings(kind="oauth2", token_url="https://x/token", client_id="c")


class TestModes:
    def test_batch_has_no_bundle_internal_references_and_fails_as_a_whole(self, httpserver: HTTPServer) -> None:
        bodies: list[dict[str, Any]] = []
        answers = [
            {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "200 OK"}}]},
            {
                "resourceType": "Bundle",
                "type": "batch-response",
                "entry": [
                    {"response": {"status": "200 OK"}},
                    {
                        "response": {
                            "status": "422 Unprocessable",
                            "outcome": {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "bad code"}]},
                        }
                    },
                ],
            },
        ]

        def handle(request: Request) -> Response:
            bodies.append(json.loads(request.get_data()))
            return Response(json.dumps(answers.pop(0)), 200, content_type="application/fhir+json")

        httpserver.expect_request("/fhir", method="POST").respond_with_handler(handle)
        (ok,) = deliver(fhir(httpserver, mode="batch"), item(1))
        assert ok["mode"] == "batch"
        assert bodies[0]["type"] == "batch" and "urn:uuid:" not in json.dumps(
            [e["resource"] for e in bodies[0]["entry"]]
        )
        encounter = next(e["resource"] for e in bodies[0]["entry"] if e["resource"]["resourceType"] == "Encounter")
        assert encounter["subject"]["identifier"]["system"] == "https://fhir.nhs.uk/Id/nhs-number"
        with pytest.raises(PermanentDelivery, match="batch entry HTTP 422") as failed:
            deliver(fhir(httpserver, mode="batch"), item(2))
        assert failed.value.status == 422 and "OperationOutcome" in (failed.value.outcome or "")
        assert failed.value.diagnostics == "bad code"

    def test_conditional_puts_each_resource_with_server_ids(self, httpserver: HTTPServer) -> None:
        """conditional: one PUT per entry, in order; later resources point at the ids the server gave earlier ones."""
        puts: list[tuple[str, dict[str, Any]]] = []

        def handle(request: Request) -> Response:
            body = json.loads(request.get_data())
            puts.append((request.full_path, body))
            rid = body.get("id") or f"id{len(puts)}"
            return Response(
                json.dumps({**body, "id": rid}),
                201,
                {"Location": f"{httpserver.url_for('/fhir')}/{body['resourceType']}/{rid}/_history/1"},
                content_type="application/fhir+json",
            )

        httpserver.expect_request(re.compile(r"/fhir/[A-Za-z]+(/.*)?"), method="PUT").respond_with_handler(handle)
        (result,) = deliver(fhir(httpserver, mode="conditional"), item(1))
        bundle = json.loads(BUNDLE)
        assert len(puts) == len(bundle["entry"]) == len(result["response"])
        assert puts[0][0].startswith("/fhir/Patient?identifier=")
        encounter = next(body for _, body in puts if body["resourceType"] == "Encounter")
        assert encounter["subject"] == {"reference": "Patient/id1"}
        assert "urn:uuid:" not in json.dumps([body for _, body in puts])

    def test_conditional_partial_failure_retries_the_whole_message(self, httpserver: HTTPServer) -> None:
        """conditional: a 503 part-way fails the message as retryable; the retry sends every PUT again, in order."""
        paths: list[str] = []
        versions: dict[str, int] = {}

        def handle(request: Request) -> Response:
            body = json.loads(request.get_data())
            paths.append(request.full_path)
            if body["resourceType"] == "Encounter" and paths.count(request.full_path) == 1:
                return Response("", 503)  # the server falls over after the Patient and Organization were written
            versions[request.full_path] = versions.get(request.full_path, 0) + 1
            rid = f"id{len(versions)}"
            return Response(json.dumps({**body, "id": rid}), 200, content_type="application/fhir+json")

        httpserver.expect_request(re.compile(r"/fhir/[A-Za-z]+(/.*)?"), method="PUT").respond_with_handler(handle)
        with pytest.raises(RetryableDelivery):
            deliver(fhir(httpserver, mode="conditional"), item(1))
        first = list(paths)
        assert first[-1].startswith("/fhir/Encounter?") and len(first) < len(json.loads(BUNDLE)["entry"])
        (result,) = deliver(fhir(httpserver, mode="conditional"), item(1))
        again = paths[len(first) :]
        assert again[: len(first)] == first and len(again) == len(result["response"])  # from the start, in order
        # Each PUT is conditional, so what the first try wrote is updated, never created twice.
        assert sorted(versions) == sorted(set(again)) and max(versions.values()) == 2

    def test_message_mode_posts_a_message_bundle(self, httpserver: HTTPServer) -> None:
        bodies: list[dict[str, Any]] = []

        def handle(request: Request) -> Response:
            bodies.append(json.loads(request.get_data()))
            return Response(
                json.dumps({"resourceType": "Bundle", "type": "message"}), 200, content_type="application/fhir+json"
            )

        httpserver.expect_request("/fhir/$process-message", method="POST").respond_with_handler(handle)
        deliver(fhir(httpserver, mode="message"), item(1), item(1))
        first, again = bodies
        assert first == again  # the same message always gives the same bytes (resend-safe)
        header = first["entry"][0]["resource"]
        assert first["type"] == "message" and header["resourceType"] == "MessageHeader"
        assert header["eventCoding"]["code"] == "servicerequest-request"
        focus = header["focus"][0]["reference"]
        assert next(e for e in first["entry"] if e["fullUrl"] == focus)["resource"]["resourceType"] == "ServiceRequest"
        assert all("request" not in e for e in first["entry"])
        Bundle.model_validate(first)  # a valid R4 message Bundle


class TestClassification:
    @pytest.mark.parametrize(
        ("status", "retryable"),
        [(408, True), (425, True), (429, True), (500, True), (502, True), (503, True), (504, True),
         (400, False), (403, False), (404, False), (409, False), (412, False), (422, False)],
    )  # fmt: skip
    def test_status_codes(self, httpserver: HTTPServer, status: int, retryable: bool) -> None:
        """408, 425, 429 and 5xx are retried; any other 4xx is permanent and keeps the server's OperationOutcome."""
        problem = {"resourceType": "OperationOutcome", "issue": [{"code": "invalid", "diagnostics": f"no {status}"}]}
        httpserver.expect_request("/fhir", method="POST").respond_with_json(problem, status=status)
        with pytest.raises(RetryableDelivery if retryable else PermanentDelivery) as failed:
            deliver(fhir(httpserver), item(1))
        assert failed.value.status == status and f"no {status}" in (failed.value.outcome or "")

    def test_connection_refused_is_retryable(self) -> None:
        """Nothing listening (the council's server is down): a transport error, retried."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again on leaving: nothing listens there
        with pytest.raises(RetryableDelivery, match="transport error"):
            deliver(TargetSettings(name="t", base_url=f"http://127.0.0.1:{port}/fhir"), item(1))

    def test_read_timeout_is_retryable(self, httpserver: HTTPServer) -> None:
        """A server slower than read_timeout_seconds: timed out, retried (the row is sent again later)."""
        import time

        def slow(request: Request) -> Response:
            time.sleep(1.5)
            return Response(json.dumps(OK), 200, content_type="application/fhir+json")

        httpserver.expect_request("/fhir", method="POST").respond_with_handler(slow)
        with pytest.raises(RetryableDelivery, match="timed out"):
            deliver(fhir(httpserver, read_timeout_seconds=0.3), item(1))


class TestTransport:
    def test_static_and_env_headers(self, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("COUNCIL_API_KEY", "k-123")
        httpserver.expect_request(
            "/fhir", method="POST", headers={"X-Source": "homeward", "X-Api-Key": "k-123"}
        ).respond_with_json(OK)
        (result,) = deliver(
            fhir(httpserver, headers={"X-Source": "homeward"}, headers_env={"X-Api-Key": "COUNCIL_API_KEY"}), item(1)
        )
        assert result["status"] == 200

    @pytest.fixture
    def tls_server(self, tmp_path: Path) -> Iterator[tuple[HTTPServer, trustme.CA, Path]]:
        ca = trustme.CA()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the client must show a certificate from this CA
        ca.configure_trust(context)
        server = HTTPServer(host="127.0.0.1", port=0, ssl_context=context)
        server.expect_request("/fhir", method="POST").respond_with_json(OK)
        server.start()
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        yield server, ca, ca_file
        server.clear()
        server.stop()

    def test_mutual_tls(self, tls_server: tuple[HTTPServer, trustme.CA, Path], tmp_path: Path) -> None:
        """With the client certificate the server requires, delivery works; without it, it is a retryable failure."""
        server, ca, ca_file = tls_server
        client = ca.issue_cert("homeward-client")
        client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
        url = server.url_for("/fhir")
        assert url.startswith("https://")
        mtls = TargetSettings(
            name="t", base_url=url, ca_file=ca_file,
            client_cert_file=tmp_path / "client.pem", client_key_file=tmp_path / "client.key",
        )  # fmt: skip
        (result,) = deliver(mtls, item(1))
        assert result["status"] == 200
        with pytest.raises(RetryableDelivery, match="transport error"):
            deliver(TargetSettings(name="t", base_url=url, ca_file=ca_file), item(1))


class TestConfiguration:
    def test_targets_from_toml(self, tmp_path: Path) -> None:
        """[[targets]] add named targets beside the default one; a directory target needs its dir."""
        config = tmp_path / "homeward.toml"
        config.write_text(
            '[fhir]\nbase_url = "http://127.0.0.1:9/fhir"\n\n'
            '[[targets]]\nname = "council-b"\nbase_url = "http://127.0.0.1:9/b"\nmode = "message"\n'
            "retry = { max_attempts = 3 }\n\n"
            f'[[targets]]\nname = "drop"\nkind = "directory"\ndir = "{tmp_path / "drop"}"\n'
        )
        settings = Settings.load(config, environ={})
        assert settings.targets[0].retry is not None and settings.targets[0].retry.max_attempts == 3
        targets = build_targets(settings)
        assert sorted(targets) == ["council-b", "default", "drop"]
        asyncio.run(targets["council-b"].aclose())
        asyncio.run(targets["default"].aclose())
        config.write_text('[[targets]]\nname = "x"\nkind = "directory"\n')
        with pytest.raises(ConfigError, match="needs dir"):
            Settings.load(config, environ={})
        config.write_text(
            '[[targets]]\nname = "x"\nbase_url = "http://a"\n\n[[targets]]\nname = "x"\nbase_url = "http://b"\n'
        )
        with pytest.raises(ConfigError, match="unique"):
            Settings.load(config, environ={})
