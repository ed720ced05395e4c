"""Retention: `homeward audit purge` drops old bodies on a real SQLite file; metadata, hashes and the chain stay."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from adapter.cli import main
from adapter.store.base import Delivery, InboundRecord
from adapter.store.sqlite import SqliteStore

DAY = 86400.0
MARKER = b"PURGEMEBODY"  # stands for patient data in the original message and the bundle


def raw(control_id: str) -> bytes:
    return f"MSH|^~\\&|PAS|RRK|||20261124||ADT^A03|{control_id}|P|2.5.1\rPID|1||{marker(control_id)}\r".encode()


def marker(control_id: str) -> str:
    return f"{MARKER.decode()}-{control_id[::-1]}"  # reversed: the control id alone must not match


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Old delivered OLD-D, old dead-lettered OLD-X, old still pending OLD-P, and a new delivered NEW-D."""
    path = tmp_path / "r.sqlite3"
    monkeypatch.setenv("HOMEWARD_STORE", str(path))
    store = SqliteStore(path, synchronous="NORMAL")
    now = time.time()

    async def go() -> None:
        ids = {}
        for control_id, age_days in (("OLD-D", 40), ("OLD-X", 40), ("OLD-P", 40), ("NEW-D", 1)):
            record = InboundRecord(
                raw=raw(control_id),
                sending_facility="RRK",
                message_control_id=control_id,
                event="ADT^A03",
                received_at=now - age_days * DAY,
            )
            bundle = b'{"resourceType":"Bundle","note":"' + marker(control_id).encode() + b'"}'
            result = await store.accept(record, [Delivery("default", control_id, bundle, 1)], {})
            ids[control_id] = result.outbox_ids[0]
        for item in await store.claim_due(now, 10, 60):
            cid = item.message_control_id
            if cid in ("OLD-D", "NEW-D"):
                await store.mark_delivered(item, now, {"status": 200})
            elif cid == "OLD-X":
                await store.dead_letter(item, now, "HTTP 422; server said: " + marker(cid), {"status": 422})
            else:
                await store.reschedule(item, now + 3600, "HTTP 503", {"status": 503})

    asyncio.run(go())
    store.close()
    return path


def test_purge_keeps_metadata_and_the_chain(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only the old, finished message loses its body; its size and hash stay, and the chain still verifies."""
    assert main(["audit", "purge", "--older-than-days", "30", "--by", "dpo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["purged"] == 1
    conn = sqlite3.connect(store_path)
    rows = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT i.message_control_id, i.raw IS NULL, b.outbox_id IS NULL, i.size, i.sha256, o.last_error"
            " FROM inbound i JOIN outbox o ON o.inbound_id = i.id LEFT JOIN outbox_body b ON b.outbox_id = o.id"
        )
    }
    conn.close()
    assert rows["OLD-D"][:2] == (1, 1)  # purged: no message, no Bundle
    assert rows["OLD-D"][2] == len(raw("OLD-D")) and rows["OLD-D"][3] == hashlib.sha256(raw("OLD-D")).hexdigest()
    assert rows["OLD-X"][:2] == (0, 0)  # a dead letter waits for a person: kept
    assert rows["OLD-P"][:2] == (0, 0)  # still pending: kept
    assert rows["NEW-D"][:2] == (0, 0)  # within retention: kept

    assert main(["audit", "show", "OLD-D", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert stages[-1]["stage"] == "body_purged" and stages[-1]["detail"]["actor"] == "dpo"
    assert main(["audit", "verify"]) == 0
    capsys.readouterr()
    assert main(["audit", "list", "--json"]) == 0
    listed = {r["message_control_id"]: r["body_purged"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {"OLD-D": True, "OLD-X": False, "OLD-P": False, "NEW-D": False}

    # Purging again finds nothing; replaying a purged message queues nothing (there is no body to send).
    assert main(["audit", "purge", "--older-than-days", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["purged"] == 0
    assert main(["replay", "--control-id", "OLD-D", "--json"]) == 1


def test_purged_body_is_gone_from_the_file(store_path: Path) -> None:
    """Purged bodies are not left readable in the database file (secure_delete), kept ones still are."""
    assert main(["audit", "purge", "--older-than-days", "0.5"]) == 0
    conn = sqlite3.connect(store_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = Path(f"{store_path}-wal")
    data = store_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert marker("OLD-X").encode() in data  # the search can find what is there
    for purged in ("OLD-D", "NEW-D"):
        assert marker(purged).encode() not in data


def test_purge_needs_a_period(store_path: Path) -> None:
    """Without --older-than-days or audit.body_retention_days, purge refuses rather than purging everything."""
    assert main(["audit", "purge"]) == 2


def test_serve_purges_past_retention(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A serve started with audit.body_retention_days purges older finished bodies at once, audited."""
    from adapter.mllp.client import MllpClient
    from tests.audit.test_metrics import a03

    first = serve()
    with MllpClient("127.0.0.1", first.port, timeout=20) as client:
        client.send(a03("RET-1"))
    first.wait_for_log("message.delivered")
    first.stop()
    time.sleep(1.0)  # older than the retention below
    second = serve(HOMEWARD_AUDIT_BODY_RETENTION_DAYS=str(0.5 / 86400))
    (line,) = second.wait_for_log("retention.purged")
    assert line["messages"] == 1
    conn = sqlite3.connect(tmp_path / "homeward.sqlite3")
    assert conn.execute("SELECT raw IS NULL FROM inbound WHERE message_control_id = 'RET-1'").fetchone() == (1,)
    conn.close()
    monkeypatch.setenv("HOMEWARD_STORE", str(tmp_path / "homeward.sqlite3"))
    assert main(["audit", "verify"]) == 0
