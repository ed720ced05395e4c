"""`--json` on every command that prints: each one, run as a process, prints one JSON document a script can parse."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from adapter.cli import build_parser
from tests.conftest import GOLDEN, ROOT
from tests.integration.test_delivery import adt

# serve prints log lines, not results; everything else prints something a script may want to read.
NOT_PRINTING = {("serve",)}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every runnable command as (words, its parser): `audit verify`, `dead-letters list`, `map`, ..."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, sub in subs[0].choices.items() for leaf in leaves(sub, (*path, name))]


def test_every_printing_command_takes_json() -> None:
    """A command added later without --json fails here (conformance's --json takes '-' for stdout)."""
    commands = leaves(build_parser())
    assert len(commands) >= 18  # the walk itself works (serve, map, ..., audit verify, dead-letters list, ...)
    missing = [
        " ".join(words)
        for words, parser in commands
        if words not in NOT_PRINTING and not any("--json" in a.option_strings for a in parser._actions)
    ]
    assert missing == []


def homeward(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")}
    return subprocess.run(
        [sys.executable, "-m", "adapter", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_json(done: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


def test_map_json(tmp_path: Path) -> None:
    """map --json: one list for all files, bundles and notes, the failure with its HL7 error; --explain too."""
    good = GOLDEN / "ADT_A03" / "basic.hl7"
    bad = tmp_path / "bad.hl7"
    bad.write_text("\n".join(line for line in good.read_text().splitlines() if not line.startswith("PV1")))
    ok, failed = as_json(homeward("map", "--json", str(good), str(bad)), code=1)
    assert ok["file"] == str(good) and ok["bundle"]["type"] == "transaction" and isinstance(ok["flags"], list)
    assert failed == {
        "file": str(bad),
        "error": {"ack_code": "AE", "hl7_error_code": "101", "location": "PV1", "reason": failed["error"]["reason"]},
    }
    (explained,) = as_json(homeward("map", "--explain", "--json", str(GOLDEN / "ADT_A16" / "obx_not_used.hl7")))
    assert explained["explain"][-1] == "not used by any rule: EVN-1, PID-1, PV1-1, OBX (whole segment)"


def test_send_json(serve) -> None:  # type: ignore[no-untyped-def]
    """send --json: MSA-1/2/3 and ERR of each ACK, an AA and an AR."""
    process = serve()
    refused = Path(process.tmp) / "orm.hl7"
    refused.write_bytes(adt("CLI-ORM").replace(b"ADT^A03^ADT_A03", b"ORM^O01^ORM_O01"))
    sent = as_json(homeward("send", "--json", "--port", str(process.port), str(GOLDEN / "ADT_A03" / "basic.hl7"),
                            str(refused)), code=1)  # fmt: skip
    assert [(s["ack_code"], s["message_control_id"]) for s in sent] == [("AA", "MSG00001"), ("AR", "CLI-ORM")]
    assert sent[0]["hl7_error_code"] is None and sent[0]["segments"][0].startswith("MSH|")
    assert sent[1]["hl7_error_code"] == "200" and sent[1]["error"]


def test_migrate_and_check_config_json(tmp_path: Path) -> None:
    """migrate --json names the store; check-config --json --env summarises settings, mappings and variables."""
    store = tmp_path / "s.sqlite3"
    done = as_json(homeward("migrate", "--json", HOMEWARD_STORE=str(store)))
    assert done == {"store": str(store), "result": f"sqlite store {store}: schema ready"} and store.exists()
    summary = as_json(homeward("check-config", "--config", "examples/homeward.toml", "--json", "--env"))
    assert summary["settings"] == "ok" and summary["mappings"]["message_maps"] > 5
    assert "A03" in summary["events_processed"] and summary["unknown_events"] == "ignore"
    assert summary["env"]["HOMEWARD_MLLP_PORT"] == "mllp.port"


def test_validate_json(tmp_path: Path) -> None:
    """validate --json: per file whether it is valid, with each issue's path, severity and rule."""
    good = GOLDEN / "ADT_A03" / "basic.bundle.json"
    broken = json.loads(good.read_text())
    encounter = next(e["resource"] for e in broken["entry"] if e["resource"]["resourceType"] == "Encounter")
    encounter["status"] = "not-a-status"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    (notjson := tmp_path / "x.json").write_text("{")
    ok, invalid, unreadable = as_json(homeward("validate", "--json", str(good), str(bad), str(notjson)), code=1)
    assert (ok["valid"], ok["errors"], ok["resourceType"]) == (True, 0, "Bundle")
    assert invalid["valid"] is False and invalid["errors"] >= 1
    assert any("status" in i["path"] and i["severity"] == "error" for i in invalid["issues"])
    assert unreadable["valid"] is False and unreadable["error"].startswith("not JSON")


def test_import_json(tmp_path: Path) -> None:
    """import --json: the per-file summary (outcomes, refusal reasons, position) as JSON."""
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"\r".join([adt("IJ-1"), adt("IJ-2", patient=2), adt("IJ-1")]))
    (summary,) = as_json(
        homeward(
            "import",
            "--json",
            "--no-progress",
            "--state",
            str(tmp_path / "st.json"),
            str(batch),
            cwd=tmp_path,
            HOMEWARD_STORE=str(tmp_path / "i.sqlite3"),
        )
    )
    assert summary["messages"] == 3 and summary["outcomes"]["accepted"] == 2
    assert summary["outcomes"]["duplicate"] == 1 and summary["stopped"] is None
    assert summary["position"] == batch.stat().st_size


def test_conformance_json_on_stdout(httpserver: HTTPServer) -> None:
    """conformance --json - prints the report as JSON instead of the table (here: a server with nothing)."""
    httpserver.no_handler_status_code = 404
    report = as_json(homeward("conformance", "--server", httpserver.url_for("/fhir"), "--json", "-"), code=1)
    assert report["conformant"] is False and report["counts"]["failed"] >= 1
    assert report["server"] == httpserver.url_for("/fhir") and report["checks"]


@pytest.mark.parametrize(
    "command",
    [
        ("audit", "verify"),
        ("audit", "list"),
        ("audit", "show", "NOPE"),
        ("dead-letters", "list"),
        ("dead-letters", "show", "1"),
        ("replay", "--control-id", "NOPE"),
    ],
)
def test_store_commands_print_json_even_when_there_is_nothing(tmp_path: Path, command: tuple[str, ...]) -> None:
    """On an empty store each query still prints valid JSON on stdout (an empty list, or the result), never text."""
    store = str(tmp_path / "e.sqlite3")
    assert homeward("migrate", HOMEWARD_STORE=store).returncode == 0
    done = homeward(*command, "--json", HOMEWARD_STORE=store)
    assert done.returncode in (0, 1), done.stderr
    json.loads(done.stdout)
