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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from adapter.errors import PermanentDelivery, RetryableDelivery
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


class FhirTarget:
    """POSTs each transaction Bundle to the server's base URL."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            # Sized to the forwarder's in-flight cap: one connection per request, kept alive.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Accept": FHIR_JSON, "User-Agent": "homeward"},
            transport=transport,
        )

    async def send(self, item: OutboxItem) -> dict[str, Any]:
        started = time.perf_counter()
        with map_exceptions():
            response = await self.client.post(
                self.base_url or "/", content=item.bundle, headers={"Content-Type": FHIR_JSON}
            )
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        status = response.status_code
        if 200 <= status < 300:
            return {
                "target": self.name,
                "status": status,
                "duration_ms": duration_ms,
                "response": _entry_locations(response),
            }
        outcome = response.text[:8192] if response.content else None
        if status in RETRYABLE_STATUS or status >= 500:
            raise RetryableDelivery(
                f"HTTP {status} from {self.name}",
                status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                outcome=outcome,
            )
        raise PermanentDelivery(
            f"HTTP {status} from {self.name}: {_coded_issue(outcome)}",
            status=status,
            outcome=outcome,
            diagnostics=_diagnostics(outcome),
        )

    async def aclose(self) -> None:
        await self.client.aclose()


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
