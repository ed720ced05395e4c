"""The same chain and the same `homeward audit` commands on the PostgreSQL store (real server, fresh schema)."""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest

from adapter.audit.keys import AuditKeys
from adapter.cli import main
from adapter.store.base import Delivery, InboundRecord
from adapter.store.postgres import PostgresStore, migrate

KEY = "postgres audit key 0123456789"


def test_verify_show_list_on_postgres(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two store instances append to one chain; verify passes, then names an altered and a deleted record."""
    migrate(postgres_url)
    keys = AuditKeys.from_secret(KEY.encode())
    first, second = PostgresStore(postgres_url, audit_keys=keys), PostgresStore(postgres_url, audit_keys=keys)

    async def go() -> None:
        for n in range(6):
            store = first if n % 2 else second
            record = InboundRecord(
                raw=f"MSH|^~\\&|PAS|RRK|||||ADT^A03|PG-{n}|P|2.5.1\r".encode(),
                sending_facility="RRK",
                message_control_id=f"PG-{n}",
                event="ADT^A03",
                received_at=time.time(),
            )
            await store.accept(record, [Delivery("default", f"k{n}", b"{}", 1)], {"n": n})

    asyncio.run(go())
    first.close()
    second.close()
    monkeypatch.setenv("HOMEWARD_STORE_URL", postgres_url)
    monkeypatch.setenv("HOMEWARD_AUDIT_HMAC_KEY", KEY)
    assert main(["audit", "verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["checked"] == 18 and result["signature_checked"]
    assert main(["audit", "show", "PG-3", "--json"]) == 0
    assert [r["stage"] for r in json.loads(capsys.readouterr().out)] == ["received", "queued", "accepted"]
    assert main(["audit", "list", "--status", "pending", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE audit SET detail = '{\"n\":99}' WHERE id = 9")
    assert main(["audit", "verify"]) == 1
    assert "BROKEN at record 9 (changed)" in capsys.readouterr().err
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit WHERE id = 9")
    assert main(["audit", "verify"]) == 1
    assert "BROKEN at record 9 (deleted)" in capsys.readouterr().err
