"""Load and check every file under mappings/ at start-up; each error names the file and the key.

Layout (after the HL7 v2-to-FHIR IG): site.yaml, messages/ADT_<event>.yaml, segments/<SEG>-<Resource>.yaml,
datatypes/<v2>-<FHIR>.yaml, vocabulary/<table>-<name>.yaml. README.md in that folder documents the format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adapter.errors import ConfigError
from adapter.mapping.fhirtypes import UnknownElement, element_info
from adapter.mapping.functions import FUNCTIONS
from adapter.mapping.model import (
    DatatypeMap,
    MappingSet,
    MessageMap,
    ResourceMap,
    Rule,
    SiteConfig,
    Vocabulary,
)
from adapter.mapping.site import condition, load_site, location, need, read_yaml

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
    "template",
    "into",
    "all_segments",
    "unique",
    "note",
}
_NO_SITE = SiteConfig({}, "reject", {})


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
    segment_maps = {p.stem: read_yaml(p) for p in _files(root / "segments")}
    site = load_site(root / "site.yaml")
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


def _vocabulary(path: Path) -> Vocabulary:
    data = read_yaml(path)
    where = str(path)
    system = need(data, "system", str, where)
    raw_codes = need(data, "map", dict, where)
    confirmed = _flag(data, "national_code_confirmed", where)
    codes: dict[str, dict[str, str]] = {}
    unconfirmed: set[str] = set()
    for v2_code, target in raw_codes.items():
        if isinstance(target, str):
            target = {"code": target}
        if not isinstance(target, dict) or "code" not in target:
            raise ConfigError(f"{where}: map.{v2_code}: expected a code or {{code, display}}")
        extra = set(target) - {"code", "display", "system", "national_code_confirmed"}
        if extra:
            raise ConfigError(
                f"{where}: map.{v2_code}: unknown key(s) {sorted(extra)} (code, display, system, national_code_confirmed)"
            )
        # An entry may say its code is local (e.g. carer breakdown in a SNOMED CT table); it is not part of the coding.
        if not _flag(target, "national_code_confirmed", f"{where}: map.{v2_code}", confirmed):
            unconfirmed.add(str(v2_code))
        codes[str(v2_code)] = {str(k): str(v) for k, v in target.items() if k != "national_code_confirmed"}
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
        confirmed,
        frozenset(unconfirmed),
    )


def _flag(data: dict[str, Any], key: str, where: str, default: bool = True) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: expected true or false")
    return value


def _datatype(path: Path, vocabularies: dict[str, Vocabulary], datatypes: dict[str, DatatypeMap]) -> DatatypeMap:
    data = read_yaml(path)
    where = str(path)
    fhir_type = need(data, "fhirType", str, where)
    raw_rules = need(data, "rules", list, where)
    rules = tuple(
        _rule(r, fhir_type, f"{where}: rules[{i}]", vocabularies, datatypes, set(), _NO_SITE, relative=True)
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
    data = read_yaml(path)
    where = str(path)
    event = need(data, "event", str, where)
    if path.stem != f"ADT_{event}":
        raise ConfigError(f"{where}: event: '{event}' does not match the file name")
    requires = tuple(
        location(r, f"{where}: requires", site) if str(r).startswith("@") else str(r) for r in data.get("requires", [])
    )
    raw_resources = need(data, "resources", list, where)
    # Any resource of the message may be referenced, before or after it (A40: old <-> new Patient).
    keys = {str(r.get("key")) for r in raw_resources if isinstance(r, dict)}
    resources = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_resources):
        rwhere = f"{where}: resources[{i}]"
        rm = _resource(raw, rwhere, segment_maps, datatypes, vocabularies, keys, site)
        if rm.key in seen:
            raise ConfigError(f"{rwhere}: key: '{rm.key}' is used twice")
        seen.add(rm.key)
        resources.append(rm)
    for required in requires:
        if "-" in required:
            location(required, f"{where}: requires", site)
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
    key = need(raw, "key", str, where)
    rtype = need(raw, "resourceType", str, where)
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
        for j, r in enumerate(need(seg_map, "rules", list, swhere)):
            rules.append(_rule(r, rtype, f"{swhere}: rules[{j}]", vocabularies, datatypes, keys, site, relative=False))
    for j, r in enumerate(raw.get("rules", [])):
        rules.append(_rule(r, rtype, f"{where}.rules[{j}]", vocabularies, datatypes, keys, site, relative=False))
    identity = tuple(str(s) for s in raw.get("identity", []))
    for system in identity:
        if system not in site.systems:
            raise ConfigError(f"{where}: identity: no system '{system}' in site.yaml systems")
    when = condition(raw["when"], f"{where}: when", site) if "when" in raw else None
    if raw.get("foreach") is not None and not re.match(r"^[A-Z][A-Z0-9]{2}$", str(raw["foreach"])):
        raise ConfigError(f"{where}: foreach: '{raw['foreach']}' is not a segment name")
    profile = raw.get("profile")
    if profile is not None and not str(profile).startswith("https://fhir.hl7.org.uk/StructureDefinition/UKCore-"):
        raise ConfigError(f"{where}: profile: only UK Core profiles are claimed")
    anchor = tuple(str(k) for k in raw.get("anchor", []))
    for name in anchor:
        if name not in keys:
            raise ConfigError(f"{where}: anchor: '{name}' is not a resource key of this message")
    anchor_fields = raw.get("anchor_fields", [])
    if not isinstance(anchor_fields, list):
        raise ConfigError(f"{where}: anchor_fields: expected a list of fields (e.g. [NK1-2.1, NK1-2.2])")
    fields = tuple(location(f, f"{where}: anchor_fields[{i}]", site) for i, f in enumerate(anchor_fields))
    return ResourceMap(key, rtype, tuple(rules), where, raw.get("foreach"), when, identity, profile, anchor, fields)


def _rule(
    raw: Any,
    fhir_type: str,
    where: str,
    vocabularies: dict[str, Vocabulary],
    datatypes: dict[str, DatatypeMap],
    keys: set[str],
    site: SiteConfig,
    *,
    relative: bool,
) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    element = need(raw, "element", str, where)
    try:
        info = element_info(fhir_type, element)
    except UnknownElement as exc:
        raise ConfigError(f"{where}: element: {exc}") from exc
    source = raw.get("component" if relative else "field")
    if source is not None and not relative:
        source = location(source, f"{where}: field", site)
    elif source is not None:
        source = str(source)
        if not COMPONENT_SOURCE.match(source):
            raise ConfigError(f"{where}: component: '{source}' is not a valid location")
    elif "value" not in raw and "ref" not in raw:
        raise ConfigError(f"{where}: needs one of field/component, value or ref")
    into = raw.get("into")
    template = raw.get("template")
    value_info = info
    if into is not None:
        if not isinstance(template, dict):
            raise ConfigError(f"{where}: into: needs a template (a mapping) to put the value into")
        try:
            value_info = element_info(info.type, str(into))
        except UnknownElement as exc:
            raise ConfigError(f"{where}: into: {exc}") from exc
    elif template is not None:
        raise ConfigError(f"{where}: template: needs into (where the value goes)")
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
        if value_info.type not in ("code", "Coding", "CodeableConcept"):
            raise ConfigError(
                f"{where}: vocabulary: {into or element} is {value_info.type}, not a code, Coding or CodeableConcept"
            )
    ref = raw.get("ref")
    if ref is not None:
        if info.type != "Reference":
            raise ConfigError(f"{where}: ref: {element} is {info.type}, not a Reference")
        if ref not in keys:
            raise ConfigError(f"{where}: ref: '{ref}' is not a resource key of this message")
    if raw.get("all_segments") and (relative or source is None or "[" in source):
        raise ConfigError(f"{where}: all_segments: needs a plain field such as NTE-3 (no selector)")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: args: expected a mapping")
    when = condition(raw["when"], f"{where}: when", site) if "when" in raw else None
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
        template=template,
        into=None if into is None else str(into),
        all_segments=bool(raw.get("all_segments", False)),
        unique=_unique(raw, element, info.is_list, where),
    )


def _unique(raw: dict[str, Any], element: str, is_list: bool, where: str) -> bool:
    unique = raw.get("unique", False)
    if not isinstance(unique, bool):
        raise ConfigError(f"{where}: unique: expected true or false")
    if unique and (not is_list or not element.isidentifier()):
        raise ConfigError(f"{where}: unique: only for a repeating element of the resource itself (e.g. reasonCode)")
    return unique
