"""The loaded, checked form of the files under mappings/: what the engine runs, as frozen data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from adapter.mapping.fhirtypes import ElementInfo


@dataclass(frozen=True, slots=True)
class Condition:
    """`when:` a source value is present / equals / is one of some values (or the opposite)."""

    source: str
    present: bool | None = None
    equals: str | None = None
    one_of: tuple[str, ...] = ()
    negate: bool = False


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
class SiteConfig:
    """Site choices (mappings/site.yaml): which events are processed, identifier systems."""

    events: dict[str, Literal["process", "ignore"]]
    unknown_events: Literal["reject", "ignore"]
    systems: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MappingSet:
    """All mapping files, loaded and cross-checked."""

    site: SiteConfig
    messages: dict[str, MessageMap]
    datatypes: dict[str, DatatypeMap]
    vocabularies: dict[str, Vocabulary]
