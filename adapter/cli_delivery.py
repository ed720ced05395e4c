"""The people's side of delivery: `homeward dead-letters list|show|retry|discard` and `homeward replay`.

They open the store beside a running server (which picks up a retried or replayed row at its next
poll) and every action is audited with who did it and why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from adapter.config import Settings
from adapter.store import open_store
from adapter.store.base import Actor, DeliveryRecord, DeliveryState, Store


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _as_json(rec: DeliveryRecord) -> dict[str, Any]:
    data = dataclasses.asdict(rec)
    data["state"] = rec.state.value
    for key in ("created_at", "queued_at", "next_attempt_at", "delivered_at"):
        data[key] = _iso(data[key])
    return data


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _actor(args: argparse.Namespace) -> Actor:
    return Actor(args.by or getpass.getuser(), args.reason or "")


def _with_store(settings: Settings, work: Callable[[Store], Any]) -> Any:
    store = open_store(settings, serving=False)
    try:
        return asyncio.run(work(store))
    finally:
        store.close()


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    state = None if args.state == "all" else DeliveryState(args.state)
    rows: list[DeliveryRecord] = _with_store(settings, lambda s: s.list_deliveries(state=state, limit=args.limit))
    if args.json:
        _print_json([_as_json(r) for r in rows])
        return 0
    if not rows:
        print(f"no {args.state} deliveries")
        return 0
    print(
        f"{'id':>6}  {'state':<9} {'target':<10} {'facility':<10} {'control id':<20} {'event':<8} {'tries':>5}  reason"
    )
    for r in rows:
        print(
            f"{r.id:>6}  {r.state.value:<9} {r.target:<10} {r.sending_facility:<10} {r.message_control_id:<20}"
            f" {r.event:<8} {r.attempts:>5}  {r.last_error}"
        )
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    async def work(store: Store) -> tuple[DeliveryRecord | None, list[Any]]:
        rec = await store.get_delivery(args.id)
        trail = await store.audit_trail(outbox_id=args.id) if rec else []
        return rec, trail

    rec, trail = _with_store(settings, work)
    if rec is None:
        if args.json:  # still one JSON document on stdout, as `audit show` prints [] for an unknown MSH-10
            _print_json(None)
        print(f"homeward: no delivery with id {args.id}", file=sys.stderr)
        return 1
    data = _as_json(rec)
    if rec.last_outcome:
        with contextlib.suppress(orjson.JSONDecodeError):  # not JSON: shown as the server sent it
            data["last_outcome"] = orjson.loads(rec.last_outcome)
    data["history"] = [{"at": _iso(e.at), "stage": e.stage, **e.detail} for e in trail]
    if args.json:
        _print_json(data)
        return 0
    for key, value in data.items():
        if key in ("history", "last_outcome"):
            continue
        print(f"{key:>18}: {value}")
    if rec.last_outcome:
        print(f"{'last_outcome':>18}:")
        print(
            orjson.dumps(data["last_outcome"], option=orjson.OPT_INDENT_2).decode()
            if isinstance(data["last_outcome"], dict)
            else rec.last_outcome
        )
    print("history:")
    for entry in data["history"]:
        rest = {k: v for k, v in entry.items() if k not in ("at", "stage", "outcome")}
        print(f"  {entry['at']}  {entry['stage']:<20} {orjson.dumps(rest).decode()}")
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    if (args.id is None) == (not args.all):
        print("homeward: give one ID or --all", file=sys.stderr)
        return 2
    actor = _actor(args)

    async def work(store: Store) -> tuple[list[int], list[int]]:
        ids = [args.id] if args.id is not None else [r.id for r in await store.list_deliveries(limit=1_000_000)]
        done: list[int] = []
        missed: list[int] = []
        for outbox_id in ids:
            (done if await store.retry_dead(outbox_id, time.time(), actor) else missed).append(outbox_id)
        return done, missed

    done, missed = _with_store(settings, work)
    return _report("retried", done, missed, args.json)


def cmd_discard(args: argparse.Namespace, settings: Settings) -> int:
    actor = _actor(args)
    ok = _with_store(settings, lambda s: s.discard_dead(args.id, time.time(), actor))
    return _report("discarded", [args.id] if ok else [], [] if ok else [args.id], args.json)


def _report(verb: str, done: list[int], missed: list[int], as_json: bool) -> int:
    if as_json:
        _print_json({verb: done, "not_dead_letters": missed})
    else:
        print(f"{verb}: {', '.join(map(str, done)) or 'none'}")
        if missed:
            print(f"not dead letters (left alone): {', '.join(map(str, missed))}", file=sys.stderr)
    return 1 if missed else 0


def parse_since(value: str, timezone: str) -> float:
    """An ISO 8601 date or date-time; without an offset it is read in the site's time zone."""
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(timezone))
    return when.timestamp()


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    if (args.control_id is None) == (args.since is None):
        print("homeward: give --control-id or --since", file=sys.stderr)
        return 2
    try:
        since = None if args.since is None else parse_since(args.since, settings.mapping.timezone)
    except ValueError:
        print(f"homeward: --since {args.since!r} is not an ISO 8601 date or date-time", file=sys.stderr)
        return 2
    actor = _actor(args)
    new_ids: list[int] = _with_store(
        settings,
        lambda s: s.replay(time.time(), actor, control_id=args.control_id, since=since, target=args.target),
    )
    if args.json:
        _print_json({"queued": new_ids})
    else:
        print(
            f"queued again: {len(new_ids)} deliveries"
            + (f" (new ids {', '.join(map(str, new_ids))})" if new_ids else "")
        )
    return 0 if new_ids else 1


def add_parsers(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    settings_of: Callable[[argparse.Namespace], Settings],
) -> None:
    """Register `dead-letters` and `replay` on the main parser's subcommands."""

    def bind(fn: Callable[[argparse.Namespace, Settings], int]) -> Callable[[argparse.Namespace], int]:
        return lambda args: fn(args, settings_of(args))

    def common(p: argparse.ArgumentParser, action: bool = False) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        if action:
            p.add_argument("--by", help="who is doing this (default: the login name); audited")
            p.add_argument("--reason", help="why; audited")
        return p

    dl = sub.add_parser("dead-letters", help="list, show, retry or discard undeliverable messages")
    dl_sub = dl.add_subparsers(dest="dead_letters_command", required=True)
    p = common(dl_sub.add_parser("list", help="list dead letters (or other states with --state)"))
    p.add_argument("--state", default="dead", choices=[*(s.value for s in DeliveryState), "all"])
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=bind(cmd_list))
    p = common(dl_sub.add_parser("show", help="one delivery with its reason, OperationOutcome and history"))
    p.add_argument("id", type=int)
    p.set_defaults(func=bind(cmd_show))
    p = common(dl_sub.add_parser("retry", help="queue dead letter(s) again, attempts reset"), action=True)
    p.add_argument("id", type=int, nargs="?")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=bind(cmd_retry))
    p = common(dl_sub.add_parser("discard", help="close a dead letter without delivering it (kept)"), action=True)
    p.add_argument("id", type=int)
    p.set_defaults(func=bind(cmd_discard))

    rp = common(sub.add_parser("replay", help="deliver stored messages again"), action=True)
    rp.add_argument("--control-id", help="MSH-10 of the message(s) to deliver again")
    rp.add_argument("--since", help="every message received at or after this ISO 8601 time")
    rp.add_argument("--target", help="only deliveries to this target")
    rp.set_defaults(func=bind(cmd_replay))
