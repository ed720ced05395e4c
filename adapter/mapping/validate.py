"""Full validation of a mapped bundle with fhir.resources R4B, reported as element paths, never values."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from adapter.errors import MappingError


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Raise MappingError (AE 102) naming the first invalid element path of `bundle`."""
    from fhir.resources.R4B.bundle import Bundle  # imported late: loading the models costs ~0.5 s

    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise MappingError(
            f"the mapped bundle is not valid FHIR R4 at {path} ({first['type']})", hl7_error_code="102"
        ) from None
