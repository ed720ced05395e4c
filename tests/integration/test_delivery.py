"""Delivery through `homeward serve` subprocesses to a stand-in council server: retries, order, dead letters."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from adapter.mllp.client import MllpClient
from tests.conftest import MAPPINGS, ack_fields, golden_message
from tests.council import Council, outcome

TEMPLATE = golden_message("ADT_A03/basic.hl7").decode()
# Quick retries so the tests take seconds: 0.05 s doubling to a 2 s cap.
FAST_RETRY = {"HOMEWARD_RETRY_INITIAL_SECONDS": "0.05", "HOMEWARD_RETRY_MAX_SECONDS": "2"}


def nhs_number(n: int) -> str:
    """A valid (modulus 11) NHS number made from n, so every test patient is a different person."""
    while True:
        base = f"{900000000 + n:09d}"
        check = 11 - sum(int(d) * (10 - i) for i, d in enumerate(base)) % 11
        if check == 11:
            check = 0
        if check != 10:
            return base + str(check)
        n += 1_000_000


def adt(
    control_id: str, event: str = "A03", patient: int = 1, visit: str = "V0001234", evn: str = "20261124102500"
) -> bytes:
    text = (
        TEMPLATE.replace("|MSG00001|", f"|{control_id}|")
        .replace("ADT^A03^ADT_A03", f"ADT^{event}^ADT_A03")
        .replace("EVN|A03|20261124102500", f"EVN|{event}|{evn}")
        .replace("9449305552", nhs_number(patient))
        .replace("RRK123456", f"RRK{patient:06d}")  # one MRN per person, as at a hospital
        .replace("V0001234", visit)
    )
    return text.encode()


def send(port: int, *messages: bytes) -> list[str]:
    """Send in order on one connection; return the MSA-1 codes."""
    with MllpClient("127.0.0.1", port, timeout=20) as client:
        return [ack_fields(client.send(m))["MSA"][1] for m in messages]


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met in time")


def routed_mappings(tmp_path: Path, targets: str, count: int = -1) -> Path:
    """A copy of mappings/ whose site.yaml routes to `targets` (e.g. "[council-a, council-b]") where it
    said `[default]`: every rule, or the first `count`."""
    mappings = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, mappings)
    site = (mappings / "site.yaml").read_text().replace("targets: [default]", f"targets: {targets}", count)
    (mappings / "site.yaml").write_text(site)
    return mappings


def homeward(process: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI against the same store as a running `serve`."""
    return subprocess.run(
        [sys.executable, "-m", "adapter", *args],
        env=process.env,
        cwd=process.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )


