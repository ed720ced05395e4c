"""site.yaml: events, identifier systems, named fields and rules, routing; and the YAML helpers the loader shares.

Every error names the file and the key, so a broken site file stops start-up with something to fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from adapter.errors import ConfigError
from adapter.mapping.model import Condition, Council, Route, Routing, SiteConfig

# "PID-3", "PID-11.5", "XAD.1.1"-style components, and a segment picked by one of its fields:
# "OBX[3=DRD]-5" is OBX-5 of the first OBX whose OBX-3.1 is DRD.
SEGMENT_SOURCE = re.compile(r"^[A-Z][A-Z0-9]{2}(\[\d+=[^\]=]+\])?-\d+(\.\d+){0,2}$")


def read_yaml(path: Path) -> dict[str, Any]:
    """One mapping file as a dict, with its path under "__file__" for error messages."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data["__file__"] = str(path)
    return data


def need(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]`, which must be there and of `kind`; ConfigError naming `where` and the key otherwise."""
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key}: expected {getattr(kind, '__name__', kind)}")
    return value


_SITE_KEYS = ("events", "unknown_events", "systems", "fields", "rules", "routing", "__file__")


def load_site(path: Path) -> SiteConfig:
    """Read and check site.yaml; raises ConfigError naming the file and the key."""
    if not path.exists():
        raise ConfigError(f"{path}: missing (every mappings directory needs a site.yaml)")
    data = read_yaml(path)
    events = need(data, "events", dict, str(path))
    for event, action in events.items():
        if action not in ("process", "ignore"):
            raise ConfigError(f"{path}: events.{event}: expected 'process' or 'ignore'")
    unknown = data.get("unknown_events", "reject")
    if unknown not in ("reject", "ignore"):
        raise ConfigError(f"{path}: unknown_events: expected 'reject' or 'ignore'")
    systems = need(data, "systems", dict, str(path))
    fields: dict[str, str] = {}
    for name, value in (data.get("fields") or {}).items():
        if not SEGMENT_SOURCE.match(str(value)):
            raise ConfigError(f"{path}: fields.{name}: '{value}' is not a valid location (e.g. ZDS-1, PV2-9)")
        fields[str(name)] = str(value)
    partial = SiteConfig({}, "reject", {}, fields=fields)
    rules = {
        str(name): condition(raw, f"{path}: rules.{name}", partial) for name, raw in (data.get("rules") or {}).items()
    }
    partial = SiteConfig({}, "reject", {}, fields=fields, rules=rules)
    routing = _routing(data.get("routing") or {}, f"{path}: routing", partial)
    extra = {k: v for k, v in data.items() if k not in _SITE_KEYS}
    return SiteConfig(
        {str(k): v for k, v in events.items()},
        unknown,
        {str(k): str(v) for k, v in systems.items()},
        extra,
        fields,
        rules,
        routing,
    )


def _routing(raw: Any, where: str, site: SiteConfig) -> Routing:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    postcode = location(raw.get("postcode_field", "PID-11.5"), f"{where}.postcode_field", site)
    authority = location(raw.get("local_authority_field", "PID-11.9"), f"{where}.local_authority_field", site)
    routes = []
    for i, item in enumerate(raw.get("routes") or []):
        rwhere = f"{where}.routes[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{rwhere}: expected a mapping")
        targets = _names(need(item, "targets", list, rwhere), f"{rwhere}.targets")
        council = None
        if "council" in item:
            c = need(item, "council", dict, rwhere)
            council = Council(
                str(need(c, "name", str, f"{rwhere}.council")),
                str(need(c, "system", str, f"{rwhere}.council")),
                str(need(c, "code", (str, int), f"{rwhere}.council")),
            )
        districts = frozenset(d.upper().replace(" ", "") for d in _names(item.get("postcode_districts", []), rwhere))
        authorities = frozenset(a.upper() for a in _names(item.get("local_authorities", []), rwhere))
        when = condition(item["when"], f"{rwhere}.when", site) if "when" in item else None
        if not (districts or authorities or when):
            raise ConfigError(f"{rwhere}: needs postcode_districts, local_authorities or when")
        routes.append(Route(str(item.get("name", f"route {i}")), targets, council, districts, authorities, when))
    unrouted = raw.get("unrouted") or {}
    if not isinstance(unrouted, dict):
        raise ConfigError(f"{where}.unrouted: expected a mapping such as {{targets: [default]}} or {{}}")
    return Routing(postcode, authority, tuple(routes), _names(unrouted.get("targets", []), f"{where}.unrouted.targets"))


def _names(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(v, str | int) for v in raw):
        raise ConfigError(f"{where}: expected a list of names")
    return tuple(str(v) for v in raw)


def location(raw: Any, where: str, site: SiteConfig) -> str:
    """A field location, or "@name" for a location named in site.yaml `fields:`."""
    source = str(raw)
    if source.startswith("@"):
        if source[1:] not in site.fields:
            raise ConfigError(f"{where}: '{source}' is not named in site.yaml fields")
        return site.fields[source[1:]]
    if not SEGMENT_SOURCE.match(source):
        raise ConfigError(f"{where}: '{source}' is not a valid location")
    return source


def condition(raw: Any, where: str, site: SiteConfig) -> Condition:
    """A `when:` ({field, equals | one_of | present, not}, {rule: name} or {all: [when, ...], not}), checked."""
    if isinstance(raw, dict) and "all" in raw and set(raw) <= {"all", "not"}:
        parts = raw["all"]
        if not isinstance(parts, list) or not parts:
            raise ConfigError(f"{where}: all: expected a list of conditions")
        return Condition(
            negate=bool(raw.get("not", False)),
            all_of=tuple(condition(part, f"{where}: all[{i}]", site) for i, part in enumerate(parts)),
        )
    if isinstance(raw, dict) and set(raw) == {"rule"}:
        name = str(raw["rule"])
        if name not in site.rules:
            raise ConfigError(f"{where}: rule: no rule '{name}' in site.yaml rules")
        return site.rules[name]
    if not isinstance(raw, dict) or "field" not in raw:
        raise ConfigError(
            f"{where}: expected {{field: PV1-36, equals|one_of|present: ...}}, {{rule: name}} or {{all: [...]}}"
        )
    source = location(raw["field"], f"{where}: field", site)
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
