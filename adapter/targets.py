"""Where bundles go: a FHIR server over HTTP (httpx) or a directory drop. httpx errors are translated here.

Each target's send() returns a detail dict for the audit record, or raises RetryableDelivery /
PermanentDelivery; the forwarder decides on nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from adapter import modes
from adapter.auth import OAuth2ClientCredentials, read_secret
from adapter.config import AuthSettings, Settings, TargetSettings
from adapter.errors import ConfigError, PermanentDelivery, RetryableDelivery
from adapter.http_transport import asyncio_transport
from adapter.store.base import OutboxItem

FHIR_JSON = "application/fhir+json"
# 408 request timeout, 425 too early, 429 too many requests: the server asks us to come back.
RETRYABLE_STATUS = frozenset({408, 425, 429})


class Target(Protocol):
    name: str

    async def send(self, item: OutboxItem) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


@contextlib.contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate httpx transport errors: every one of them may pass, so all are retryable."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise RetryableDelivery(f"timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise RetryableDelivery(f"transport error ({type(exc).__name__})") from exc
    except ssl.SSLError as exc:  # TLS 1.3 reports a refused client certificate on the first read, unwrapped
        raise RetryableDelivery(f"transport error (TLS: {exc.reason})") from exc


class FhirTarget:
    """Sends each message's Bundle to a FHIR server in the target's delivery mode (adapter/modes.py)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        mode: str = "transaction",
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        auth: AuthSettings | None = None,
    ):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.mode = mode
        # Parsed once: httpx parses a str URL on every request (about 7% of a POST's CPU, measured).
        self._url = httpx.URL(self.base_url or "/")
        self._message_url = httpx.URL(f"{self.base_url}/$process-message")
        verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        # Sized to the forwarder's in-flight cap: one connection per request, kept alive.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=limits,
            # Every request this client sends carries a FHIR resource or Bundle; the Content-Type is a
            # default header rather than one merged into each request.
            headers={"Accept": FHIR_JSON, "User-Agent": "homeward", **(headers or {}), "Content-Type": FHIR_JSON},
            # About a quarter less CPU a POST than httpx's default transport (adapter/http_transport.py, bench_http.py).
            transport=transport or asyncio_transport(verify, limits),
            verify=verify,
        )
        self._token_client: httpx.AsyncClient | None = None
        if auth is not None and auth.kind == "oauth2":
            self._token_client = httpx.AsyncClient(
                timeout=httpx.Timeout(read_timeout, connect=connect_timeout), transport=transport, verify=verify
            )
            self.client.auth = OAuth2ClientCredentials(auth, name, self._token_client)

    async def send(self, item: OutboxItem) -> dict[str, Any]:
        started = time.perf_counter()
        status = 200
        if self.mode == "conditional":
            locations = await self._send_each(item)
        else:
            url, body = self._url, item.bundle
            if self.mode == "batch":
                body = orjson.dumps(modes.as_batch(orjson.loads(item.bundle)))
            elif self.mode == "message":
                url = self._message_url
                seed = f"{item.sending_facility}|{item.message_control_id}|{item.inbound_id}"
                body = orjson.dumps(modes.as_message(orjson.loads(item.bundle), seed, source="urn:homeward"))
            response = await self._post(url, body)
            if self.mode == "batch":
                _check_batch(response, self.name)
            locations, status = _entry_locations(response), response.status_code
        return {
            "target": self.name,
            "mode": self.mode,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "response": locations,
        }

    async def _post(self, url: httpx.URL, body: bytes) -> httpx.Response:
        with map_exceptions():
            response = await self.client.post(url, content=body)
        _check(response, self.name)
        return response

    async def _send_each(self, item: OutboxItem) -> list[str]:
        """One conditional PUT per entry; later entries refer to the ids the server gave earlier ones."""
        bundle = orjson.loads(item.bundle)
        refs = modes.identifier_refs(bundle)
        locations = []
        for full_url, url, resource in modes.conditional_requests(bundle):
            body = orjson.dumps(modes.rewrite_references(resource, refs))
            with map_exceptions():
                response = await self.client.put(f"{self.base_url}/{url}", content=body)
            _check(response, self.name)
            location = _location(response, resource.get("resourceType", ""))
            locations.append(location)
            if full_url and location:
                refs[full_url] = {"reference": "/".join(location.split("/")[:2])}
        return locations

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._token_client is not None:
            await self._token_client.aclose()


