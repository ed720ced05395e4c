"""What fhir.resources R4B says about an element path: its FHIR type, whether it repeats, its value rule.

The mapping loader asks this at start-up, so a typo in a mapping file stops the adapter with the
file and key named; the engine uses the primitive patterns (FHIR R4 datatypes page) to check every
value taken from the feed before it is stored.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

# FHIR R4 primitive value patterns (https://hl7.org/fhir/R4/datatypes.html).
PRIMITIVE_PATTERNS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "string": r"^[ \r\n\t\S]+$",
        "markdown": r"^[ \r\n\t\S]+$",
        "code": r"^[^\s]+( [^\s]+)*$",
        "id": r"^[A-Za-z0-9\-\.]{1,64}$",
        "uri": r"^\S*$",
        "url": r"^\S*$",
        "canonical": r"^\S*$",
        "boolean": r"^(true|false)$",
        "integer": r"^-?([0]|([1-9][0-9]*))$",
        "positiveInt": r"^\+?[1-9][0-9]*$",
        "unsignedInt": r"^[0]|([1-9][0-9]*)$",
        "decimal": r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$",
        "date": r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?$",
        "dateTime": (
            r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
            r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|"
            r"14:00)))?)?)?$"
        ),
        "instant": (
            r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
            r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"
        ),
        "time": r"^([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?$",
    }.items()
}

_PRIMITIVE_BY_ANNOTATION = {
    "Code": "code",
    "Date": "date",
    "DateTime": "dateTime",
    "Instant": "instant",
    "Time": "time",
    "String": "string",
    "Markdown": "markdown",
    "Id": "id",
    "Uri": "uri",
    "Url": "url",
    "Canonical": "canonical",
    "Boolean": "boolean",
    "Integer": "integer",
    "PositiveInt": "positiveInt",
    "UnsignedInt": "unsignedInt",
    "Decimal": "decimal",
    "Oid": "uri",
    "Uuid": "uri",
    "Base64Binary": "string",
    "Xhtml": "string",
}


@dataclass(frozen=True, slots=True)
class ElementInfo:
    """The FHIR type of one element and whether it repeats."""

    type: str  # "code", "dateTime", "CodeableConcept", "Reference", ...
    is_list: bool
    # Derived from `type` once: the engine asks for every value it sets.
    is_primitive: bool = field(init=False, compare=False)
    # The value pattern check_primitive() applies (None: nothing to check), looked up once.
    pattern: re.Pattern[str] | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_primitive", self.type[0].islower())
        object.__setattr__(self, "pattern", PRIMITIVE_PATTERNS.get(self.type))


class UnknownElement(LookupError):
    """The path names no element of that FHIR type."""


def element_info(type_name: str, path: str) -> ElementInfo:
    """Resolve a dotted FHIR path (list markers like [+] or [0] allowed) from `type_name`.

    Raises UnknownElement naming the part that does not exist.
    """
    current = ElementInfo(type_name, False)
    for part in path.split("."):
        name = part.split("[", 1)[0]
        current = _child(current.type, name)
    return current


@cache
def _child(type_name: str, name: str) -> ElementInfo:
    if type_name[0].islower():
        raise UnknownElement(f"{type_name} is a primitive and has no element '{name}'")
    model: Any = get_fhir_model_class(type_name)
    field = None
    for field_name, candidate in model.model_fields.items():
        if (candidate.alias or field_name) == name or field_name == name:
            field = candidate
            break
    if field is None:
        raise UnknownElement(f"{type_name} has no element '{name}'")
    return _describe(field.annotation)


def _describe(annotation: Any) -> ElementInfo:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            annotation = next(a for a in args if a is not type(None))
        elif origin in (list, typing.List):  # noqa: UP006 - fhir.resources uses typing.List
            is_list = True
            annotation = args[0]
        elif origin is typing.Annotated:
            meta = args[1]
            return ElementInfo(_PRIMITIVE_BY_ANNOTATION.get(type(meta).__name__, "string"), is_list)
        else:
            break
    name = getattr(annotation, "__name__", str(annotation))
    if name.endswith("Type"):
        name = name[: -len("Type")]
    return ElementInfo(name, is_list)


def check_primitive(type_name: str, value: Any) -> bool:
    """True when `value` is a valid lexical form of the FHIR primitive `type_name`."""
    pattern = PRIMITIVE_PATTERNS.get(type_name)
    if pattern is None:
        return True
    if isinstance(value, bool):
        return type_name == "boolean"
    return bool(pattern.match(str(value)))
