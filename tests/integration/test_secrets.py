"""Secrets never reach the log: `homeward serve` at debug level, both OAuth2 client auth methods, a refused
client, a revoked token refreshed on 401, and the audit key; every secret and token searched for in the log."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request

from tests.council import Council
from tests.integration.test_delivery import adt, routed_mappings, send, wait_until
from tests.integration.test_targets import TokenEndpoint

SECRET = "b-secret-31337-zz"
AUDIT_KEY = "audit-key-never-logged-0123456789"


def test_no_secret_or_token_in_the_log(serve, httpserver: HTTPServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "jwt.pem").write_bytes(pem)
    assertions: list[str] = []
    refused_once: list[bool] = []
    basic = "Basic " + base64.b64encode(f"homeward-b:{SECRET}".encode()).decode()

    def check(request: Request) -> bool:
        if "client_assertion" in request.form:
            assertions.append(request.form["client_assertion"])
            return True
        if not refused_once:  # the first client_secret fetch is refused: auth.token_refused, retried
            refused_once.append(True)
            return False
        return request.headers.get("Authorization") == basic

    tokens = TokenEndpoint(httpserver, check)
    council_a, council_b = Council(httpserver, "/a"), Council(httpserver, "/b")
    # council-a revoked the first token it sees: a 401, a fresh token, the request once more.
    first_token: list[str] = []

    def revoke_first(control_id: str, attempt: int):  # type: ignore[no-untyped-def]
        bearer = council_a.headers[-1].get("Authorization", "")
        first_token.extend([] if first_token else [bearer])
        return (401, {}, None) if bearer == first_token[0] else None

    council_a.fail = revoke_first
    mappings = routed_mappings(tmp_path, "[council-a, council-b]")
    config = tmp_path / "homeward.toml"
    config.write_text(
        f'[[targets]]\nname = "council-a"\nbase_url = "{council_a.url}"\n'
        f'auth = {{ kind = "oauth2", token_url = "{tokens.url}", client_id = "homeward-a",'
        f' client_auth = "private_key_jwt", private_key_file = "{tmp_path / "jwt.pem"}", key_id = "k1" }}\n\n'
        f'[[targets]]\nname = "council-b"\nbase_url = "{council_b.url}"\n'
        f'auth = {{ kind = "oauth2", token_url = "{tokens.url}", client_id = "homeward-b",'
        ' client_secret_env = "COUNCIL_B_SECRET" }\n'
        "retry = { initial_seconds = 0.05, max_seconds = 0.2 }\n"
    )
    process = serve(
        "--config", str(config), HOMEWARD_MAPPINGS_DIR=str(mappings), HOMEWARD_LOG_LEVEL="debug",
        HOMEWARD_AUDIT_HMAC_KEY=AUDIT_KEY, COUNCIL_B_SECRET=SECRET,
        HOMEWARD_RETRY_INITIAL_SECONDS="0.05", HOMEWARD_RETRY_MAX_SECONDS="0.2",
    )  # fmt: skip
    assert send(process.port, adt("SEC-1"), adt("SEC-2", patient=2, visit="V2")) == ["AA", "AA"]
    wait_until(lambda: len(council_a.applied) == len(council_b.applied) == 2, what="both targets delivered")
    process.wait_for_log("auth.token_refused")
    assert process.stop() == 0

    log = process.log_path.read_text()
    events = [line.get("event") for line in process.log_lines()]
    assert events.count("auth.token_fetched") >= 3 and "message.retry_scheduled" in events  # the paths ran
    assert len(assertions) >= 2 and len(tokens.issued) >= 3
    assert len({h.get("Authorization") for h in council_a.headers}) == 2  # the revoked token, then a fresh one
    pem_lines = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    secrets = [SECRET, AUDIT_KEY, basic, *tokens.issued, *assertions, *pem_lines]
    leaked = [s for s in secrets if s in log]
    assert not leaked, f"{len(leaked)} secret(s) in the log"