def homeward_json(process: Any, *args: str) -> Any:
    done = homeward(process, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def council(httpserver: HTTPServer) -> Council:
    return Council(httpserver)


class TestRetries:
    def test_outage_503_then_429_then_recovery_drains_in_order(self, serve, council: Council) -> None:  # type: ignore[no-untyped-def]
        """While the server answers 503 and then 429 + Retry-After, messages queue; afterwards all arrive, in order per patient."""
        answers = [503, 503, 503, 429, 429]

        def fail(control_id: str, attempt: int) -> Any:
            if not answers:
                return None
            status = answers.pop(0)
            return (status, {"Retry-After": "1"} if status == 429 else {}, None)

        council.fail = fail
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
        first = [adt(f"OUT-A{n}", patient=1) for n in range(5)]
        second = [adt(f"OUT-B{n}", patient=2, visit="V0009999") for n in range(3)]
        assert send(process.port, *first) == ["AA"] * 5
        assert send(process.port, *second) == ["AA"] * 3
        wait_until(lambda: len(council.applied) == 8, what="all eight applied")
        assert [c for c in council.applied if c.startswith("OUT-A")] == [f"OUT-A{n}" for n in range(5)]
        assert [c for c in council.applied if c.startswith("OUT-B")] == [f"OUT-B{n}" for n in range(3)]
        assert sorted(council.applied) == sorted(set(council.applied))  # each applied once
        retries = process.wait_for_log("message.retry_scheduled", count=5)
        # Retry-After: 1 is honoured even though the backoff alone would come back sooner.
        after_429 = [line for line in retries if line["status"] == 429]
        assert after_429 and all(line["retry_in_seconds"] >= 1.0 for line in after_429)
        assert {line["status"] for line in retries} == {503, 429}

    def test_retries_stop_by_age_before_attempts_run_out(self, serve, council: Council) -> None:  # type: ignore[no-untyped-def]
        """With the server down, a row older than retry.max_age_seconds is dead-lettered though attempts remain."""
        council.fail = lambda cid, attempt: (503, {}, None)
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, HOMEWARD_RETRY_MAX_AGE_SECONDS="1", **FAST_RETRY)
        assert send(process.port, adt("AGE-1")) == ["AA"]
        (dead,) = process.wait_for_log("message.dead_lettered")
        assert re.search(r"gave up after \d+ s undelivered", dead["reason"]) and dead["status"] == 503
        assert 2 <= len(council.posts) < 10  # retried, then stopped by age, not by retry.max_attempts (10)
        (row,) = homeward_json(process, "dead-letters", "list")
        assert row["message_control_id"] == "AGE-1" and row["attempts"] == len(council.posts)

    def test_order_per_visit_holds_while_a03_is_retried(self, serve, council: Council, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """A16, A03, A13 for one visit with the A03 failing twice: the server sees A16, A03, A13, and the A13 only after the A03."""
        mappings = tmp_path / "mappings"
        shutil.copytree(MAPPINGS, mappings)
        a03_map = (mappings / "messages" / "ADT_A03.yaml").read_text()
        for event in ("A16", "A13"):
            (mappings / "messages" / f"ADT_{event}.yaml").write_text(a03_map.replace("event: A03", f"event: {event}"))
        site = (
            (mappings / "site.yaml")
            .read_text()
            .replace("  A03: process", "  A03: process\n  A16: process\n  A13: process")
        )
        (mappings / "site.yaml").write_text(site)
        council.fail = lambda cid, attempt: (503, {}, None) if cid == "ORD-A03" and attempt <= 2 else None
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, HOMEWARD_MAPPINGS_DIR=str(mappings), **FAST_RETRY)
        acks = send(
            process.port,
            adt("ORD-A16", "A16", evn="20261124100000"),
            adt("ORD-A03", "A03", evn="20261124102500"),
            adt("ORD-A13", "A13", evn="20261124110000"),
        )
        assert acks == ["AA", "AA", "AA"]
        wait_until(lambda: len(council.applied) == 3, what="three applied")
        assert council.applied == ["ORD-A16", "ORD-A03", "ORD-A13"]
        assert council.posts == ["ORD-A16", "ORD-A03", "ORD-A03", "ORD-A03", "ORD-A13"]

    def test_stale_event_is_not_applied(self, serve, council: Council) -> None:  # type: ignore[no-untyped-def]
        """An event older (EVN-2) than one already delivered for the same visit is closed as stale, never sent."""
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
        assert send(process.port, adt("NEW-1", evn="20261124120000")) == ["AA"]
        wait_until(lambda: council.applied == ["NEW-1"], what="first applied")
        assert send(process.port, adt("OLD-1", evn="20261124090000"), adt("NEW-2", evn="20261124130000")) == [
            "AA",
            "AA",
        ]
        wait_until(lambda: "NEW-2" in council.applied, what="newest applied")
        assert council.posts == ["NEW-1", "NEW-2"]
        (stale,) = process.wait_for_log("message.stale")
        assert stale["message_control_id"] == "OLD-1"
        rows = homeward_json(process, "dead-letters", "list", "--state", "stale")
        assert [r["message_control_id"] for r in rows] == ["OLD-1"]


