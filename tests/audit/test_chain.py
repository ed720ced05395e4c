"""The audit hash chain on a real SQLite store: `homeward audit verify` passes, then names the first bad record."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapter.audit import chain
from adapter.cli import main
from adapter.store.base import Delivery, InboundRecord, Outcome
from adapter.store.sqlite import SqliteStore

KEY = "correct horse battery staple 42"


def fill(path: Path, messages: int = 5, key: str | None = None) -> None:
    """Accept `messages` messages (received, queued, accepted), refuse one, deliver the first: real store writes."""
    from adapter.audit.keys import AuditKeys

    keys = AuditKeys.from_secret(key.encode()) if key else None
    store = SqliteStore(path, synchronous="NORMAL", audit_keys=keys)

    async def go() -> None:
        for n in range(messages):
            record = InboundRecord(
                raw=f"MSH|^~\\&|PAS|RRK|||20261124||ADT^A03|C{n}|P|2.5.1\r".encode(),
                peer="127.0.0.1:1",
                sending_facility="RRK",
                message_control_id=f"C{n}",
                event="ADT^A03",
                received_at=time.time(),
            )
            await store.accept(record, [Delivery("default", f"k{n}", b"{}", 1)], {"resources": 1})
        await store.record(InboundRecord(raw=b"garbage", peer="127.0.0.1:2"), Outcome.REFUSED, "AR", "not HL7")
        (item,) = await store.claim_due(time.time() + 1, 1, 60)
        await store.mark_delivered(item, time.time(), {"target": "default", "status": 200})

    asyncio.run(go())
    store.close()


def verify(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "audit.sqlite3"
    monkeypatch.setenv("HOMEWARD_STORE", str(path))
    monkeypatch.delenv("HOMEWARD_AUDIT_HMAC_KEY", raising=False)
    return path


def sql(path: Path, statement: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, params)
    conn.close()


def test_chain_verifies_after_real_traffic(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Records written by the store form an unbroken chain that the head matches; the CLI exits 0."""
    fill(store_path)
    code, text = verify(store_path, capsys)
    assert code == 0, text
    # 5 x (received, queued, accepted) + refused (received, refused) + delivered
    assert "audit chain ok: 18 records, head 18" in text


