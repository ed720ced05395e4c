"""Load and check every file under mappings/ at start-up; each error names the file and the key.

Layout (after the HL7 v2-to-FHIR IG): site.yaml, messages/ADT_<event>.yaml, segments/<SEG>-<Resource>.yaml,
datatypes/<v2>-<FHIR>.yaml, vocabulary/<table>-<name>.yaml. README.md in that folder documents the format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError
from adapter.mapping.fhirtypes import UnknownElement, element_info
from adapter.mapping.functions import FUNCTIONS
from adapter.mapping.model import (
    Condition,
    DatatypeMap,
    MappingSet,
    MessageMap,
    ResourceMap,
    Rule,
    SiteConfig,
    Vocabulary,
)

SEGMENT_SOURCE = re.compile(r"^[A-Z][A-Z0-9]{2}-\d+(\.\d+){0,2}$")
COMPONENT_SOURCE = re.compile(r"^\d+(\.\d+)?$")
_RULE_KEYS = {
    "field",
    "component",
    "element",
    "repeat",
    "datatype",
    "function",
    "args",
    "vocabulary",
    "value",
    "ref",
    "when",
    "note",
}


def load_mappings(root: Path) -> MappingSet:
    """Read and validate the whole mappings directory. Raises ConfigError on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"mapping.dir {root} is not a directory")
    vocabularies = {v.name: v for v in (_vocabulary(p) for p in _files(root / "vocabulary"))}
    datatypes: dict[str, DatatypeMap] = {}
    for path in _files(root / "datatypes"):
        dt = _datatype(path, vocabularies, datatypes)
        datatypes[dt.name] = dt
    segment_maps = {p.stem: _read(p) for p in _files(root / "segments")}
    site = _site(root / "site.yaml")
    messages: dict[str, MessageMap] = {}
    for path in _files(root / "messages"):
        mm = _message(path, segment_maps, datatypes, vocabularies, site)
        messages[mm.event] = mm
    for event, action in site.events.items():
        if action == "process" and event not in messages:
            raise ConfigError(f"{root / 'site.yaml'}: events.{event}: 'process' but no messages/ADT_{event}.yaml")
    return MappingSet(site, messages, datatypes, vocabularies)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data["__file__"] = str(path)
    return data


def _need(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key}: expected {getattr(kind, '__name__', kind)}")
    return value


def _site(path: Path) -> SiteConfig:
    if not path.exists():
        raise ConfigError(f"{path}: missing (every mappings directory needs a site.yaml)")
    data = _read(path)
    events = _need(data, "events", dict, str(path))
    for event, action in events.items():
        if action not in ("process", "ignore"):
            raise ConfigError(f"{path}: events.{event}: expected 'process' or 'ignore'")
    unknown = data.get("unknown_events", "reject")
    if unknown not in ("reject", "ignore"):
        raise ConfigError(f"{path}: unknown_events: expected 'reject' or 'ignore'")
    systems = _need(data, "systems", dict, str(path))
    extra = {k: v for k, v in data.items() if k not in ("events", "unknown_events", "systems", "__file__")}
    return SiteConfig(
        {str(k): v for k, v in events.items()}, unknown, {str(k): str(v) for k, v in systems.items()}, extra
    )


def _vocabulary(path: Path) -> Vocabulary:
    data = _read(path)
    where = str(path)
    system = _need(data, "system", str, where)
    raw_codes = _need(data, "map", dict, where)
    codes: dict[str, dict[str, str]] = {}
    for v2_code, target in raw_codes.items():
        if isinstance(target, str):
            target = {"code": target}
        if not isinstance(target, dict) or "code" not in target:
            raise ConfigError(f"{where}: map.{v2_code}: expected a code or {{code, display}}")
        codes[str(v2_code)] = {str(k): str(v) for k, v in target.items()}
    unmapped = data.get("unmapped", "error")
    if unmapped not in ("error", "default", "omit", "text"):
        raise ConfigError(f"{where}: unmapped: expected error | default | omit | text")
    default = data.get("default")
    if unmapped == "default" and (default is None or str(default) not in codes):
        raise ConfigError(f"{where}: default: must name a key of map when unmapped is 'default'")
    return Vocabulary(
        path.stem,
        system,
        codes,
        None if default is None else str(default),
        unmapped,
        bool(data.get("national_code_confirmed", True)),
    )


def _datatype(path: Path, vocabularies: dict[str, Vocabulary], datatypes: dict[str, DatatypeMap]) -> DatatypeMap:
    data = _read(path)
    where = str(path)
    fhir_type = _need(data, "fhirType", str, where)
    raw_rules = _need(data, "rules", list, where)
    rules = tuple(
        _rule(r, fhir_type, f"{where}: rules[{i}]", vocabularies, datatypes, set(), relative=True)
        for i, r in enumerate(raw_rules)
    )
    return DatatypeMap(path.stem, fhir_type, rules)


def _message(
    path: Path,
    segment_maps: dict[str, dict[str, Any]],
    datatypes: dict[str, DatatypeMap],
    vocabularies: dict[str, Vocabulary],
    site: SiteConfig,
) -> MessageMap:
    data = _read(path)
    where = str(path)
    event = _need(data, "event", str, where)
    if path.stem != f"ADT_{event}":
        raise ConfigError(f"{where}: event: '{event}' does not match the file name")
    requires = tuple(str(r) for r in data.get("requires", []))
    keys: set[str] = set()
    resources = []
    for i, raw in enumerate(_need(data, "resources", list, where)):
        rwhere = f"{where}: resources[{i}]"
        rm = _resource(raw, rwhere, segment_maps, datatypes, vocabularies, keys, site)
        keys.add(rm.key)
        resources.append(rm)
    return MessageMap(
        event,
        str(data.get("description", "")),
        requires,
        tuple(resources),
        where,
        bool(data.get("provenance", True)),
    )


