"""Outbound auth for FHIR targets: OAuth2 client credentials (client secret or private_key_jwt) as an httpx.Auth.

The token is cached until shortly before it expires and fetched again once when the server answers
401 (a revoked or rotated token). Secrets are read from environment variables or files when a token
is needed (so a rotated file is picked up) and never logged.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import httpx
import structlog

from adapter.config import AuthSettings
from adapter.errors import ConfigError, RetryableDelivery

log = structlog.get_logger("homeward.auth")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# A client assertion is good for this long (SMART backend services: no more than five minutes).
ASSERTION_LIFETIME_SECONDS = 300
# When the token response has no expires_in, assume this (RFC 6749 leaves it optional).
DEFAULT_EXPIRES_IN = 300


def read_secret(env: str, file: Path | None, what: str) -> str:
    """A secret from the named environment variable, else from the file; ConfigError if neither has it."""
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file}: {exc.strerror}") from exc
    raise ConfigError(f"{what}: no secret configured")


class OAuth2ClientCredentials(httpx.Auth):
    """Bearer tokens from a token endpoint, client_credentials grant."""

    def __init__(
        self,
        settings: AuthSettings,
        target: str,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.target = target
        self.client = client  # for the token endpoint (same TLS settings as the target)
        self.clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._credentials()  # fail at start-up, not on the first message

    def _credentials(self) -> dict[str, Any]:
        s = self.settings
        what = f"target '{self.target}' auth"
        if s.client_auth == "client_secret":
            return {"auth": (s.client_id, read_secret(s.client_secret_env, s.client_secret_file, what))}
        import jwt  # PyJWT, and cryptography under it: ~11 MB a process, so only where a target signs

        key = read_secret(s.private_key_env, s.private_key_file, what)
        now = int(self.clock())
        claims = {
            "iss": s.client_id,
            "sub": s.client_id,
            "aud": s.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
        }
        headers = {"kid": s.key_id} if s.key_id else None
        try:
            assertion = jwt.encode(claims, key, algorithm=s.algorithm, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigError(f"{what}: cannot sign the client assertion ({type(exc).__name__})") from exc
        return {"data": {"client_assertion_type": JWT_BEARER, "client_assertion": assertion}}

    async def token(self, *, renew: bool = False, stale: str | None = None) -> str:
        """A valid access token; `renew` fetches a new one unless another request already replaced `stale`."""
        async with self._lock:
            fresh = self._token is not None and self.clock() < self._expires_at - self.settings.refresh_margin_seconds
            if fresh and not (renew and self._token == stale):
                assert self._token is not None
                return self._token
            self._token, self._expires_at = await self._fetch()
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        s = self.settings
        credentials = self._credentials()
        data = {"grant_type": "client_credentials", **credentials.pop("data", {})}
        if s.scope:
            data["scope"] = s.scope
        try:
            response = await self.client.post(
                s.token_url, data=data, headers={"Accept": "application/json"}, **credentials
            )
        except httpx.HTTPError as exc:
            raise RetryableDelivery(f"token endpoint unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            # A refused client is a configuration problem, not the message's: retry (and dead-letter
            # only by the usual limits) so that fixing the secret lets everything through.
            error = _oauth_error(response)
            raise RetryableDelivery(f"token endpoint answered HTTP {response.status_code} {error}".rstrip())
        try:
            body = response.json()
            token = str(body["access_token"])
            expires_in = float(body.get("expires_in", DEFAULT_EXPIRES_IN))
        except (ValueError, KeyError, TypeError) as exc:
            raise RetryableDelivery("token endpoint sent no access_token") from exc
        log.info("auth.token_fetched", target=self.target, expires_in=expires_in, client_auth=s.client_auth)
        return token, self.clock() + expires_in

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Once: the token may have been revoked early. A second 401 goes back to the forwarder.
            await response.aread()
            log.info("auth.token_refused", target=self.target)
            token = await self.token(renew=True, stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


def _oauth_error(response: httpx.Response) -> str:
    """The RFC 6749 5.2 error code, if the endpoint sent one (never the description: it may echo input)."""
    try:
        return str(response.json().get("error", ""))
    except (ValueError, AttributeError):
        return ""
