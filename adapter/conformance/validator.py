"""Offline validation: FHIR R4 structure (fhir.resources R4B models) and Homeward's profiles, by element path.

A profile is checked from its snapshot: cardinality, fixed and pattern values, slices, required
bindings (expansions from conformance/Bundle-homeward-terminology.json) and FHIRPath invariants
(fhirpathpy). Every issue names the element path and never quotes a value: it may be patient data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from adapter.conformance.artefacts import PROFILES, TERMINOLOGY_FILE, UKCORE_FOLDER

# On every element of every resource and checked by the R4B models already (or not expressible offline).
_SKIPPED_INVARIANTS = frozenset({"ele-1", "ext-1", "dom-2", "dom-3", "dom-4", "dom-5", "dom-6"})


@dataclass(frozen=True, slots=True)
class Issue:
    """One finding: where, how bad, what is wrong, and which rule says so."""

    path: str
    severity: str  # "error" or "warning"
    message: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {self.severity}: {self.message} [{self.rule}]"


class Validator:
    """Validates resources and transaction bundles against R4 and the profiles in a conformance folder."""

    def __init__(self, conformance_dir: Path):
        folder = Path(conformance_dir)
        self.profiles: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob("StructureDefinition-*.json")):
            sd = json.loads(path.read_text(encoding="utf-8"))
            self.profiles[sd["url"]] = sd
        # The UK Core profiles Homeward claims, with snapshots: a claim is checked like Homeward's own profiles.
        for path in sorted((folder / UKCORE_FOLDER).glob("StructureDefinition-*.json")):
            sd = json.loads(path.read_text(encoding="utf-8"))
            self.profiles[sd["url"]] = sd
        if not self.profiles:
            raise FileNotFoundError(f"no StructureDefinition-*.json in {folder}")
        self.value_sets: dict[str, set[tuple[str, str]]] = {}
        self.local_systems: dict[str, set[str]] = {}
        terminology = json.loads((folder / TERMINOLOGY_FILE).read_text(encoding="utf-8"))
        for entry in terminology["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "ValueSet":
                contains = resource.get("expansion", {}).get("contains", [])
                self.value_sets[resource["url"]] = {(c["system"], c["code"]) for c in contains}
            elif resource["resourceType"] == "CodeSystem":
                self.local_systems[resource["url"]] = {c["code"] for c in resource.get("concept", [])}

    # -- entry points ------------------------------------------------------------------------------

    def validate(self, data: dict[str, Any]) -> list[Issue]:
        """A resource, or a Bundle and every resource in it."""
        if data.get("resourceType") != "Bundle":
            return self.validate_resource(data, str(data.get("resourceType", "?")))
        issues = self._structure(data, "Bundle", entries=False)
        for i, entry in enumerate(data.get("entry", [])):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                issues += self.validate_resource(resource, f"Bundle.entry[{i}].resource")
        return issues

    def validate_resource(self, resource: dict[str, Any], where: str, profile: str | None = None) -> list[Issue]:
        issues = self._structure(resource, where)
        urls = [profile] if profile else self.profiles_for(resource)
        for url in urls:
            sd = self.profiles.get(url)
            if sd is None:
                issues.append(Issue(where, "warning", f"profile {url} is not known here; not checked", "profile"))
                continue
            issues += _ProfileCheck(self, sd, resource, where).run()
        return issues

    def profiles_for(self, resource: dict[str, Any]) -> list[str]:
        """Every profile a resource claims in meta.profile, and Homeward's own profile for its type (it sends no other)."""
        meta = resource.get("meta")
        claimed = [str(p) for p in (meta.get("profile", []) if isinstance(meta, dict) else [])]
        own = PROFILES.get(str(resource.get("resourceType")))
        return claimed + ([own] if own and own not in claimed else [])

    # -- R4 structure --------------------------------------------------------------------------------

    def _structure(self, resource: dict[str, Any], where: str, entries: bool = True) -> list[Issue]:
        from fhir.resources.R4B import get_fhir_model_class  # loading the models costs ~0.5 s

        rtype = resource.get("resourceType")
        try:
            model = get_fhir_model_class(str(rtype))
        except (KeyError, ValueError):
            return [Issue(where, "error", f"unknown resourceType {rtype!r}", "R4")]
        body = resource if entries else {k: v for k, v in resource.items() if k != "entry"}
        try:
            instance = model.model_validate(body)
        except ValidationError as exc:
            return [Issue(_join(where, exc_loc(err["loc"])), "error", _r4_message(err), "R4") for err in exc.errors()]
        return _enumerated_codes(instance, where)