class TestDeadLetters:
    def test_permanent_4xx_dead_letter_then_retry_after_fix(self, serve, council: Council) -> None:  # type: ignore[no-untyped-def]
        """A 422 goes to the dead letters with the OperationOutcome; after the fix, `retry` delivers it, audited."""
        broken = {"on": True}
        problem = outcome("Encounter.class: code 'X' is not in the value set", code="code-invalid")
        council.fail = lambda cid, attempt: (422, {}, problem) if broken["on"] else None
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
        assert send(process.port, adt("DL-1")) == ["AA"]
        process.wait_for_log("message.dead_lettered")
        assert council.posts == ["DL-1"]  # permanent: not retried
        (row,) = homeward_json(process, "dead-letters", "list")
        assert row["message_control_id"] == "DL-1" and row["state"] == "dead"
        assert "code 'X' is not in the value set" in row["last_error"]
        shown = homeward_json(process, "dead-letters", "show", str(row["id"]))
        assert shown["last_outcome"]["issue"][0]["code"] == "code-invalid"
        assert [h["stage"] for h in shown["history"]][-1] == "dead_lettered"
        human = homeward(process, "dead-letters", "list")
        assert human.returncode == 0 and "DL-1" in human.stdout

        broken["on"] = False
        done = homeward(
            process, "dead-letters", "retry", str(row["id"]), "--by", "on-call", "--reason", "code table fixed"
        )
        assert done.returncode == 0, done.stderr
        wait_until(lambda: council.applied == ["DL-1"], what="retried delivery")
        shown = homeward_json(process, "dead-letters", "show", str(row["id"]))
        assert shown["state"] == "delivered"
        retried = [h for h in shown["history"] if h["stage"] == "dead_letter_retried"]
        assert retried == [
            {"at": retried[0]["at"], "stage": "dead_letter_retried", "actor": "on-call", "why": "code table fixed"}
        ]
        assert homeward_json(process, "dead-letters", "list") == []
        again = homeward(process, "dead-letters", "retry", str(row["id"]))
        assert again.returncode == 1 and "not dead letters" in again.stderr

    def test_discard_and_replay(self, serve, council: Council) -> None:  # type: ignore[no-untyped-def]
        """discard closes a dead letter without sending; replay --control-id / --since sends delivered ones again."""
        council.fail = lambda cid, attempt: (400, {}, outcome("bad")) if cid == "BAD-1" else None
        process = serve(HOMEWARD_FHIR_BASE_URL=council.url, **FAST_RETRY)
        assert send(process.port, adt("BAD-1", patient=3), adt("RP-1", patient=4), adt("RP-2", patient=5)) == ["AA"] * 3
        process.wait_for_log("message.dead_lettered")
        wait_until(lambda: sorted(council.applied) == ["RP-1", "RP-2"], what="two delivered")
        (dead,) = homeward_json(process, "dead-letters", "list")
        assert homeward_json(process, "dead-letters", "discard", str(dead["id"]), "--reason", "test feed") == {
            "discarded": [dead["id"]],
            "not_dead_letters": [],
        }
        assert homeward_json(process, "dead-letters", "list", "--state", "discarded")[0]["id"] == dead["id"]

        replayed = homeward_json(process, "replay", "--control-id", "RP-1", "--reason", "council restored a backup")
        assert len(replayed["queued"]) == 1
        wait_until(lambda: council.applied.count("RP-1") == 2, what="replayed RP-1")
        since = homeward_json(process, "replay", "--since", "2000-01-01T00:00:00")
        assert len(since["queued"]) == 3  # RP-1 (twice delivered now) and RP-2; BAD-1 was never delivered
        wait_until(lambda: len(council.applied) == 6, what="replay --since drained")
        assert "BAD-1" not in council.applied
        assert all(n == 1 for n in council.creates.values())  # conditional updates: no duplicate resources
        nothing = homeward(process, "replay", "--control-id", "NOPE")
        assert nothing.returncode == 1 and "queued again: 0" in nothing.stdout
        both = homeward(process, "replay")
        assert both.returncode == 2


