"""structlog set-up: one JSON line per event, correlation fields from contextvars, no patient data."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

# Keys whose values may carry patient data if a future call site is careless; dropped, not masked,
# so nothing about the value (not even its length) reaches the log.
_PHI_KEYS = frozenset(
    {
        "name",
        "family",
        "given",
        "birth_date",
        "birthdate",
        "dob",
        "nhs_number",
        "address",
        "postcode",
        "telecom",
        "phone",
        "payload",
        "body",
        "raw",
        "message_text",
        "segment_text",
    }
)


def drop_phi_keys(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove keys that are named like patient data (a guard behind the rule "log ids, not values")."""
    for key in _PHI_KEYS.intersection(event_dict):
        event_dict[key] = "[removed]"
    return event_dict


def safe_exc_info(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Render a traceback as types and frames only.

    An exception's message can quote the value that failed (a date, a name), so only its type is
    kept; the frames still say where it happened.
    """
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    _, exc, tb = exc_info
    if exc is None:
        return event_dict
    chain = []
    while exc is not None:
        chain.append(type(exc).__qualname__)
        exc = exc.__cause__ or exc.__context__
    frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)]
    event_dict["exception"] = {"types": chain, "frames": frames}
    return event_dict


def _json_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure(format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process. `format` is auto | json | console."""
    stream = stream or sys.stderr
    if format == "auto":
        format = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if format == "console"
        else structlog.processors.JSONRenderer(serializer=_json_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_phi_keys,
            safe_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
