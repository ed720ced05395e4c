"""`homeward import FILE...`: backlog files into the store as if received, with progress and a summary.

It opens the store beside a running server (which delivers what is imported at its next poll).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from adapter import logging as adapter_logging
from adapter.audit.keys import load_keys
from adapter.config import Settings
from adapter.importer import Positions, Summary, import_file
from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.store import open_store

# SQLite's single writer commits in submission order, so messages can overlap without reordering
# (and share group commits); PostgreSQL commits from several connections, so one at a time.
SQLITE_WINDOW = 32


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every message was accepted, a duplicate or filtered; 1 if any was refused or it stopped."""
    # Per-message info lines would drown the progress bar; refusals still log as warnings.
    adapter_logging.configure(
        settings.log.format, "warning" if settings.log.level in ("debug", "info") else settings.log.level
    )
    mappings = load_mappings(settings.mapping.dir)
    keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    store = open_store(settings, serving=False, audit_keys=keys)
    options = IntakeOptions(
        timezone=settings.mapping.timezone,
        validation=settings.mapping.validation,
        strict=settings.hl7.strict,
        fallback_charset=settings.hl7.fallback_charset,
    )
    intake = Intake(store, mappings, options, audit_keys=keys)
    positions = Positions(args.state)
    window = 1 if settings.store.url else SQLITE_WINDOW
    worst = 0
    summaries: list[dict[str, Any]] = []  # --json: one entry per file, printed at the end
    try:
        for name in args.files:
            summary = asyncio.run(_one(intake, Path(name), positions, window, progress=not args.no_progress))
            if args.json:
                summaries.append(_as_json(name, summary))
            else:
                print("\n".join(summary.lines(name)))
            if summary.stopped:
                worst = 1
                break
            if summary.outcomes["refused"]:
                worst = 1
    finally:
        store.close()
    if args.json:
        sys.stdout.write(orjson.dumps(summaries, option=orjson.OPT_INDENT_2).decode() + "\n")
    return worst


def _as_json(name: str, summary: Summary) -> dict[str, Any]:
    outcomes = {k: summary.outcomes[k] for k in ("accepted", "duplicate", "filtered", "unrouted", "refused")}
    return {
        "file": name,
        "messages": summary.total,
        "outcomes": outcomes,
        "refused_reasons": dict(summary.reasons.most_common()),
        "declared": summary.declared,
        "resumed_from": summary.resumed_from,
        "position": summary.position,
        "stopped": summary.stopped or None,
    }


async def _one(intake: Intake, file: Path, positions: Positions, window: int, *, progress: bool) -> Summary:
    from tqdm import tqdm

    size = file.stat().st_size
    start = positions.get(file)
    # disable=None: no bar when stderr is not a terminal (CI, a pipe); --no-progress turns it off anywhere.
    with tqdm(
        total=size, initial=start, unit="B", unit_scale=True, desc=file.name, disable=None if progress else True
    ) as bar:
        last = [start]

        def advance(offset: int) -> None:
            bar.update(offset - last[0])
            last[0] = offset

        return await import_file(intake, file, positions, window=window, progress=advance)


def add_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    settings_of: Callable[[argparse.Namespace], Settings],
) -> None:
    """Register `import` on the main parser's subcommands."""
    p = with_config(sub.add_parser("import", help="take HL7 batch/backlog file(s) into the store as if received"))
    p.add_argument("files", nargs="+", help="FHS/BHS batch files, or messages one after another")
    p.add_argument(
        "--state",
        type=Path,
        default=Path("var/import-state.json"),
        help="where the position reached in each file is kept (a second run resumes from it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.set_defaults(func=lambda args: cmd_import(args, settings_of(args)))
