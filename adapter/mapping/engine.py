"""Pure mapping: (Hl7Message, MappingSet) -> a FHIR transaction Bundle as plain dicts; no I/O, no clock.

Every entry is resend-safe: resources with an identity are written as a conditional update on
that identifier (`PUT Patient?identifier=system|value`), the rest as a PUT to an id derived from
what identifies them, so the same message always produces the same request. Each value taken
from the feed is checked against its FHIR primitive type here, so bad data is refused with AE
rather than sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from adapter.errors import MappingError
from adapter.hl7.message import Delimiters, Hl7Message, Repetition, Segment
from adapter.mapping.fhirtypes import check_primitive, element_info
from adapter.mapping.functions import (
    FUNCTIONS,
    TIME_FUNCTIONS,
    MapContext,
    deterministic_id,
    instant,
    system_text,
    text,
)
from adapter.mapping.model import Condition, Council, MappingSet, MessageMap, ResourceMap, Rule
from adapter.mapping.routing import RouteDecision, decide
from adapter.mapping.values import fill, lookup, prune, set_path

HOMEWARD_DEVICE_DISPLAY = "Homeward HL7 v2 to FHIR adapter"


@dataclass(frozen=True, slots=True)
class TraceLine:
    """One element set by one rule (`homeward map --explain`)."""

    element: str
    source: str
    origin: str


@dataclass
class MapResult:
    """A mapped message: the bundle, the key its deliveries are ordered by, and notes for the audit."""

    bundle: dict[str, Any]
    ordering_key: str
    flags: list[str] = field(default_factory=list)
    trace: list[TraceLine] = field(default_factory=list)
    used_fields: set[tuple[str, int]] = field(default_factory=set)
    route: RouteDecision = field(default_factory=lambda: RouteDecision((), (), ()))

    @property
    def resource_count(self) -> int:
        return len(self.bundle.get("entry", []))


class _Run:
    """State of one mapping run: the message, the site, and what has been built so far."""

    def __init__(self, message: Hl7Message, mappings: MappingSet, tz: ZoneInfo, explain: bool):
        self.message = message
        self.mappings = mappings
        self.tz = tz
        self.explain = explain
        self.flags: list[str] = []
        self.trace: list[TraceLine] = []
        self.used: set[tuple[str, int]] = set()
        self.full_urls: dict[str, str] = {}
        # References to resources built later in the message (A40: the old Patient -> the new one).
        self.pending: list[tuple[dict[str, Any], Rule]] = []
        self.anchored: set[str] = set()  # ids given to resources without an identifier, to keep them apart
        self.councils: tuple[Council, ...] = ()
        # Filled in as they are asked for: each system's text depends only on MSH-4 (MapContext.system).
        self.systems: dict[str, str] = {}
        # Dates and times converted so far, by function and text (TIME_FUNCTIONS).
        self.times: dict[tuple[str, str], Any] = {}

    def context(self, segment: Segment | None, location: str) -> MapContext:
        return MapContext(
            self.message,
            segment,
            location,
            self.tz,
            self.mappings.site.systems,
            self.flags,
            self.table_lookup,
            self.councils,
            self.first,
            self.systems,
        )

    def system(self, name: str, location: str) -> str:
        """A site identifier system by name, as MapContext.system gives it, without building a context."""
        known = self.systems.get(name)
        if known is None:
            template = self.mappings.site.systems.get(name)
            if template is None:  # MapContext.system refuses it, naming the location
                return self.context(None, location).system(name)
            known = self.systems[name] = system_text(template, self.message.sending_facility)
        return known

    def table_lookup(self, vocabulary: str, value: Any, fhir_type: str, location: str) -> Any:
        return lookup(self.mappings.vocabularies[vocabulary], value, fhir_type, location, self.flags)

    # -- reading the message -------------------------------------------------------------------

    def segment_for(self, seg_name: str, selector: tuple[int, str] | None, segment: Segment | None) -> Segment | None:
        if selector is None:
            if segment is not None and segment.name == seg_name:
                return segment
            return self.message.segment(seg_name)
        field_no, wanted = selector
        for candidate in self.message.all(seg_name):
            if candidate.get(field_no) == wanted:
                self.used.add((seg_name, field_no))
                return candidate
        return None

    def read(self, source: str, segment: Segment | None) -> tuple[list[Repetition], str]:
        """Repetitions at `source` ("PID-3", "PID-3.1", "OBX[3=DRD]-5"); components give one-component views."""
        seg_name, selector, field_no, component, sub, used = _parse_source(source)
        seg: Segment | None
        if selector is not None:
            seg = self.segment_for(seg_name, selector, segment)
        elif segment is not None and segment.fields[0] == seg_name:
            seg = segment  # the segment a `foreach` is on
        else:
            seg = self.message.segment(seg_name)
        if seg is None:
            return [], source
        self.used.add(used)
        reps = seg.repetitions(field_no)
        if component is None:
            return reps, source
        return [Repetition(v, _PLAIN) for r in reps if (v := r.component(component, sub))], source

    def first(self, source: str) -> str:
        reps, _ = self.read(source, None)
        return reps[0].component(1) if reps else ""

    def holds(self, cond: Condition, segment: Segment | None) -> bool:
        """Evaluate a `when:`; text is compared ignoring case ("Carer breakdown" = "CARER BREAKDOWN")."""
        if cond.all_of:
            return all(self.holds(part, segment) for part in cond.all_of) != cond.negate
        reps, _ = self.read(cond.source, segment)
        # Any repetition may match: services arrive as a repeating field.
        values = {r.component(1).casefold() for r in reps} - {""}
        if cond.present is not None:
            result = bool(values) == cond.present
        elif cond.equals is not None:
            result = cond.equals.casefold() in values
        else:
            result = bool(values & {v.casefold() for v in cond.one_of})
        return result != cond.negate


@cache
def _parse_source(source: str) -> tuple[str, tuple[int, str] | None, int, int | None, int, tuple[str, int]]:
    """ "OBX[3=DRD]-5.1" -> ("OBX", (3, "DRD"), 5, 1, 1, ("OBX", 5)): segment, selector, field, component
    (None: the whole field), subcomponent, and the key of MapResult.used_fields; the loader has checked the form."""
    head, _, rest = source.partition("-")
    selector = None
    if "[" in head:
        head, _, sel = head.partition("[")
        selector_field, _, wanted = sel.rstrip("]").partition("=")
        selector = (int(selector_field), wanted)
    parts = [int(p) for p in rest.split(".")]
    field_no = parts[0]
    component = parts[1] if len(parts) > 1 else None
    sub = parts[2] if len(parts) > 2 else 1
    return head, selector, field_no, component, sub, (head, field_no)


# Delimiters that never occur in text: a component already read and unescaped is wrapped as-is.
_PLAIN = Delimiters(field="", component="\x00", repetition="\x01", escape="", subcomponent="\x02")


def map_message(message: Hl7Message, mappings: MappingSet, tz: ZoneInfo, *, explain: bool = False) -> MapResult:
    """Map one message with the map for its trigger event.

    Raises MappingError (naming the HL7 location) when the message lacks what its event needs or a
    value cannot be carried into FHIR.
    """
    mm = mappings.messages.get(message.trigger_event)
    if mm is None:
        raise MappingError(f"no mapping for event {message.trigger_event}", location="MSH-9", hl7_error_code="201")
    run = _Run(message, mappings, tz, explain)
    _check_requires(run, mm)
    route = decide(mappings.site.routing, run.first, lambda cond: run.holds(cond, None))
    run.councils = route.councils
    entries: list[dict[str, Any]] = []
    for rm in mm.resources:
        segments: list[Segment | None] = list(message.all(rm.foreach)) if rm.foreach else [None]
        for index, segment in enumerate(segments, start=1):
            if rm.when is not None and not run.holds(rm.when, segment):
                if run.explain:  # say why a resource an engineer expects is missing (A08: no referral)
                    run.trace.append(TraceLine(rm.resource_type, "(not built: its when: does not hold)", rm.origin))
                continue
            entries.append(_entry(run, rm, segment, index))
    for target, rule in run.pending:
        if rule.ref in run.full_urls:
            set_path(target, rule.element, {"reference": run.full_urls[rule.ref]}, rule.info.is_list)
    if mm.provenance:
        entries.append(_provenance(run, mm, entries))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    flags = list(dict.fromkeys(run.flags))  # one note per field, though several resources read it
    return MapResult(bundle, _ordering_key(message), flags, run.trace, run.used, route)


def _check_requires(run: _Run, mm: MessageMap) -> None:
    for location in mm.requires:
        if "-" in location:
            reps, _ = run.read(location, None)
            if not reps:
                raise MappingError(f"{location} is required for {run.message.event}", location=location)
        elif run.message.segment(location) is None:
            raise MappingError(f"segment {location} is required for {run.message.event}", location=location)


def _ordering_key(message: Hl7Message) -> str:
    """Deliveries for one patient of one sender go in arrival order (PID-3, first repetition)."""
    pid = message.segment("PID")
    patient = pid.get(3) if pid is not None else ""
    return f"{message.sending_facility}|{patient or message.message_control_id}"


def _entry(run: _Run, rm: ResourceMap, segment: Segment | None, index: int) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": rm.resource_type}
    if rm.profile:
        resource["meta"] = {"profile": [rm.profile]}
    for rule in rm.rules:
        _apply(run, rule, resource, segment, rm.resource_type)
    prune(resource)
    full_url, request = _request(run, rm, resource, index, segment)
    run.full_urls[rm.key] = full_url
    return {"fullUrl": full_url, "resource": resource, "request": request}


def search_escape(value: str) -> str:
    """A search parameter value with `\\`, `|`, `,` and `$` escaped (FHIR R4 search, "Escaping Search Parameters").

    Unescaped, a comma means OR: `identifier=system|V,1` matches visit "V" too, and the conditional
    update would overwrite that visit's resource.
    """
    return value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


@lru_cache(maxsize=256)
def _search_system(system: str) -> str:
    """A system in a search token, escaped and percent-encoded; a site has a handful (kept, not redone)."""
    return quote(search_escape(system), safe=":/")


def _search_value(value: str) -> str:
    """A value in a search token, escaped and percent-encoded; letters and digits need neither (most ids)."""
    if value.isascii() and value.isalnum():
        return value
    return quote(search_escape(value), safe="")


def _request(
    run: _Run, rm: ResourceMap, resource: dict[str, Any], index: int, segment: Segment | None
) -> tuple[str, dict[str, str]]:
    for name in rm.identity:
        system = run.system(name, rm.origin)
        for ident in resource.get("identifier", []):
            if ident.get("system") == system and ident.get("value"):
                full_url = f"urn:uuid:{deterministic_id(rm.resource_type, system, ident['value'])}"
                token = f"{_search_system(system)}|{_search_value(ident['value'])}"
                url = f"{rm.resource_type}?identifier={token}"
                return full_url, {"method": "PUT", "url": url}
    if rm.identity:
        # Name the field the identifier comes from (PV1-19 for the visit's resources), as ERR-2 must.
        fields = [r.source for r in rm.rules if r.element.startswith("identifier") and r.source]
        raise MappingError(
            f"{rm.resource_type} has no identifier to match on ({', '.join(rm.identity)})",
            location=fields[0] if fields else rm.origin.rsplit(": ", 1)[-1],
        )
    # No identifier of its own: an id derived from the resources it hangs off (patient, visit) and from
    # who it is (`anchor_fields`, e.g. the next of kin's name), else its place among its segments.
    anchors = [run.full_urls.get(k, k) for k in rm.anchor] if rm.anchor else sorted(run.full_urls.values())
    rid = deterministic_id(rm.resource_type, rm.key, _place(run, rm, index, segment), *anchors)
    if rid in run.anchored:
        # The same name twice in one message: the later one is told apart by its place.
        rid = deterministic_id(rm.resource_type, rm.key, f"{index}", *anchors)
    run.anchored.add(rid)
    resource["id"] = rid
    return f"urn:uuid:{rid}", {"method": "PUT", "url": f"{rm.resource_type}/{rid}"}


def _place(run: _Run, rm: ResourceMap, index: int, segment: Segment | None) -> str:
    """What tells this occurrence apart across messages: its `anchor_fields` values, or its occurrence number.

    By name, a carer keeps the same resource when the PAS sends the next of kin in another order or
    adds one before them; the occurrence number would hand the carer's resource to someone else.
    """
    values = []
    for source in rm.anchor_fields:
        reps, _ = run.read(source, segment)
        values.append(reps[0].component(1).strip().casefold() if reps else "")
    return "|".join(values) if any(values) else str(index)


def _provenance(run: _Run, mm: MessageMap, entries: list[dict[str, Any]]) -> dict[str, Any]:
    message = run.message
    stamp, control_id = message.message_datetime, message.message_control_id
    ctx = run.context(message.msh, "MSH-7")
    recorded = instant(stamp, ctx) if len(stamp) >= 12 else None
    rid = deterministic_id("Provenance", message.sending_facility, control_id)
    resource: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": rid,
        "target": [{"reference": e["fullUrl"]} for e in entries],
        "recorded": recorded or "1970-01-01T00:00:00+00:00",
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "UPDATE",
                    "display": "revise",
                }
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {"display": HOMEWARD_DEVICE_DISPLAY},
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": ctx.system("message"), "value": control_id},
                    "display": f"HL7 v2 {message.event} message {control_id}",
                },
            }
        ],
    }
    hospital = run.full_urls.get("hospital")
    if hospital:
        resource["agent"][0]["onBehalfOf"] = {"reference": hospital}
    if recorded is None:
        run.flags.append("MSH-7: no time to the minute; Provenance.recorded set to the epoch")
    if run.explain:
        origin = f"{mm.origin}: provenance"
        run.trace.extend(
            TraceLine(element, source, origin)
            for element, source in (
                ("Provenance.recorded", "MSH-7"),
                ("Provenance.entity.what.identifier", "MSH-10"),
                ("Provenance.agent.onBehalfOf", "ref hospital"),
                ("Provenance.target", "(every entry)"),
            )
        )
    return {
        "fullUrl": f"urn:uuid:{rid}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"Provenance/{rid}"},
    }


# -- applying rules -------------------------------------------------------------------------------


def _apply(
    run: _Run,
    rule: Rule,
    target: dict[str, Any],
    segment: Segment | None,
    where: str,
    repetition: Repetition | None = None,
    parent: str = "",
) -> None:
    if rule.when is not None and not run.holds(rule.when, segment):
        return
    if rule.ref is not None:
        _apply_ref(run, rule, target, where)
        return
    # What the rule reads; nothing read, nothing to do (most rules of a message meet an empty field).
    values: list[Any]
    if rule.source is None:
        values = [rule.value]
        location = rule.origin
    elif repetition is not None:  # a datatype rule: source is "component[.sub]" of the repetition
        assert rule.component_at is not None  # set for every source without a segment name
        text = repetition.component(*rule.component_at)
        if not text:
            return
        values = [text]
        location = f"{parent}.{rule.source}"
    elif rule.all_segments:
        location = rule.source
        values = []
        for each in run.message.all(_parse_source(rule.source)[0]):
            reps, _ = run.read(rule.source, each)
            values.extend(reps if rule.repeat else reps[:1])
    else:
        values, location = run.read(rule.source, segment)
        if not values:
            return
        if not rule.repeat:
            values = values[:1]
    pattern = rule.info.pattern
    for value in values:
        if rule.as_read:  # _transform's last step, without the call: most rules take the text as read
            produced = value.component(1) if isinstance(value, Repetition) else value
        else:
            produced = _transform(run, rule, value, segment, location, where)
        # A function may give several values (one performer per council the message is routed to).
        for result in produced if isinstance(produced, list) else (produced,):
            if result is None or result == {} or result == "":
                continue
            # A text checked here without a call; anything else (a bool, a number) by check_primitive.
            if pattern is not None and not (
                pattern.match(result) if type(result) is str else check_primitive(rule.info.type, result)
            ):
                raise _not_valid(rule, location, where)
            if not rule.direct:
                if not _put(target, rule, result):
                    continue
            elif rule.info.is_list:  # set_path's own steps for a plain element name, without the call
                target.setdefault(rule.element, []).append(result)
            else:
                target[rule.element] = result
            if run.explain:
                source = "(value)" if rule.source is None else location
                if rule.vocabulary:
                    source = f"{source} via {rule.vocabulary}"
                run.trace.append(TraceLine(f"{where}.{rule.element}", source, rule.origin))


def _not_valid(rule: Rule, location: str, where: str) -> MappingError:
    return MappingError(
        f"{location}: not a valid FHIR {rule.info.type} for {where}.{rule.element}",
        location=location,
        hl7_error_code="102",
    )


def _put(target: dict[str, Any], rule: Rule, result: Any) -> bool:
    """Set a value by a rule with a template, `unique` or a dotted path; False when `unique` leaves it out."""
    if rule.template is not None and rule.into is not None:
        result = fill(rule.template, rule.into, result)
    if rule.unique and _already_there(target, rule.element, result):
        return False
    set_path(target, rule.element, result, rule.info.is_list)
    return True


def _apply_ref(run: _Run, rule: Rule, target: dict[str, Any], where: str) -> None:
    """A Reference to another resource of the message; one not built yet is set once the message is mapped."""
    url = run.full_urls.get(rule.ref or "")
    if url:
        set_path(target, rule.element, {"reference": url}, rule.info.is_list)
    else:
        run.pending.append((target, rule))
    if run.explain:
        run.trace.append(TraceLine(f"{where}.{rule.element}", f"ref {rule.ref}", rule.origin))


def _datatype(
    run: _Run, name: str, repetition: Repetition, segment: Segment | None, location: str, where: str
) -> dict[str, Any] | None:
    """One repetition through a datatype map (XPN -> HumanName), or None when nothing is left of it.

    A rule that carries a component as it is (most of them: family, given, line, city) is applied
    here, as _apply would, without its call: a name or an address costs a dozen rules a message.
    """
    built: dict[str, Any] = {}
    for rule in run.mappings.datatypes[name].rules:
        if not rule.plain_component:
            _apply(run, rule, built, segment, where, repetition=repetition, parent=location)
            continue
        text = repetition.component(*rule.plain_component)
        if not text:
            continue
        pattern = rule.info.pattern
        if pattern is not None and not pattern.match(text):
            raise _not_valid(rule, f"{location}.{rule.source}", where)
        if rule.info.is_list:
            built.setdefault(rule.element, []).append(text)
        else:
            built[rule.element] = text
        if run.explain:
            run.trace.append(TraceLine(f"{where}.{rule.element}", f"{location}.{rule.source}", rule.origin))
    prune(built)
    return built or None


def _already_there(target: dict[str, Any], element: str, value: Any) -> bool:
    """True when the list at `element` (a top-level element) holds `value`, or a concept with the same codes."""
    existing = target.get(element, [])

    def codes(item: Any) -> Any:
        if isinstance(item, dict) and item.get("coding"):
            return sorted((c.get("system", ""), c.get("code", "")) for c in item["coding"])
        return item

    return any(codes(item) == codes(value) for item in existing)


def _transform(run: _Run, rule: Rule, value: Any, segment: Segment | None, location: str, where: str) -> Any:
    if rule.datatype is not None:
        if not isinstance(value, Repetition):
            return None
        return _datatype(run, rule.datatype, value, segment, location, f"{where}.{rule.element}")
    if rule.function is not None:
        value = _call(run, rule, value, segment, location)
    if rule.vocabulary is not None:
        fhir_type = rule.info.type
        if rule.into is not None:
            fhir_type = _into_type(rule)
        value = lookup(run.mappings.vocabularies[rule.vocabulary], value, fhir_type, location, run.flags)
    if isinstance(value, Repetition):
        value = value.component(1)
    return value


def _call(run: _Run, rule: Rule, value: Any, segment: Segment | None, location: str) -> Any:
    """The rule's function on the value; a date read again in one message (PV1-45: Encounter, referral
    and care plan) is converted once."""
    function = rule.function or ""
    if function in TIME_FUNCTIONS and not rule.args:
        key = (function, text(value))
        converted = run.times.get(key)
        if converted is None:
            converted = run.times[key] = FUNCTIONS[function](value, run.context(segment, location))
        return converted
    if rule.args:
        return FUNCTIONS[function](value, run.context(segment, location), **rule.args)
    return FUNCTIONS[function](value, run.context(segment, location))


def _into_type(rule: Rule) -> str:
    return element_info(rule.info.type, rule.into or "").type
