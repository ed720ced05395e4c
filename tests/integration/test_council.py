"""The stand-in council server itself: its duplicate count must see a resource created twice."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
from pytest_httpserver import HTTPServer

from tests.conftest import GOLDEN
from tests.council import Council

BUNDLE = json.loads((GOLDEN / "ADT_A03" / "basic.bundle.json").read_text())
NHS = "Patient|https://fhir.nhs.uk/Id/nhs-number|9449305552"


def post(council: Council, bundle: dict[str, Any]) -> list[str]:
    response = httpx.post(council.url, json=bundle, timeout=10)
    assert response.status_code == 200
    return [e["response"]["location"] for e in response.json()["entry"]]


def test_conditional_updates_make_versions_not_resources(httpserver: HTTPServer) -> None:
    """The same transaction twice: every resource once, at version 2."""
    council = Council(httpserver)
    first, second = post(council, BUNDLE), post(council, BUNDLE)
    assert [loc.rsplit("/", 1)[0] for loc in first] == [loc.rsplit("/", 1)[0] for loc in second]
    assert all(loc.endswith("/_history/2") for loc in second)
    assert council.creates[NHS] == 1 and set(council.creates.values()) == {1}


def test_plain_creates_are_counted_as_duplicates(httpserver: HTTPServer) -> None:
    """A POST of the same Patient twice (not idempotent) leaves two resources with one NHS number."""
    council = Council(httpserver)
    bundle = copy.deepcopy(BUNDLE)
    for entry in bundle["entry"]:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
    post(council, bundle)
    post(council, bundle)
    assert council.creates[NHS] == 2
