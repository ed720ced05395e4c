"""`homeward audit ...`: verify, show, list, find; text for people, --json for scripts."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from adapter.audit import query
from adapter.audit.keys import AuditKeys, load_keys
from adapter.config import Settings
from adapter.errors import ConfigError


def _keys(settings: Settings) -> AuditKeys | None:
    return load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)


def _emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, timezone: str) -> float:
    """ISO 8601 (without an offset: the site's time zone, as `replay --since`) or an age: 30m, 2h, 7d."""
    match = _RELATIVE.match(value.strip())
    if match:
        return time.time() - float(match.group(1)) * _UNIT[match.group(2)]
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(f"not a time: {value!r} (use ISO 8601, or an age such as 30m, 2h, 7d)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment.timestamp()


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    keys = _keys(settings)
    checkpoints = {}
    for text in args.expect or []:
        seq, _, head_hash = text.partition(":")
        if not seq.isdigit() or len(head_hash) != 64:
            raise ConfigError(f"--expect {text!r}: use SEQ:HASH as logged by audit.checkpoint")
        checkpoints[int(seq)] = head_hash
    with query.connect(settings) as conn:
        result = query.verify(conn, keys, checkpoints)
    if args.json:
        _emit_json(result.as_dict())
    elif result.problem is None:
        head = f"head {result.head.seq} {result.head.hash[:16]}" if result.head else "empty"
        signed = "signature checked" if keys else "signature NOT checked (no audit key configured)"
        print(f"audit chain ok: {result.checked} records, {head}, {signed}")
    else:
        p = result.problem
        print(f"audit chain BROKEN at record {p.seq} ({p.kind}): {p.message}", file=sys.stderr)
    return 0 if result.problem is None else 1


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    with query.connect(settings) as conn:
        records = query.timeline(conn, args.control_id)
    if args.json:
        _emit_json(records)
    else:
        for r in records:
            detail = " ".join(f"{k}={_short(v)}" for k, v in r["detail"].items() if v not in (None, "", [], {}))
            where = f" outbox={r['outbox_id']}" if r["outbox_id"] else ""
            print(f"{_when(r['at'])}  #{r['seq']:<7} inbound={r['inbound_id']}{where}  {r['stage']:<16} {detail}")
    if not records:
        print(f"no audit records for MSH-10 {args.control_id!r}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings, patient_key: str | None = None) -> int:
    tz = settings.mapping.timezone
    with query.connect(settings) as conn:
        rows = query.list_messages(
            conn,
            since=parse_time(args.since, tz) if args.since else None,
            until=parse_time(args.until, tz) if args.until else None,
            event=args.event,
            status=args.status,
            target=args.target,
            patient_key=patient_key,
            limit=args.limit,
        )
    if args.json:
        _emit_json(rows)
        return 0
    for r in rows:
        print(
            f"{_when(r['received_at'])}  {r['sending_facility'] or '-'}|{r['message_control_id'] or '-'}"
            f"  {r['event'] or '-':<8} {r['status']:<10} ack={r['ack_code'] or '-'}"
            f"  targets={','.join(r['targets']) or '-'}{'  body purged' if r['body_purged'] else ''}"
        )
    print(f"{len(rows)} message(s)", file=sys.stderr)
    return 0


def cmd_find(args: argparse.Namespace, settings: Settings) -> int:
    keys = _keys(settings)
    if keys is None:
        raise ConfigError("finding a patient's messages needs the audit key (HOMEWARD_AUDIT_HMAC_KEY or _FILE)")
    number = args.nhs_number if args.nhs_number != "-" else sys.stdin.readline()
    return cmd_list(args, settings, patient_key=keys.patient_key(number.strip()))


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import getpass

    from adapter.store import open_store
    from adapter.store.base import Actor

    days = args.older_than_days if args.older_than_days is not None else settings.audit.body_retention_days
    if not days or days <= 0:
        raise ConfigError("give --older-than-days N, or set audit.body_retention_days")
    before = time.time() - days * 86400
    actor = Actor(args.by or getpass.getuser(), args.reason or f"retention: bodies older than {days:g} days")
    store = open_store(settings, serving=False)
    try:
        purged = asyncio.run(store.purge_bodies(before, actor))
    finally:
        store.close()
    if args.json:
        _emit_json({"purged": purged, "received_before": _when(before)})
    else:
        print(f"purged the bodies of {purged} message(s) received before {_when(before)}")
    return 0


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 120 else text[:117] + "..."


def add_parser(sub: Any, with_config: Any) -> None:
    audit = sub.add_parser("audit", help="verify and query the audit trail")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        return p

    verify = common(commands.add_parser("verify", help="check the hash chain; exit 1 naming the first bad record"))
    verify.add_argument(
        "--expect",
        action="append",
        metavar="SEQ:HASH",
        help="a head recorded elsewhere (the audit.checkpoint log line); must still be in the chain",
    )
    verify.set_defaults(audit_func=cmd_verify)
    show = common(commands.add_parser("show", help="the whole history of a message (by MSH-10) as a timeline"))
    show.add_argument("control_id")
    show.set_defaults(audit_func=cmd_show)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", help="received at or after: ISO 8601 (site time zone if no offset) or 30m / 2h / 7d")
        p.add_argument("--until", help="received before (same forms as --since)")
        p.add_argument("--event", help="trigger event, e.g. ADT^A03")
        p.add_argument(
            "--status", help="pending, delivered, dead (queued messages) or accepted/filtered/duplicate/refused"
        )
        p.add_argument("--target", help="delivery target name")
        p.add_argument("--limit", type=int, default=1000)

    listing = common(commands.add_parser("list", help="messages with their status, newest first"))
    filters(listing)
    listing.set_defaults(audit_func=cmd_list)
    find = common(commands.add_parser("find", help="a patient's messages, by NHS number (needs the audit key)"))
    find.add_argument("--nhs-number", required=True, help="the number, or - to read it from stdin")
    filters(find)
    find.set_defaults(audit_func=cmd_find)

    purge = common(
        commands.add_parser("purge", help="drop original bodies past retention; audit records and hashes stay")
    )
    purge.add_argument("--older-than-days", type=float, help="default: audit.body_retention_days")
    purge.add_argument("--by", help="who is doing this (default: the login name); audited")
    purge.add_argument("--reason", help="why; audited")
    purge.set_defaults(audit_func=cmd_purge)

    def run(args: argparse.Namespace) -> int:
        settings = Settings.load(args.config)
        return int(args.audit_func(args, settings))

    audit.set_defaults(func=run)
