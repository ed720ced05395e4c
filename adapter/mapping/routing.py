"""Which targets (and councils) a message goes to, chosen by site.yaml `routing:` rules; pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapter.mapping.model import Condition, Council, Routing


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The targets a message goes to; empty `targets` means no rule matched and none is the default."""

    targets: tuple[str, ...]
    councils: tuple[Council, ...]
    matched: tuple[str, ...]  # route names, for the audit record

    @property
    def unrouted(self) -> bool:
        return not self.targets


def postcode_district(postcode: str) -> str:
    """The outward code of a UK postcode ("MK9 1AA" -> "MK9", "MK91AA" -> "MK9")."""
    compact = postcode.upper().replace(" ", "")
    if " " in postcode.strip():
        return postcode.strip().upper().split()[0]
    return compact[:-3] if len(compact) > 4 else compact


def decide(routing: Routing, read: Callable[[str], str], holds: Callable[[Condition], bool]) -> RouteDecision:
    """Apply every route in order; a message may match several (their targets are joined, in order).

    `read(location)` gives the first value at a location; `holds(condition)` evaluates a `when:`.
    """
    district = postcode_district(read(routing.postcode_field)) if routing.postcode_field else ""
    authority = read(routing.local_authority_field).upper() if routing.local_authority_field else ""
    targets: list[str] = []
    councils: list[Council] = []
    matched: list[str] = []
    for route in routing.routes:
        hit = (
            (district and district in route.postcode_districts)
            or (authority and authority in route.local_authorities)
            or (route.when is not None and holds(route.when))
        )
        if not hit:
            continue
        matched.append(route.name)
        targets.extend(t for t in route.targets if t not in targets)
        if route.council is not None and route.council not in councils:
            councils.append(route.council)
    if not targets:
        targets = list(routing.unrouted_targets)
    return RouteDecision(tuple(targets), tuple(councils), tuple(matched))


def named_targets(routing: Routing) -> set[str]:
    """Every target name the routing rules can choose (checked against the configured targets at start-up)."""
    names = set(routing.unrouted_targets)
    for route in routing.routes:
        names.update(route.targets)
    return names
