"""The README's log-event catalogue lists every event name the code logs (operators alert on these names)."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_events() -> set[str]:
    """Every `<logger>.<level>("area.event", ...)` in adapter/."""
    events = set()
    for path in (ROOT / "adapter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.fullmatch(r"[a-z_]+\.[a-z_]+", node.args[0].value)
            ):
                events.add(node.args[0].value)
    return events


def test_every_event_is_in_the_catalogue() -> None:
    """Each event name logged in adapter/ appears in README's "Log events" table, and no row is stale."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Log events", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z_]+\.[a-z_]+)`", cell)}
    code = logged_events()
    assert len(code) > 20  # the scan itself works
    assert code - documented == set(), "log events missing from the README catalogue"
    assert documented - code == set(), "README catalogue lists events the code no longer logs"
