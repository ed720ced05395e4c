"""Snapshots for Homeward's profiles: R4 base elements with UK Core's and Homeward's differentials applied.

Servers validate against a profile's snapshot, and UK Core publishes differentials only, so the
snapshot is generated here from the R4 core definitions (the StructureDefinition bundles that
come with the test FHIR server's npm packages). The rules are the plain ones of the FHIR spec:
an element in a differential is merged into the element with the same id; a slice starts as a
copy of the sliced element; an element below a datatype starts as the datatype's own element.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Keys of an ElementDefinition that a differential adds to rather than replaces.
_APPENDED = ("constraint", "condition", "mapping", "alias")
# Keys a slice must not inherit from the element it slices.
_NOT_INHERITED_BY_SLICES = ("slicing",)


class Definitions:
    """The R4 core StructureDefinitions and terminology, read from FHIR JSON bundles."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.structures: dict[str, dict[str, Any]] = {}
        for name in ("profiles-types.json", "profiles-resources.json"):
            for entry in _read(self.folder / name).get("entry", []):
                resource = entry["resource"]
                if resource.get("resourceType") == "StructureDefinition":
                    self.structures[resource["url"]] = resource
        self.terminology: dict[str, dict[str, Any]] = {}
        for name in ("valuesets.json", "v3-codesystems.json"):
            path = self.folder / name
            if path.exists():
                for entry in _read(path).get("entry", []):
                    resource = entry["resource"]
                    self.terminology.setdefault(f"{resource['resourceType']}|{resource['url']}", resource)

    def structure(self, url: str) -> dict[str, Any]:
        if url.startswith("http://hl7.org/fhir/StructureDefinition/") or "/" not in url:
            url = f"http://hl7.org/fhir/StructureDefinition/{url.rsplit('/', 1)[-1]}"
        found = self.structures.get(url)
        if found is None:
            raise KeyError(f"no R4 StructureDefinition {url} in {self.folder}")
        return found

    def expand(self, value_set_url: str) -> list[dict[str, str]] | None:
        """The codes of an R4 ValueSet built from whole code systems or listed concepts; None when not expandable here."""
        vs = self.terminology.get(f"ValueSet|{value_set_url.split('|')[0]}")
        if vs is None or "compose" not in vs:
            return None
        codes: list[dict[str, str]] = []
        for include in vs["compose"].get("include", []):
            system = include.get("system")
            if system is None or "filter" in include or "valueSet" in include:
                return None
            if "concept" in include:
                codes += [{"system": system, "code": c["code"]} for c in include["concept"]]
                continue
            cs = self.terminology.get(f"CodeSystem|{system}")
            if cs is None:
                return None
            codes += [{"system": system, "code": code} for code in _all_codes(cs.get("concept", []))]
        return codes


def _all_codes(concepts: list[dict[str, Any]]) -> list[str]:
    found: list[str] = []
    for concept in concepts:
        found.append(concept["code"])
        found += _all_codes(concept.get("concept", []))
    return found


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def snapshot(base: list[dict[str, Any]], differential: list[dict[str, Any]], defs: Definitions) -> list[dict[str, Any]]:
    """A new snapshot: `base` (a snapshot's elements) with `differential` applied, in document order."""
    elements = copy.deepcopy(base)
    for diff in differential:
        index = _index(elements, diff["id"])
        if index is None:
            index = _create(elements, diff["id"], defs)
        _merge(elements[index], diff)
    return elements


def _index(elements: list[dict[str, Any]], element_id: str) -> int | None:
    for i, element in enumerate(elements):
        if element["id"] == element_id:
            return i
    return None


def _parent_id(element_id: str) -> str:
    return element_id.rsplit(".", 1)[0]


def _create(elements: list[dict[str, Any]], element_id: str, defs: Definitions) -> int:
    """Insert the element `element_id` (a slice, or an element below a datatype) and return its index."""
    last = element_id.rsplit(".", 1)[-1]
    if ":" in last:  # a slice: a copy of the element it slices, placed after that element's other content
        sliced_id = element_id[: element_id.rfind(":")]
        sliced = _index(elements, sliced_id)
        if sliced is None:
            sliced = _create(elements, sliced_id, defs)
        if "slicing" not in elements[sliced] and sliced_id.endswith(("extension", "modifierExtension")):
            # Extensions are sliced by url in every profile (FHIR R4 "Extensions" 2.1.0.4).
            elements[sliced]["slicing"] = {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}
        template = {k: v for k, v in copy.deepcopy(elements[sliced]).items() if k not in _NOT_INHERITED_BY_SLICES}
        template["id"] = element_id
        template["sliceName"] = last.split(":", 1)[1]
        position = _end_of(elements, sliced_id)
        elements.insert(position, template)
        return position
    parent_id = _parent_id(element_id)
    parent = _index(elements, parent_id)
    if parent is None:
        parent = _create(elements, parent_id, defs)
    parent_element = elements[parent]
    type_code = parent_element.get("type", [{}])[0].get("code")
    if type_code is None:
        raise KeyError(f"cannot expand {element_id}: {parent_id} has no type")
    datatype = defs.structure(type_code)
    wanted = f"{type_code}.{last.split(':')[0]}"
    source = next((e for e in datatype["snapshot"]["element"] if e["id"] == wanted), None)
    if source is None:
        raise KeyError(f"cannot expand {element_id}: no element {wanted} in {type_code}")
    template = copy.deepcopy(source)
    template["id"] = element_id
    template["path"] = f"{parent_element['path']}.{last.split(':')[0]}"
    position = _end_of(elements, parent_id)
    elements.insert(position, template)
    return position


def _end_of(elements: list[dict[str, Any]], element_id: str) -> int:
    """The index just after `element_id` and everything below it (children and slices)."""
    position = _index(elements, element_id)
    assert position is not None
    position += 1
    while position < len(elements):
        other = elements[position]["id"]
        if not (other.startswith(element_id + ".") or other.startswith(element_id + ":")):
            break
        position += 1
    return position


def _merge(element: dict[str, Any], diff: dict[str, Any]) -> None:
    for key, value in diff.items():
        if key in ("id", "path"):
            continue
        if key in _APPENDED and key in element:
            element[key] = element[key] + [v for v in value if v not in element[key]]
        elif key == "type" and "type" in element:
            element[key] = copy.deepcopy(value)
        elif key.startswith(("fixed", "pattern")):
            for old in [k for k in element if k.startswith(("fixed", "pattern"))]:
                del element[old]
            element[key] = copy.deepcopy(value)
        else:
            element[key] = copy.deepcopy(value)