def _enumerated_codes(node: BaseModel, where: str) -> list[Issue]:
    """R4 codes with a required binding to a fixed list (HumanName.use, ContactPoint.system, Encounter.status, ...).

    The R4B models list the allowed codes of each such element (`enum_values`) but do not enforce them,
    and the profiles' snapshots do not reach inside datatypes, so they are checked here, everywhere.
    """
    issues: list[Issue] = []
    for name, spec in type(node).model_fields.items():
        value = getattr(node, name, None)
        if value is None:
            continue
        extra = spec.json_schema_extra if isinstance(spec.json_schema_extra, dict) else {}
        allowed = extra.get("enum_values")
        key = spec.alias or name
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            loc = f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
            # A list ending in "+" is cut short by the model generator: not complete, so not checked here.
            if isinstance(allowed, list) and "+" not in allowed and isinstance(item, str) and item not in allowed:
                issues.append(Issue(loc, "error", "code is not one the R4 required binding allows", "R4"))
            elif isinstance(item, BaseModel):
                issues += _enumerated_codes(item, loc)
    return issues


def exc_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def _join(where: str, sub: str) -> str:
    if not sub:
        return where
    return f"{where}{sub}" if sub.startswith("[") else f"{where}.{sub}"


def _r4_message(err: Any) -> str:
    kind = str(err.get("type", ""))
    if kind == "missing":
        return "required element is missing"
    if kind == "extra_forbidden":
        return "not an element of this resource type"
    # pydantic's own message may quote the input; keep only its kind.
    return f"not valid FHIR R4 ({kind})"


class _ProfileCheck:
    """One resource against one profile's snapshot."""

    def __init__(self, validator: Validator, sd: dict[str, Any], resource: dict[str, Any], where: str):
        self.validator = validator
        self.sd = sd
        self.name = str(sd["name"])
        self.resource = resource
        self.where = where
        self.elements: list[dict[str, Any]] = sd["snapshot"]["element"]
        self.issues: list[Issue] = []
        self._nodes: dict[str, list[tuple[Any, str]]] = {}

    def run(self) -> list[Issue]:
        if self.resource.get("resourceType") != self.sd["type"]:
            return [Issue(self.where, "error", f"is not a {self.sd['type']}", self.name)]
        root = self.elements[0]["path"]
        self._nodes[root] = [(self.resource, self.where)]
        for element in self.elements:
            last = element["id"].rsplit(".", 1)[-1]
            if ":" in element["id"].rsplit(".", 1)[0]:
                continue  # below a slice: covered by the slice's membership test
            if ":" in last:
                self._slice(element)
                continue
            nodes = self.nodes(element["path"])
            if element["path"] != root:
                self._cardinality(element)
            for value, loc in nodes:
                self._values(element, value, loc)
        return self.issues

    def nodes(self, path: str) -> list[tuple[Any, str]]:
        """Every instance of the element at `path`, with its location."""
        if path in self._nodes:
            return self._nodes[path]
        parent_path, name = path.rsplit(".", 1)
        found: list[tuple[Any, str]] = []
        for parent, loc in self.nodes(parent_path):
            for key, value in _children(parent, name):
                if isinstance(value, list):
                    found += [(v, f"{loc}.{key}[{i}]") for i, v in enumerate(value)]
                else:
                    found.append((value, f"{loc}.{key}"))
        self._nodes[path] = found
        return found

    def _cardinality(self, element: dict[str, Any]) -> None:
        parent_path, name = element["path"].rsplit(".", 1)
        low, high = int(element.get("min", 0)), element.get("max", "*")
        for parent, loc in self.nodes(parent_path):
            if not isinstance(parent, dict):
                continue
            count = sum(len(v) if isinstance(v, list) else 1 for _, v in _children(parent, name))
            if count < low:
                self._add(f"{loc}.{name}", f"has {count} values, the profile needs at least {low}")
            if high != "*" and count > int(high):
                self._add(f"{loc}.{name}", f"has {count} values, the profile allows at most {high}")

    def _values(self, element: dict[str, Any], value: Any, loc: str) -> None:
        for key, wanted in element.items():
            if key.startswith("fixed") and value != wanted:
                self._add(loc, f"must be exactly the profile's {key}")
            elif key.startswith("pattern") and not _matches(value, wanted):
                self._add(loc, f"does not carry the profile's {key}")
        binding = element.get("binding", {})
        if binding.get("strength") == "required" and binding.get("valueSet"):
            self._binding(binding["valueSet"].split("|")[0], value, loc)
        for constraint in element.get("constraint", []):
            if constraint.get("key") not in _SKIPPED_INVARIANTS and "expression" in constraint:
                self._invariant(constraint, value, loc)

    def _binding(self, url: str, value: Any, loc: str) -> None:
        codes = self.validator.value_sets.get(url)
        if codes is None:
            return  # a value set not expanded here (not one Homeward fills)
        local = {s for s, _ in codes if s in self.validator.local_systems}
        if isinstance(value, str):
            ok = value in {c for _, c in codes}
        else:
            codings = value.get("coding", []) if isinstance(value, dict) and "coding" in value else [value]
            ok = any(
                isinstance(c, dict)
                and (
                    (c.get("system"), c.get("code")) in codes
                    or (c.get("system") in local and c.get("code") in self.validator.local_systems[c["system"]])
                )
                for c in codings
            )
        if not ok:
            self._add(loc, f"code is not in the required value set {url}")

    def _invariant(self, constraint: dict[str, Any], value: Any, loc: str) -> None:
        from fhirpathpy import evaluate
        from fhirpathpy.models import models

        try:
            result = evaluate(value, constraint["expression"], {"resource": self.resource}, models["r4"])
        except Exception:  # fhirpathpy cannot evaluate every R4 expression; say so rather than pass it
            self._add(loc, f"invariant {constraint['key']} could not be evaluated offline", "warning")
            return
        if result not in ([True], []):
            severity = "warning" if constraint.get("severity") == "warning" else "error"
            self._add(loc, f"invariant {constraint['key']} not met: {constraint.get('human', '')}", severity)

    def _slice(self, element: dict[str, Any]) -> None:
        sliced_id = element["id"][: element["id"].rfind(":")]
        parent_path, name = element["path"].rsplit(".", 1)
        low, high = int(element.get("min", 0)), element.get("max", "*")
        rules = [e for e in self.elements if e["id"].startswith(element["id"] + ".")]
        # The slice's own children (not those of a slice inside it): their cardinality in each member.
        children = [
            r
            for r in rules
            if "." not in r["id"][len(element["id"]) + 1 :] and ":" not in r["id"][len(element["id"]) + 1 :]
        ]
        for parent, loc in self.nodes(parent_path):
            if not isinstance(parent, dict):
                continue
            items = parent.get(name, [])
            listed = items if isinstance(items, list) else [items]
            members = [(i, item) for i, item in enumerate(listed) if _in_slice(element, rules, item)]
            where = f"{loc}.{name}"
            if len(members) < low:
                self._add(where, f"slice {element['sliceName']} needs {low}..{high}, found {len(members)}")
            if high != "*" and len(members) > int(high):
                self._add(where, f"slice {element['sliceName']} allows at most {high}, found {len(members)}")
            for i, item in members:
                for rule in children:
                    child = rule["path"].rsplit(".", 1)[-1]
                    count = sum(len(v) if isinstance(v, list) else 1 for _, v in _children(item, child))
                    member = f"{where}[{i}]" if isinstance(items, list) else where
                    if count < int(rule.get("min", 0)):
                        self._add(
                            f"{member}.{child}",
                            f"has {count} values, slice {element['sliceName']} needs at least {rule['min']}",
                        )
                    if rule.get("max", "*") != "*" and count > int(rule["max"]):
                        self._add(
                            f"{member}.{child}",
                            f"has {count} values, slice {element['sliceName']} allows at most {rule['max']}",
                        )
        del sliced_id

    def _add(self, path: str, message: str, severity: str = "error") -> None:
        self.issues.append(Issue(path, severity, message, self.name))