def _check(response: httpx.Response, name: str) -> None:
    """Raise for a non-2xx answer: retryable (408/425/429/5xx, with Retry-After) or permanent (OperationOutcome kept)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    outcome = response.text[:8192] if response.content else None
    if status in RETRYABLE_STATUS or status >= 500:
        raise RetryableDelivery(
            f"HTTP {status} from {name}",
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            outcome=outcome,
        )
    raise PermanentDelivery(
        f"HTTP {status} from {name}: {_coded_issue(outcome)}",
        status=status,
        outcome=outcome,
        diagnostics=_diagnostics(outcome),
    )


def _check_batch(response: httpx.Response, name: str) -> None:
    """A batch-response is 200 even when entries failed: any failed entry fails the whole message."""
    try:
        entries = orjson.loads(response.content).get("entry", [])
    except (orjson.JSONDecodeError, AttributeError):
        raise RetryableDelivery(f"unreadable batch-response from {name}") from None
    worst: tuple[int, str | None] | None = None
    for entry in entries:
        text = str(entry.get("response", {}).get("status", "200"))
        code = int(text.split()[0]) if text.split() and text.split()[0].isdigit() else 500
        if code >= 300:
            outcome = entry.get("response", {}).get("outcome")
            retryable = code in RETRYABLE_STATUS or code >= 500
            if worst is None or retryable:
                worst = (code, orjson.dumps(outcome).decode() if outcome else None)
    if worst is None:
        return
    code, outcome = worst
    if code in RETRYABLE_STATUS or code >= 500:
        raise RetryableDelivery(f"batch entry HTTP {code} from {name}", status=code, outcome=outcome)
    raise PermanentDelivery(
        f"batch entry HTTP {code} from {name}: {_coded_issue(outcome)}",
        status=code,
        outcome=outcome,
        diagnostics=_diagnostics(outcome),
    )


def _location(response: httpx.Response, resource_type: str) -> str:
    """Type/id[/_history/v] of what a PUT wrote: the Location header, else the returned resource's id."""
    header = response.headers.get("Location") or response.headers.get("Content-Location") or ""
    if header:
        parts = header.rstrip("/").split("/")
        if resource_type in parts:
            return "/".join(parts[parts.index(resource_type) :])
    try:
        body = orjson.loads(response.content)
        return f"{body['resourceType']}/{body['id']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _entry_locations(response: httpx.Response) -> list[str]:
    """The resource locations (with versions) a transaction-response reports, for the audit record."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(body, dict):
        return []
    return [str(e.get("response", {}).get("location", "")) for e in body.get("entry", []) if isinstance(e, dict)]


def _coded_issue(outcome: str | None) -> str:
    """The OperationOutcome's first issue as coded fields and where (severity, code, details code, expression).

    Never the free text: servers quote the refused resource in `diagnostics` and `details.text`,
    and this goes into logs and audit records.
    """
    if not outcome:
        return "no OperationOutcome"
    try:
        body = orjson.loads(outcome)
        issue = body.get("issue", [{}])[0]
        codings = (issue.get("details") or {}).get("coding") or [{}]
        parts = [issue.get("severity", ""), issue.get("code", ""), codings[0].get("code", "")]
        text = " ".join(str(p) for p in parts if p) or "issue without a code"
        where = ", ".join(str(w) for w in issue.get("expression", []) or issue.get("location", []))
        return f"{text} ({where})" if where else text
    except (orjson.JSONDecodeError, AttributeError, IndexError, TypeError):
        return "unreadable OperationOutcome"


def _diagnostics(outcome: str | None) -> str:
    """The first issue's free text, for people reading the dead letter (may quote patient data)."""
    try:
        issue = orjson.loads(outcome or "{}").get("issue", [{}])[0]
        return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
    except (orjson.JSONDecodeError, AttributeError, IndexError, TypeError):
        return ""


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class DirectoryTarget:
    """Writes one bundle JSON file per message, atomically (temp file, fsync, rename).

    The name is fixed by the message (sending facility, MSH-10, outbox id), so a redelivery after a
    crash rewrites the same file instead of adding a second one.
    """

    def __init__(self, name: str, directory: Path):
        self.name = name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def file_name(self, item: OutboxItem) -> str:
        facility = _UNSAFE.sub("_", item.sending_facility or "unknown")
        control_id = _UNSAFE.sub("_", item.message_control_id or "none")
        return f"{facility}_{control_id}_{item.id}.json"

    async def send(self, item: OutboxItem) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self._write, item)
        except OSError as exc:
            raise RetryableDelivery(f"cannot write to {self.directory} ({exc.strerror})") from exc
        return {
            "target": self.name,
            "file": path.name,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    def _write(self, item: OutboxItem) -> Path:
        final = self.directory / self.file_name(item)
        tmp = self.directory / f".{final.name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(item.bundle)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    async def aclose(self) -> None:
        return None


DEFAULT_TARGET = "default"


def client_ssl_context(t: TargetSettings) -> ssl.SSLContext | None:
    """The TLS context for a target with its own CA and/or client certificate (mutual TLS); None: system defaults."""
    if t.ca_file is None and t.client_cert_file is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(t.ca_file) if t.ca_file else None)
        if t.client_cert_file is not None and t.client_key_file is not None:
            context.load_cert_chain(str(t.client_cert_file), str(t.client_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"target '{t.name}': cannot load TLS files ({exc})") from exc
    return context


def build_target(t: TargetSettings) -> Target:
    if t.kind == "directory":
        assert t.dir is not None
        return DirectoryTarget(t.name, t.dir)
    headers = dict(t.headers)
    for header, env in t.headers_env.items():
        headers[header] = read_secret(env, None, f"target '{t.name}' header {header}")
    return FhirTarget(
        t.name,
        t.base_url,
        connect_timeout=t.connect_timeout_seconds,
        read_timeout=t.read_timeout_seconds,
        max_connections=t.max_in_flight,
        mode=t.mode,
        headers=headers,
        ssl_context=client_ssl_context(t),
        auth=t.auth,
    )


def build_targets(settings: Settings) -> dict[str, Target]:
    """Every delivery target by name.

    "default" is the single target of the [fhir] / [outbox] sections: the FHIR server when
    fhir.base_url is set, else the directory drop (left out when [[targets]] are configured and
    fhir.base_url is empty). [[targets]] add named targets; one named "default" replaces it.
    """
    targets: dict[str, Target] = {}
    if settings.fhir.base_url:
        targets[DEFAULT_TARGET] = FhirTarget(
            DEFAULT_TARGET,
            settings.fhir.base_url,
            connect_timeout=settings.fhir.connect_timeout_seconds,
            read_timeout=settings.fhir.read_timeout_seconds,
            max_connections=settings.fhir.max_in_flight,
            mode=settings.fhir.mode,
        )
    elif not settings.targets:
        targets[DEFAULT_TARGET] = DirectoryTarget(DEFAULT_TARGET, settings.outbox.dir)
    for t in settings.targets:
        targets[t.name] = build_target(t)
    return targets
