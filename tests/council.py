"""A stand-in for the council's FHIR server on pytest-httpserver: applies transactions, counts effects.

It keeps resources the way a FHIR server does: `PUT Type?identifier=...` updates the one resource
with that identifier or creates it, `PUT Type/id` writes that id, and a plain `POST Type` always
creates. It counts, per identifier, how many resources were created carrying it (`creates`), so a
repeated delivery shows up as a second version, and only a request that is not idempotent (a POST,
or a conditional URL that changed between deliveries) as a second resource. `fail` scripts answers
(503, 429 with Retry-After, 422 with an OperationOutcome) before a message is applied.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

Answer = tuple[int, dict[str, str], dict[str, Any] | None]


def control_id_of(bundle: dict[str, Any]) -> str:
    """MSH-10, from the Provenance the mapping adds (entity.what.identifier)."""
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "Provenance":
            for entity in resource.get("entity", []):
                identifier = entity.get("what", {}).get("identifier", {})
                if identifier.get("system", "").endswith("message-control-id"):
                    return str(identifier["value"])
    return ""


def outcome(text: str, code: str = "invalid") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class Council:
    """Install with `Council(httpserver)`; the FHIR base URL is `council.url`."""

    def __init__(self, server: HTTPServer, path: str = "/fhir"):
        self.server = server
        self.url = server.url_for(path)
        self.lock = threading.Lock()
        self.posts: list[str] = []  # control id of every POST, answered or not
        self.applied: list[str] = []  # control id of every applied transaction, in order
        self.versions: Counter[str] = Counter()  # "Type/id" -> versions written
        # "Type|system|value" of each identifier (or "Type/id" without one) -> resources created carrying it
        self.creates: Counter[str] = Counter()
        self.resources: dict[str, dict[str, Any]] = {}  # "Type/id" -> the current resource
        self.holders: defaultdict[str, set[str]] = defaultdict(set)  # "Type|system|value" -> "Type/id"s
        self.headers: list[dict[str, str]] = []
        # (control id, attempt number starting at 1) -> an answer instead of applying, or None
        self.fail: Callable[[str, int], Answer | None] = lambda control_id, attempt: None
        server.expect_request(path, method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        bundle = json.loads(request.get_data())
        control_id = control_id_of(bundle)
        with self.lock:
            self.posts.append(control_id)
            self.headers.append(dict(request.headers))
            attempt = self.posts.count(control_id)
            answer = self.fail(control_id, attempt)
            if answer is not None:
                status, headers, body = answer
                return Response(json.dumps(body) if body else "", status, headers, content_type="application/fhir+json")
            entries = [{"response": self._write(entry)} for entry in bundle["entry"]]
            self.applied.append(control_id)
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
        return Response(json.dumps(body), 200, content_type="application/fhir+json")

    def _write(self, entry: dict[str, Any]) -> dict[str, str]:
        """Apply one entry as a FHIR server would; the caller holds the lock."""
        resource, method, url = entry["resource"], entry["request"]["method"], entry["request"]["url"]
        resource_type, _, rest = url.partition("?") if "?" in url else url.partition("/")
        if method == "PUT" and "?" in url:  # conditional update: the one match, or a new resource
            token = rest.removeprefix("identifier=")
            matches = self.holders[f"{resource_type}|{token}"]
            if len(matches) > 1:
                raise AssertionError(
                    f"{len(matches)} {resource_type} resources match {token}: not a conditional update"
                )
            key = next(iter(matches)) if matches else f"{resource_type}/{len(self.resources) + 1}"
        elif method == "PUT":
            key = url
        else:  # POST creates, whatever it holds
            key = f"{resource_type}/{len(self.resources) + 1}"
        created = key not in self.resources
        for token in tokens(resource) or [key]:
            if key not in self.holders[f"{resource_type}|{token}"]:
                self.holders[f"{resource_type}|{token}"].add(key)
                self.creates[f"{resource_type}|{token}"] += 1
        self.resources[key] = resource
        self.versions[key] += 1
        return {"status": "201 Created" if created else "200 OK", "location": f"{key}/_history/{self.versions[key]}"}


def tokens(resource: dict[str, Any]) -> list[str]:
    """`system|value` of each identifier of a resource."""
    identifiers = resource.get("identifier", [])
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    return [f"{i.get('system', '')}|{i.get('value', '')}" for i in identifiers]
