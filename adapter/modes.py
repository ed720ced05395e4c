"""Delivery modes: the stored transaction Bundle reshaped for what a server supports.

- transaction: the Bundle as stored, POSTed to the base URL (all or nothing).
- batch: the same entries as a `batch` (each entry on its own); references between entries
  become Reference.identifier, since a server resolves `urn:uuid:` only inside a transaction.
- conditional: one conditional PUT per entry, in Bundle order, references rewritten to the ids the
  server gave earlier entries; a failure part-way retries the whole message, which is safe because
  every entry is a conditional update (or a PUT to a fixed id).
- message: a `message` Bundle with a MessageHeader first (BaRS-style, focus on the ServiceRequest),
  POSTed to `$process-message`.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any
from urllib.parse import unquote

MESSAGE_EVENT_SYSTEM = "https://fhir.nhs.uk/CodeSystem/message-events-bars"
MESSAGE_EVENT_CODE = "servicerequest-request"
MESSAGEHEADER_PROFILE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-MessageHeader"
# uuid5 namespace for ids this module makes: the same message always gives the same MessageHeader id.
NAMESPACE = uuid.UUID("0c3b8a4e-5d0f-5a8e-b7a1-6a1c2e9d4f10")


def identifier_of(url: str) -> dict[str, str] | None:
    """`Type?identifier=system|value` -> {"system", "value"} (None for other URLs)."""
    if "?identifier=" not in url:
        return None
    token = unquote(url.split("?identifier=", 1)[1].split("&", 1)[0])
    # The first unescaped `|` ends the system; a backslash escapes the character after it (FHIR R4 search).
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in token:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "|" and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if not parts:
        return {"value": "".join(current)}
    system, value = parts[0], "".join(current)
    return {"system": system, "value": value} if system else {"value": value}


def rewrite_references(node: Any, replace: dict[str, dict[str, Any]]) -> Any:
    """A copy of `node` where every Reference whose .reference is a key of `replace` gets that value instead."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in replace:
            rest = {k: v for k, v in node.items() if k != "reference"}
            return {**rest, **replace[ref]}
        return {k: rewrite_references(v, replace) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite_references(v, replace) for v in node]
    return node


def identifier_refs(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """fullUrl -> a Reference by identifier (conditional entries) or by id (PUT Type/id)."""
    refs: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        full_url, url = entry.get("fullUrl"), entry.get("request", {}).get("url", "")
        rtype = entry.get("resource", {}).get("resourceType", "")
        if not full_url:
            continue
        ident = identifier_of(url)
        if ident is not None:
            refs[full_url] = {"type": rtype, "identifier": ident}
        elif "/" in url and "?" not in url:
            refs[full_url] = {"reference": url}
    return refs


def as_batch(bundle: dict[str, Any]) -> dict[str, Any]:
    out = rewrite_references(bundle, identifier_refs(bundle))
    out["type"] = "batch"
    return out  # type: ignore[no-any-return]


def as_message(bundle: dict[str, Any], seed: str, source: str) -> dict[str, Any]:
    """A message Bundle: MessageHeader first, then every resource (no request parts); ids derived from `seed`."""
    entries = [{"fullUrl": e["fullUrl"], "resource": copy.deepcopy(e["resource"])} for e in bundle.get("entry", [])]
    focus = [{"reference": e["fullUrl"]} for e in entries if e["resource"].get("resourceType") == "ServiceRequest"] or [
        {"reference": e["fullUrl"]} for e in entries[:1]
    ]
    header_id = str(uuid.uuid5(NAMESPACE, f"MessageHeader|{seed}"))
    header = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "meta": {"profile": [MESSAGEHEADER_PROFILE]},
        "eventCoding": {"system": MESSAGE_EVENT_SYSTEM, "code": MESSAGE_EVENT_CODE},
        "source": {"name": "Homeward", "endpoint": source},
        "focus": focus,
    }
    recorded = next(
        (e["resource"].get("recorded") for e in entries if e["resource"].get("resourceType") == "Provenance"), None
    )
    message: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid5(NAMESPACE, f"Bundle|{seed}")),
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid5(NAMESPACE, seed)}"},
        "type": "message",
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }
    if recorded:
        message["timestamp"] = recorded
    return message


def conditional_requests(bundle: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The entries as (fullUrl, url, resource), in order, for one request each."""
    return [
        (e.get("fullUrl", ""), e["request"]["url"], e["resource"])
        for e in bundle.get("entry", [])
        if e.get("request", {}).get("method") == "PUT"
    ]