def _children(parent: Any, name: str) -> list[tuple[str, Any]]:
    """The (key, value) pairs of `parent` for element `name` ("value[x]" matches valueString, ...)."""
    if not isinstance(parent, dict):
        return []
    if name.endswith("[x]"):
        stem = name[:-3]
        return [(k, v) for k, v in parent.items() if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()]
    return [(name, parent[name])] if name in parent else []


def _matches(value: Any, pattern: Any) -> bool:
    """FHIR pattern[x]: every element of the pattern is present in the value (lists: some item matches)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _matches(value[k], p) for k, p in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_matches(v, p) for v in value) for p in pattern)
    return bool(value == pattern)


def _in_slice(element: dict[str, Any], rules: list[dict[str, Any]], item: Any) -> bool:
    """Whether `item` belongs to the slice: its pattern/fixed values, its children's fixed values, an extension url."""
    for key, wanted in element.items():
        if key.startswith(("fixed", "pattern")) and not _matches(item, wanted):
            return False
    if element["path"].endswith("xtension"):
        profiles = element.get("type", [{}])[0].get("profile", [])
        return isinstance(item, dict) and item.get("url") in profiles
    for rule in rules:
        relative = rule["path"][len(element["path"]) + 1 :].split(".")
        for key, wanted in rule.items():
            if key.startswith("fixed") and not any(v == wanted for v in _descend(item, relative)):
                return False
    return True


def _descend(node: Any, parts: list[str]) -> list[Any]:
    values = [node]
    for part in parts:
        nxt: list[Any] = []
        for v in values:
            child = v.get(part) if isinstance(v, dict) else None
            nxt += child if isinstance(child, list) else ([child] if child is not None else [])
        values = nxt
    return values
