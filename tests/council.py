"""A stand-in for the council's FHIR server on pytest-httpserver: applies transactions, counts effects.

It honours conditional updates the way a FHIR server does (`PUT Type?identifier=...` creates once,
then updates), so a repeated delivery shows up as a second version, never as a second resource.
`fail` scripts answers (503, 429 with Retry-After, 422 with an OperationOutcome) before a message
is applied.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
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
        self.versions: Counter[str] = Counter()  # conditional URL -> versions written
        self.creates: Counter[str] = Counter()  # conditional URL -> times a new resource was created
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
            entries = []
            for entry in bundle["entry"]:
                url = entry["request"]["url"]
                if self.versions[url] == 0:
                    self.creates[url] += 1
                self.versions[url] += 1
                entries.append({"response": {"status": "200 OK", "location": f"{url}/_history/{self.versions[url]}"}})
            self.applied.append(control_id)
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
        return Response(json.dumps(body), 200, content_type="application/fhir+json")
