"""The loaded, checked form of the files under mappings/: what the engine runs, as frozen data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from adapter.mapping.fhirtypes import ElementInfo


@dataclass(frozen=True, slots=True)
class Condition:
    """`when:` a source value is present / equals / is one of some values, or `all_of` hold (or the opposite)."""

    source: str = ""
    present: bool | None = None
    equals: str | None = None
    one_of: tuple[str, ...] = ()
    negate: bool = False
    all_of: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One field -> element rule. `source` is "PID-3.1" in segment maps and "1.2" in datatype maps."""

    element: str
    info: ElementInfo
    origin: str  # file and key, for errors and `homeward map --explain`
    source: str | None = None
    repeat: bool = False
    datatype: str | None = None
    function: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    vocabulary: str | None = None
    value: Any = None
    ref: str | None = None
    when: Condition | None = None
    # `template` + `into`: the element gets a copy of `template` with the value set at `into`
    # (one CarePlan.activity per service, each with its detail.status).
    template: dict[str, Any] | None = None
    into: str | None = None
    all_segments: bool = False  # read the field from every segment of that name (each DG1, each NTE)
    # Leave out a value the list already holds (the same codes when it has a coding): PV2-3 and a DG1
    # often give the same diagnosis, and the council should read it once.
    unique: bool = False
    # A datatype map's "1.2" as numbers (component 1, subcomponent 2), read once here rather than
    # for every repetition of every message; None for a segment map's "PID-3.1".
    component_at: tuple[int, int] | None = field(init=False, compare=False, repr=False)
    # No datatype, function or vocabulary: the value is carried as read (its first component).
    as_read: bool = field(init=False, compare=False, repr=False)
    # `element` is one name ("birthDate", not "period.start" or "location[0]"), and neither a template
    # nor `unique` applies: the value is set as it is, without a path walk.
    direct: bool = field(init=False, compare=False, repr=False)
    # `component_at` for a datatype rule with no `when` that sets its component as it is (family, city).
    plain_component: tuple[int, int] | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        at = None
        if self.source is not None and "-" not in self.source:
            component, _, sub = self.source.partition(".")
            at = (int(component), int(sub or 1))
        object.__setattr__(self, "component_at", at)
        object.__setattr__(self, "as_read", self.datatype is None and self.function is None and self.vocabulary is None)
        flat = "." not in self.element and "[" not in self.element
        templated = self.template is not None and self.into is not None
        object.__setattr__(self, "direct", flat and not templated and not self.unique)
        plain = self.when is None and self.as_read and self.direct
        object.__setattr__(self, "plain_component", at if plain else None)


@dataclass(frozen=True, slots=True)
class DatatypeMap:
    """A reusable v2 datatype -> FHIR datatype map (XPN-HumanName, XAD-Address, ...)."""

    name: str
    fhir_type: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """A v2 table (or site code table) -> FHIR codes, with a policy for values it does not list."""

    name: str
    system: str
    codes: dict[str, dict[str, str]]  # v2 code -> {code, display, system?}
    default: str | None = None
    unmapped: Literal["error", "default", "omit", "text"] = "error"
    national_code_confirmed: bool = True
    # v2 codes whose FHIR code is in a local (Homeward) CodeSystem because no national code is confirmed.
    unconfirmed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ResourceMap:
    """How one resource of a message is built: rules in order, then how the entry is written."""

    key: str
    resource_type: str
    rules: tuple[Rule, ...]
    origin: str
    foreach: str | None = None  # one resource per occurrence of this segment (NK1 -> RelatedPerson)
    when: Condition | None = None
    identity: tuple[str, ...] = ()  # site system names to conditionally update on, in preference order
    profile: str | None = None
    # Without an identity, the id derives from these resources' ids (keys) and from the values of
    # `anchor_fields` (the next of kin's name), else the occurrence number, so the same next of kin
    # gets the same id from every event.
    anchor: tuple[str, ...] = ()
    anchor_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageMap:
    """Everything one trigger event produces (mappings/messages/ADT_A03.yaml)."""

    event: str
    description: str
    requires: tuple[str, ...]
    resources: tuple[ResourceMap, ...]
    origin: str
    provenance: bool = True


@dataclass(frozen=True, slots=True)
class Council:
    """A council a route delivers to: the ServiceRequest performer, by name and identifier."""

    name: str
    system: str
    code: str


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule: a message whose patient address (or a field) matches goes to `targets`."""

    name: str
    targets: tuple[str, ...]
    council: Council | None = None
    postcode_districts: frozenset[str] = frozenset()
    local_authorities: frozenset[str] = frozenset()
    when: Condition | None = None


@dataclass(frozen=True, slots=True)
class Routing:
    """site.yaml `routing:`: where the address is read, the rules, and what happens with no match."""

    postcode_field: str = "PID-11.5"
    local_authority_field: str = "PID-11.9"
    routes: tuple[Route, ...] = ()
    unrouted_targets: tuple[str, ...] = ()  # empty: a message no rule matches is kept, not delivered


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """Site choices (mappings/site.yaml): which events are processed, identifier systems, routing."""

    events: dict[str, Literal["process", "ignore"]]
    unknown_events: Literal["reject", "ignore"]
    systems: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)  # named locations: pathway -> ZDS-1
    rules: dict[str, Condition] = field(default_factory=dict)  # named conditions: social_admission
    routing: Routing = field(default_factory=Routing)


@dataclass(frozen=True, slots=True)
class MappingSet:
    """All mapping files, loaded and cross-checked."""

    site: SiteConfig
    messages: dict[str, MessageMap]
    datatypes: dict[str, DatatypeMap]
    vocabularies: dict[str, Vocabulary]