def _resource(
    raw: Any,
    where: str,
    segment_maps: dict[str, dict[str, Any]],
    datatypes: dict[str, DatatypeMap],
    vocabularies: dict[str, Vocabulary],
    keys: set[str],
    site: SiteConfig,
) -> ResourceMap:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    key = _need(raw, "key", str, where)
    rtype = _need(raw, "resourceType", str, where)
    try:
        element_info(rtype, "id")
    except (UnknownElement, KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: resourceType: '{rtype}' is not an R4 resource") from exc
    rules: list[Rule] = []
    for name in raw.get("include", []):
        seg_map = segment_maps.get(name)
        if seg_map is None:
            raise ConfigError(f"{where}: include: no segments/{name}.yaml")
        swhere = seg_map["__file__"]
        if seg_map.get("resourceType") != rtype:
            raise ConfigError(f"{swhere}: resourceType: maps to {seg_map.get('resourceType')}, included for {rtype}")
        for j, r in enumerate(_need(seg_map, "rules", list, swhere)):
            rules.append(_rule(r, rtype, f"{swhere}: rules[{j}]", vocabularies, datatypes, keys, relative=False))
    for j, r in enumerate(raw.get("rules", [])):
        rules.append(_rule(r, rtype, f"{where}.rules[{j}]", vocabularies, datatypes, keys, relative=False))
    identity = tuple(str(s) for s in raw.get("identity", []))
    for system in identity:
        if system not in site.systems:
            raise ConfigError(f"{where}: identity: no system '{system}' in site.yaml systems")
    when = _condition(raw["when"], f"{where}: when") if "when" in raw else None
    return ResourceMap(key, rtype, tuple(rules), where, raw.get("foreach"), when, identity, raw.get("profile"))


def _rule(
    raw: Any,
    fhir_type: str,
    where: str,
    vocabularies: dict[str, Vocabulary],
    datatypes: dict[str, DatatypeMap],
    keys: set[str],
    *,
    relative: bool,
) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    element = _need(raw, "element", str, where)
    try:
        info = element_info(fhir_type, element)
    except UnknownElement as exc:
        raise ConfigError(f"{where}: element: {exc}") from exc
    source = raw.get("component" if relative else "field")
    if source is not None:
        source = str(source)
        pattern = COMPONENT_SOURCE if relative else SEGMENT_SOURCE
        if not pattern.match(source):
            raise ConfigError(f"{where}: {'component' if relative else 'field'}: '{source}' is not a valid location")
    elif "value" not in raw and "ref" not in raw:
        raise ConfigError(f"{where}: needs one of field/component, value or ref")
    datatype = raw.get("datatype")
    if datatype is not None:
        if datatype not in datatypes:
            raise ConfigError(f"{where}: datatype: no datatypes/{datatype}.yaml")
        if datatypes[datatype].fhir_type != info.type:
            raise ConfigError(
                f"{where}: datatype: {datatype} makes {datatypes[datatype].fhir_type}, {element} is {info.type}"
            )
    function = raw.get("function")
    if function is not None and function not in FUNCTIONS:
        raise ConfigError(f"{where}: function: no function '{function}' (known: {', '.join(sorted(FUNCTIONS))})")
    vocabulary = raw.get("vocabulary")
    if vocabulary is not None:
        if vocabulary not in vocabularies:
            raise ConfigError(f"{where}: vocabulary: no vocabulary/{vocabulary}.yaml")
        if info.type not in ("code", "Coding", "CodeableConcept"):
            raise ConfigError(f"{where}: vocabulary: {element} is {info.type}, not a code, Coding or CodeableConcept")
    ref = raw.get("ref")
    if ref is not None:
        if info.type != "Reference":
            raise ConfigError(f"{where}: ref: {element} is {info.type}, not a Reference")
        if ref not in keys:
            raise ConfigError(f"{where}: ref: '{ref}' is not a resource key defined before this one")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: args: expected a mapping")
    when = _condition(raw["when"], f"{where}: when") if "when" in raw else None
    return Rule(
        element=element,
        info=info,
        origin=where,
        source=source,
        repeat=bool(raw.get("repeat", False)),
        datatype=datatype,
        function=function,
        args=args,
        vocabulary=vocabulary,
        value=raw.get("value"),
        ref=ref,
        when=when,
    )


def _condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict) or "field" not in raw:
        raise ConfigError(f"{where}: expected {{field: PV1-36, equals|one_of|present: ...}}")
    source = str(raw["field"])
    if not SEGMENT_SOURCE.match(source):
        raise ConfigError(f"{where}: field: '{source}' is not a valid location")
    one_of = raw.get("one_of", [])
    if not isinstance(one_of, list):
        raise ConfigError(f"{where}: one_of: expected a list")
    return Condition(
        source,
        raw.get("present"),
        None if raw.get("equals") is None else str(raw["equals"]),
        tuple(str(v) for v in one_of),
        bool(raw.get("not", False)),
    )
