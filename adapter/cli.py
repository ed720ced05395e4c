"""The `homeward` command: serve, map, send, import, migrate, check-config, audit, dead-letters, replay."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from adapter import __version__
from adapter import logging as adapter_logging
from adapter.audit import cli as audit_cli
from adapter.config import Settings, env_names
from adapter.errors import AdapterError, ConfigError, InboundError

# The conformance artefacts (profiles, terminology): next to the package in a checkout, else ./conformance
# (the Docker image's working directory holds a copy); --conformance points elsewhere.
_CHECKOUT_CONFORMANCE = Path(__file__).resolve().parent.parent / "conformance"
CONFORMANCE_DIR = _CHECKOUT_CONFORMANCE if _CHECKOUT_CONFORMANCE.is_dir() else Path("conformance")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(args.config)


def _print_json(value: Any) -> None:
    """--json: one JSON document on stdout, whatever the number of files, so a script can parse it."""
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    adapter_logging.configure(settings.log.format, settings.log.level)
    # A worker's end of its relay channel to serve (SQLite); None otherwise.
    store_sock = None if args.store_fd is None else socket.socket(fileno=args.store_fd)
    if args.intake_fd is not None:
        # Started by a serve process with mllp.workers, to run the intake on its socket (and import
        # nothing of the forwarder's).
        from adapter.lifeline import end_with_parent
        from adapter.workers import run_worker

        end_with_parent()
        asyncio.run(run_worker(settings, socket.socket(fileno=args.intake_fd), store_sock))
        return 0
    if args.deliver_shard is not None:
        # Started by a serve process with delivery.workers, to deliver its share of the queues (and
        # import nothing of the intake's).
        from adapter.delivery_workers import serve_shard
        from adapter.lifeline import end_with_parent

        end_with_parent()
        serve_shard(settings, args.deliver_shard, store_sock)
        return 0
    from adapter.app import App

    app = App(settings, config=None if args.config is None else str(args.config))
    asyncio.run(app.run())
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    """Map HL7 file(s) to Bundle JSON on stdout, without touching the network or the store."""
    from adapter.hl7.parse import parse
    from adapter.mapping.engine import map_message
    from adapter.mapping.loader import load_mappings
    from adapter.mapping.validate import validate_bundle

    settings = _settings(args)
    mappings = load_mappings(settings.mapping.dir)
    tz = ZoneInfo(settings.mapping.timezone)
    failures = 0
    results: list[dict[str, Any]] = []  # --json: one entry per file, failures included
    for name in args.files:
        try:
            message = parse(
                Path(name).read_bytes(),
                fallback_charset=settings.hl7.fallback_charset,
                strict=settings.hl7.strict,
            )
            result = map_message(message, mappings, tz, explain=args.explain)
            validate_bundle(result.bundle)
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
            results.append({"file": name, "error": {"reason": f"cannot read: {exc.strerror}"}})
            failures += 1
            continue
        except InboundError as exc:
            where = f" at {exc.location}" if exc.location else ""
            print(f"{name}: {exc.ack_code.value} {exc.hl7_error_code}{where}: {exc.reason}", file=sys.stderr)
            error = {
                "ack_code": exc.ack_code.value,
                "hl7_error_code": exc.hl7_error_code,
                "location": exc.location,
                "reason": exc.reason,
            }
            results.append({"file": name, "error": error})
            failures += 1
            continue
        if args.explain:
            from adapter.mapping.explain import explain

            lines = explain(message, result)
            if args.json:
                results.append({"file": name, "explain": lines})
            else:
                sys.stdout.write("\n".join([f"{name}:", *lines]) + "\n")
            continue
        if args.json:
            results.append({"file": name, "bundle": result.bundle, "flags": result.flags})
            continue
        sys.stdout.write(orjson.dumps(result.bundle, option=orjson.OPT_INDENT_2).decode() + "\n")
        for flag in result.flags:
            print(f"{name}: note: {flag}", file=sys.stderr)
    if args.json:
        _print_json(results)
    return 1 if failures else 0


def ack_summary(ack: bytes) -> dict[str, Any]:
    """The parts of an ACK a script needs: MSA-1, MSA-2, MSA-3, ERR-3 and ERR-8, and every segment."""
    text = ack.decode("utf-8", "replace")
    separator = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    segments = [line for line in re.split(r"[\r\n]+", text) if line]
    fields = {line[:3]: line.split(separator) for line in reversed(segments)}  # the first of each name wins

    def field(segment: str, n: int) -> str | None:
        values = fields.get(segment, [])
        return values[n] if len(values) > n and values[n] else None

    error_code = field("ERR", 3)
    return {
        "ack_code": field("MSA", 1),
        "message_control_id": field("MSA", 2),
        "text": field("MSA", 3),
        "hl7_error_code": error_code.split("^")[0] if error_code else None,
        "error": field("ERR", 8),
        "segments": segments,
    }


def cmd_send(args: argparse.Namespace) -> int:
    """Send HL7 file(s) over MLLP and print each ACK."""
    from adapter.mllp.client import MllpClient

    worst = 0
    sent: list[dict[str, Any]] = []
    with MllpClient(args.host, args.port, timeout=args.timeout) as client:
        for name in args.files:
            text = Path(name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
            ack = client.send(text.strip(b"\r") + b"\r")
            if args.json:
                sent.append({"file": name, **ack_summary(ack)})
            else:
                print(f"{name}: " + ack.decode("utf-8", "replace").replace("\r", "\n    ").rstrip())
            if b"MSA|AA" not in ack:
                worst = 1
    if args.json:
        _print_json(sent)
    return worst


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or update the store's schema (PostgreSQL: run once before starting the instances)."""
    from adapter.store import migrate

    settings = _settings(args)
    done = migrate(settings)
    if args.json:
        _print_json({"store": "postgresql" if settings.store.url else str(settings.store.path), "result": done})
    else:
        print(done)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate settings and every mapping file; print a summary."""
    from adapter.mapping.loader import load_mappings

    settings = _settings(args)
    mappings = load_mappings(settings.mapping.dir)
    target = "fhir server" if settings.fhir.base_url else f"directory {settings.outbox.dir}"
    processed = sorted(e for e, a in mappings.site.events.items() if a == "process")
    routing = mappings.site.routing
    if args.json:
        summary: dict[str, Any] = {
            "settings": "ok",
            "mllp": f"{settings.mllp.host}:{settings.mllp.port}",
            "store": "postgresql" if settings.store.url else str(settings.store.path),
            "default_target": target,
            "mappings": {
                "dir": str(settings.mapping.dir),
                "message_maps": len(mappings.messages),
                "datatype_maps": len(mappings.datatypes),
                "code_tables": len(mappings.vocabularies),
            },
            "events_processed": processed,
            "unknown_events": mappings.site.unknown_events,
            "routes": [{"name": r.name, "targets": list(r.targets)} for r in routing.routes],
            "unrouted_targets": list(routing.unrouted_targets),
        }
        if args.env:
            summary["env"] = {name: f"{section}.{key}" for name, (section, key) in sorted(env_names().items())}
        _print_json(summary)
        return 0
    print(
        f"settings: ok (mllp {settings.mllp.host}:{settings.mllp.port}, store {settings.store.path}, target {target})"
    )
    print(
        f"mappings: ok ({settings.mapping.dir}: {len(mappings.messages)} message maps, "
        f"{len(mappings.datatypes)} datatype maps, {len(mappings.vocabularies)} code tables)"
    )
    print(f"events processed: {', '.join(processed) or 'none'}; others: {mappings.site.unknown_events}")
    unrouted = ", ".join(routing.unrouted_targets) or "kept as unrouted, delivered nowhere"
    names = ", ".join(f"{r.name} -> {'/'.join(r.targets)}" for r in routing.routes) or "none"
    print(f"routing: {names}; no match: {unrouted}")
    if args.env:
        for name, (section, key) in sorted(env_names().items()):
            print(f"  {name} -> {section}.{key}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate FHIR JSON (or the bundles mapped from HL7 files) against R4 and Homeward's profiles, offline."""
    from adapter.conformance.validator import Validator

    validator = Validator(args.conformance)
    worst = 0
    results: list[dict[str, Any]] = []  # --json: one entry per file

    def failed(name: str, reason: str) -> None:
        if args.json:
            results.append({"file": name, "valid": False, "error": reason})
        else:
            print(f"{name}: {reason}")

    for name in args.files:
        if args.from_hl7:
            from adapter.hl7.parse import parse
            from adapter.mapping.engine import map_message
            from adapter.mapping.loader import load_mappings

            settings = _settings(args)
            try:
                message = parse(Path(name).read_bytes(), fallback_charset=settings.hl7.fallback_charset)
                data = map_message(
                    message, load_mappings(settings.mapping.dir), ZoneInfo(settings.mapping.timezone)
                ).bundle
            except InboundError as exc:
                failed(
                    name,
                    f"cannot map: {exc.ack_code.value} {exc.hl7_error_code} at {exc.location or '-'}: {exc.reason}",
                )
                worst = 1
                continue
        else:
            try:
                data = orjson.loads(Path(name).read_bytes())
            except orjson.JSONDecodeError as exc:
                failed(name, f"not JSON ({exc})")
                worst = 1
                continue
        issues = validator.validate(data)
        errors = [i for i in issues if i.severity == "error"]
        kind = data.get("resourceType", "?") if isinstance(data, dict) else "?"
        if errors:
            worst = 1
        if args.json:
            results.append(
                {
                    "file": name,
                    "resourceType": kind,
                    "valid": not errors,
                    "errors": len(errors),
                    "warnings": len(issues) - len(errors),
                    "issues": [dataclasses.asdict(i) for i in issues],
                }
            )
            continue
        for issue in issues:
            print(f"{name}: {issue}")
        print(
            f"{name}: {kind}: {'invalid' if errors else 'valid'} ({len(errors)} errors, {len(issues) - len(errors)} warnings)"
        )
    if args.json:
        _print_json(results)
    return worst


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run the conformance suite against a live FHIR server; exit 0 only when every required check passed."""
    from adapter.config import AuthSettings, TargetSettings
    from adapter.conformance.suite import Suite, load_requirements
    from adapter.mapping.loader import load_mappings
    from adapter.targets import FhirTarget, build_target

    settings = _settings(args)
    chosen = next((t for t in settings.targets if t.name == args.target), None) if args.target else None
    if args.target and chosen is None:
        raise ConfigError(f"no [[targets]] entry named '{args.target}'")
    fields: dict[str, Any] = chosen.model_dump() if chosen is not None else {"name": "conformance"}
    if args.server:
        fields["base_url"] = args.server
    if not fields.get("base_url"):
        raise ConfigError("give --server URL (or --target NAME with a base_url)")
    if args.mode:
        fields["mode"] = args.mode
    headers = dict(fields.get("headers") or {})
    for pair in args.header:
        key, _, value = pair.partition(":")
        headers[key.strip()] = value.strip()
    fields["headers"] = headers
    if args.token_url:
        fields["auth"] = AuthSettings(
            kind="oauth2",
            token_url=args.token_url,
            client_id=args.client_id,
            scope=args.scope,
            client_secret_env=args.client_secret_env,
        ).model_dump()
    fields["kind"] = "fhir"
    target = build_target(TargetSettings.model_validate(fields))
    assert isinstance(target, FhirTarget)
    requirements, profiles = load_requirements(args.conformance)
    suite = Suite(
        target,
        load_mappings(settings.mapping.dir),
        requirements,
        profiles,
        tz=ZoneInfo(settings.mapping.timezone),
        load_profiles=args.load_profiles,
        keep=args.keep,
    )

    async def run() -> None:
        try:
            await suite.run()
        finally:
            await target.aclose()

    asyncio.run(run())
    report = suite.report
    if args.json == Path("-"):  # the report as JSON on stdout instead of the table
        _print_json(report.to_json())
    else:
        print(report.table())
    report.write(None if args.json == Path("-") else args.json, args.junit)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homeward", description=__doc__)
    parser.add_argument("--version", action="version", version=f"homeward {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help="TOML settings file (HOMEWARD_* variables override it)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the MLLP listener and the forwarder"))
    serve.set_defaults(func=cmd_serve)
    serve.add_argument("--intake-fd", type=int, help=argparse.SUPPRESS)  # internal: an intake worker (mllp.workers)
    # internal: a worker's writes go to serve over this socket (SQLite, adapter/store/relay.py)
    serve.add_argument("--store-fd", type=int, help=argparse.SUPPRESS)
    # internal: a delivery worker (delivery.workers)
    serve.add_argument("--deliver-shard", type=int, help=argparse.SUPPRESS)
    mapper = with_config(sub.add_parser("map", help="map HL7 file(s) to FHIR Bundle JSON on stdout"))
    mapper.add_argument(
        "--explain",
        action="store_true",
        help="instead of the bundle, show which rule set each element and which fields no rule read",
    )
    mapper.add_argument(
        "--json", action="store_true", help="one JSON list: per file the bundle and notes, or the error, or --explain"
    )
    mapper.add_argument("files", nargs="+")
    mapper.set_defaults(func=cmd_map)
    send = sub.add_parser("send", help="send HL7 file(s) over MLLP and print each ACK")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=2575)
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("--json", action="store_true", help="print JSON (MSA and ERR fields of each ACK)")
    send.add_argument("files", nargs="+")
    send.set_defaults(func=cmd_send)
    migrate = with_config(sub.add_parser("migrate", help="create or update the store's schema"))
    migrate.add_argument("--json", action="store_true", help="print JSON")
    migrate.set_defaults(func=cmd_migrate)
    check = with_config(sub.add_parser("check-config", help="validate settings and mapping files"))
    check.add_argument("--env", action="store_true", help="also list every HOMEWARD_* variable")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_check_config)
    validate = with_config(
        sub.add_parser("validate", help="validate FHIR JSON, or HL7 files mapped, against R4 and Homeward's profiles")
    )
    validate.add_argument("--from-hl7", action="store_true", help="the files are HL7 v2 messages: map, then validate")
    validate.add_argument(
        "--conformance", type=Path, default=CONFORMANCE_DIR, help="folder with the profiles (default: %(default)s)"
    )
    validate.add_argument("--json", action="store_true", help="print JSON: per file, validity and every issue")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_validate)
    conf = with_config(
        sub.add_parser("conformance", help="check a live FHIR server against what Homeward needs (report, JUnit, JSON)")
    )
    conf.add_argument("--server", help="the FHIR server's base URL")
    conf.add_argument("--target", help="take mode, headers, TLS and auth from this [[targets]] entry of --config")
    conf.add_argument(
        "--mode",
        choices=["transaction", "batch", "conditional", "message"],
        help="delivery mode (default: transaction)",
    )
    conf.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header")
    conf.add_argument("--token-url", help="OAuth2 client credentials: token endpoint")
    conf.add_argument("--client-id", default="", help="OAuth2 client id")
    conf.add_argument("--client-secret-env", default="", help="variable holding the OAuth2 client secret")
    conf.add_argument("--scope", default="", help="OAuth2 scope")
    conf.add_argument("--load-profiles", action="store_true", help="PUT Homeward's StructureDefinitions first")
    conf.add_argument("--keep", action="store_true", help="do not delete the test resources afterwards")
    conf.add_argument("--junit", type=Path, help="write a JUnit XML report here")
    conf.add_argument("--json", type=Path, help="write a JSON report here (- : on stdout, instead of the table)")
    conf.add_argument(
        "--conformance", type=Path, default=CONFORMANCE_DIR, help="folder with the requirements and profiles"
    )
    conf.set_defaults(func=cmd_conformance)
    audit_cli.add_parser(sub, with_config)
    from adapter import cli_delivery

    cli_delivery.add_parsers(sub, with_config, _settings)
    from adapter import cli_import

    cli_import.add_parser(sub, with_config, _settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"homeward: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, AdapterError) as exc:
        print(f"homeward: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