def test_altered_record_is_named(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Changing a record's detail directly in SQLite fails verify, naming that record."""
    fill(store_path)
    sql(store_path, """UPDATE audit SET detail = '{"resources":9}' WHERE id = 6""")
    code, text = verify(store_path, capsys)
    assert code == 1
    assert "BROKEN at record 6 (changed)" in text


def test_altered_record_with_recomputed_hash_breaks_the_next_link(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recomputing the changed record's own hash does not help: the next record no longer follows it."""
    fill(store_path)
    conn = sqlite3.connect(store_path)
    at, inbound_id, outbox_id, stage, prev = conn.execute(
        "SELECT at, inbound_id, outbox_id, stage, prev_hash FROM audit WHERE id = 4"
    ).fetchone()
    forged = chain.record_hash(4, at, inbound_id, outbox_id, stage, '{"forged":true}', prev)
    with conn:
        conn.execute("UPDATE audit SET detail = '{\"forged\":true}', hash = ? WHERE id = 4", (forged,))
    conn.close()
    code, text = verify(store_path, capsys, "--json")
    assert code == 1
    assert '"seq": 5' in text and '"kind": "inserted"' in text


def test_deleted_record_is_named(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deleting a record in the middle fails verify, naming the missing record."""
    fill(store_path)
    sql(store_path, "DELETE FROM audit WHERE id = 7")
    code, text = verify(store_path, capsys)
    assert code == 1
    assert "BROKEN at record 7 (deleted)" in text


def test_inserted_record_is_named(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record slipped in between two others (ids shifted to make room) fails verify."""
    fill(store_path)
    sql(store_path, "UPDATE audit SET id = id + 100 WHERE id > 3")
    sql(store_path, "UPDATE audit SET id = id - 99 WHERE id > 100")
    sql(
        store_path,
        "INSERT INTO audit (id, at, stage, detail, prev_hash, hash) VALUES (4, 0, 'delivered', '{}', ?, ?)",
        ("0" * 64, "0" * 64),
    )
    code, text = verify(store_path, capsys)
    assert code == 1
    assert "BROKEN at record 4 (inserted)" in text


def test_newest_records_deleted_are_caught_by_the_head(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deleting the last records leaves a valid prefix, which the head (written elsewhere in the file) contradicts."""
    fill(store_path)
    sql(store_path, "DELETE FROM audit WHERE id > 15")
    code, text = verify(store_path, capsys)
    assert code == 1
    assert "BROKEN at record 16 (truncated)" in text


def test_rebuilt_chain_is_caught_by_the_signed_head(
    store_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an audit key, rewriting history and recomputing every hash and the head still fails verify."""
    fill(store_path, key=KEY)
    monkeypatch.setenv("HOMEWARD_AUDIT_HMAC_KEY", KEY)
    assert verify(store_path, capsys)[0] == 0
    conn = sqlite3.connect(store_path)
    rows = conn.execute("SELECT id, at, inbound_id, outbox_id, stage, detail FROM audit ORDER BY id").fetchall()
    prev: chain.Head | None = None
    with conn:
        for seq, at, inbound_id, outbox_id, stage, detail in rows:
            detail = detail.replace('"status":200', '"status":201')
            this = chain.link(prev, at, inbound_id, outbox_id, stage, detail)
            conn.execute(
                "UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE id = ?",
                (detail, prev.hash if prev else chain.GENESIS, this.hash, seq),
            )
            prev = this
        assert prev is not None
        conn.execute("UPDATE audit_head SET seq = ?, hash = ?", (prev.seq, prev.hash))
    conn.close()
    code, text = verify(store_path, capsys)
    assert code == 1
    assert "signature is wrong" in text
    # Without the key the same forgery passes: what the README says the unsigned chain cannot catch.
    monkeypatch.delenv("HOMEWARD_AUDIT_HMAC_KEY")
    assert verify(store_path, capsys)[0] == 0


def test_verify_command_exit_code(store_path: Path) -> None:
    """`homeward audit verify` as a process: 0 on a good chain, 1 after tampering."""
    fill(store_path, messages=2)
    run = [sys.executable, "-m", "adapter", "audit", "verify"]
    env = {"HOMEWARD_STORE": str(store_path), "PATH": "/usr/bin:/bin"}
    assert subprocess.run(run, env=env, capture_output=True).returncode == 0
    sql(store_path, "UPDATE audit SET stage = 'delivered' WHERE id = 2")
    result = subprocess.run(run, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "record 2" in result.stderr


def test_missing_store_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify against a path with no store says so instead of creating an empty file."""
    monkeypatch.setenv("HOMEWARD_STORE", str(tmp_path / "nope.sqlite3"))
    assert main(["audit", "verify"]) == 2
    assert not (tmp_path / "nope.sqlite3").exists()


def head_of(path: Path) -> str:
    conn = sqlite3.connect(path)
    seq, head_hash = conn.execute("SELECT seq, hash FROM audit_head").fetchone()
    conn.close()
    return f"{seq}:{head_hash}"


def test_checkpoint_catches_a_cut_chain_with_a_rebuilt_head(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a key, cutting the newest records and moving the head back passes verify; --expect catches it."""
    fill(store_path)
    witness = head_of(store_path)  # what serve logs as audit.checkpoint
    conn = sqlite3.connect(store_path)
    with conn:
        conn.execute("DELETE FROM audit WHERE id > 15")
        conn.execute("UPDATE audit_head SET seq = 15, hash = (SELECT hash FROM audit WHERE id = 15)")
    conn.close()
    assert verify(store_path, capsys)[0] == 0
    code, text = verify(store_path, capsys, "--expect", witness)
    assert code == 1
    assert "BROKEN at record 18 (truncated)" in text


def test_checkpoint_catches_a_rewritten_chain(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a key, a rebuilt chain passes verify; a checkpoint taken before the rewrite names the record."""
    fill(store_path)
    witness = head_of(store_path)
    conn = sqlite3.connect(store_path)
    rows = conn.execute("SELECT id, at, inbound_id, outbox_id, stage, detail FROM audit ORDER BY id").fetchall()
    prev: chain.Head | None = None
    with conn:
        for seq, at, inbound_id, outbox_id, stage, detail in rows:
            this = chain.link(prev, at, inbound_id, outbox_id, stage, detail.replace("200", "201"))
            conn.execute(
                "UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE id = ?",
                (detail.replace("200", "201"), prev.hash if prev else chain.GENESIS, this.hash, seq),
            )
            prev = this
        assert prev is not None
        conn.execute("UPDATE audit_head SET seq = ?, hash = ?", (prev.seq, prev.hash))
    conn.close()
    assert verify(store_path, capsys)[0] == 0
    code, text = verify(store_path, capsys, "--expect", witness)
    assert code == 1
    assert "BROKEN at record 18 (changed)" in text and "checkpointed" in text
    assert main(["audit", "verify", "--expect", "nonsense"]) == 2