class TestTargets:
    def test_each_target_has_its_own_queue_and_retry_policy(
        self, serve, council: Council, httpserver: HTTPServer, tmp_path: Path
    ) -> None:  # type: ignore[no-untyped-def]
        """One message routed to two targets: the healthy one delivers; the failing one gives up by its own retry limit."""
        second = Council(httpserver, "/b")
        second.fail = lambda cid, attempt: (503, {}, None)
        mappings = routed_mappings(tmp_path, "[default, council-b]", 1)
        config = tmp_path / "homeward.toml"
        config.write_text(
            f'[[targets]]\nname = "council-b"\nbase_url = "{second.url}"\n'
            "retry = { max_attempts = 2, initial_seconds = 0.05, max_seconds = 0.1 }\n"
        )
        process = serve(
            "--config", str(config), HOMEWARD_FHIR_BASE_URL=council.url, HOMEWARD_MAPPINGS_DIR=str(mappings)
        )
        assert send(process.port, adt("TWO-1")) == ["AA"]
        wait_until(lambda: council.applied == ["TWO-1"], what="default delivered")
        (dead,) = process.wait_for_log("message.dead_lettered")
        assert dead["target"] == "council-b" and "gave up after 2 attempts" in dead["reason"]
        assert second.posts == ["TWO-1", "TWO-1"]
        (row,) = homeward_json(process, "dead-letters", "list", "--config", str(config))
        assert (row["target"], row["message_control_id"]) == ("council-b", "TWO-1")

    def test_each_target_has_its_own_auth(self, serve, httpserver: HTTPServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """Two targets of one site: OAuth2 towards one, an API key towards the other; neither sees the other's secret."""
        from tests.integration.test_targets import TokenEndpoint

        basic = "Basic " + base64.b64encode(b"homeward-a:a-secret-7781").decode()
        tokens = TokenEndpoint(httpserver, lambda request: request.headers.get("Authorization") == basic)
        council_a, council_b = Council(httpserver, "/a"), Council(httpserver, "/b")
        mappings = routed_mappings(tmp_path, "[council-a, council-b]")
        config = tmp_path / "homeward.toml"
        config.write_text(
            f'[[targets]]\nname = "council-a"\nbase_url = "{council_a.url}"\n'
            f'auth = {{ kind = "oauth2", token_url = "{tokens.url}", client_id = "homeward-a",'
            ' client_secret_env = "COUNCIL_A_SECRET" }\n\n'
            f'[[targets]]\nname = "council-b"\nbase_url = "{council_b.url}"\n'
            'headers_env = { "X-Api-Key" = "COUNCIL_B_KEY" }\n'
        )
        process = serve(
            "--config", str(config), HOMEWARD_MAPPINGS_DIR=str(mappings),
            COUNCIL_A_SECRET="a-secret-7781", COUNCIL_B_KEY="b-key-5524",
        )  # fmt: skip
        assert send(process.port, adt("AUTH-1"), adt("AUTH-2", patient=2, visit="V2")) == ["AA", "AA"]
        wait_until(lambda: len(council_a.applied) == len(council_b.applied) == 2, what="both targets delivered")
        assert tokens.issued == ["tok-1"]  # one token, cached, for council-a only
        assert {h.get("Authorization") for h in council_a.headers} == {"Bearer tok-1"}
        assert not any("X-Api-Key" in h for h in council_a.headers)
        assert {h.get("X-Api-Key") for h in council_b.headers} == {"b-key-5524"}
        assert not any("Authorization" in h for h in council_b.headers)
        log = process.log_path.read_text()
        assert not [s for s in ("a-secret-7781", "b-key-5524", "tok-1") if s in log]
