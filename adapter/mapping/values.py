"""Plain-dict building blocks of the engine: code table lookups, dotted-path setting, templates, pruning."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from adapter.errors import MappingError
from adapter.hl7.message import Repetition
from adapter.mapping.model import Vocabulary


def fill(template: dict[str, Any], into: str, value: Any) -> dict[str, Any]:
    """A copy of `template` with `value` at the dotted path `into`."""
    built = copy.deepcopy(template)
    set_path(built, into, value, False)
    return built


def lookup(vocab: Vocabulary, value: Any, fhir_type: str, location: str, flags: list[str]) -> Any:
    """A code table lookup; a value the table does not list follows its `unmapped` policy, noted in `flags`."""
    code = value.component(1) if isinstance(value, Repetition) else ("" if value is None else str(value))
    if not code:
        return None
    entry = vocab.codes.get(code) or vocab.codes.get(code.upper())
    if entry is None:
        # The note names the field and the table, never the value (it may be patient data).
        if vocab.unmapped == "omit":
            flags.append(f"{location}: value not in vocabulary {vocab.name}; left out")
            return None
        if vocab.unmapped == "default" and vocab.default is not None:
            flags.append(f"{location}: value not in vocabulary {vocab.name}; default {vocab.default} used")
            entry = vocab.codes[vocab.default]
        elif vocab.unmapped == "text" and fhir_type == "CodeableConcept":
            flags.append(f"{location}: value not in vocabulary {vocab.name}; carried as text")
            return {"text": code}
        else:
            raise MappingError(
                f"{location}: value not in vocabulary {vocab.name}", location=location, hl7_error_code="103"
            )
    system = entry.get("system", vocab.system)
    if fhir_type == "code":
        return entry["code"]
    coding = {"system": system, "code": entry["code"]}
    if "display" in entry:
        coding["display"] = entry["display"]
    return coding if fhir_type == "Coding" else {"coding": [coding]}


def set_path(target: dict[str, Any], path: str, value: Any, last_is_list: bool) -> None:
    """Set `value` at a dotted path; `[+]` appends, `[n]` indexes, list elements append by default."""
    node = target
    parents, name, marker = _steps(path)
    for step, step_marker in parents:
        if step_marker:
            items = node.setdefault(step, [])
            idx = len(items) if step_marker == "+" else int(step_marker)
            while len(items) <= idx:
                items.append({})
            node = items[idx]
        else:
            node = node.setdefault(step, {})
    if marker or last_is_list:
        items = node.setdefault(name, [])
        if marker and marker != "+":
            idx = int(marker)
            while len(items) <= idx:
                items.append(None)
            items[idx] = value
        else:
            items.append(value)
    else:
        node[name] = value


@cache
def _steps(path: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """ "a.b[+].c[0]" -> ((("a", ""), ("b", "+")), "c", "0"): the steps to the last element, its name and
    its marker; a mapping has a few hundred paths."""
    steps = []
    for part in path.split("."):
        name, _, marker = part.partition("[")
        steps.append((name, marker.rstrip("]")))
    *parents, (name, marker) = steps
    return tuple(parents), name, marker


def prune(node: Any) -> bool:
    """Remove empty dicts, lists and None values in place; return True when `node` itself is empty."""
    if type(node) is str:
        return not node
    if isinstance(node, dict):
        return _prune_dict(node)
    if isinstance(node, list):
        return _prune_list(node)
    return node is None or node == ""


# The hot path (about a sixth of mapping CPU when each child cost a call): children are told apart
# by their exact type inline, so a text leaf, most of a bundle, costs no call and no list is built
# unless something is empty. Anything else (a dict subclass, None, a number) goes through prune().


def _prune_dict(node: dict[str, Any]) -> bool:
    empty: list[str] | None = None
    for key, value in node.items():
        kind = type(value)
        if kind is str:
            if value:
                continue
        elif kind is dict:
            if not _prune_dict(value):
                continue
        elif kind is list:
            if not _prune_list(value):
                continue
        elif not prune(value):
            continue
        if empty is None:
            empty = [key]
        else:
            empty.append(key)
    if empty is not None:
        for key in empty:
            del node[key]
    return not node


def _prune_list(node: list[Any]) -> bool:
    found = False  # every item is pruned, even after an empty one is found
    for value in node:
        kind = type(value)
        if kind is str:
            if value:
                continue
        elif kind is dict:
            if not _prune_dict(value):
                continue
        elif kind is list:
            if not _prune_list(value):
                continue
        elif not prune(value):
            continue
        found = True
    if found:
        node[:] = [v for v in node if not _empty(v)]
    return not node


def _empty(value: Any) -> bool:
    """What prune() has already found empty (without pruning again)."""
    return value is None or value == "" or value == {} or value == []
