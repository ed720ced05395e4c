"""`homeward import` as a subprocess on real files, into a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psycopg
import pytest

from adapter.importer import read_lines, split_messages
from tests.integration.test_delivery import adt

COUNT = 120


def backlog(path: Path) -> Path:
    """A batch file: COUNT messages, one resend, one with an impossible birth date, one event the site ignores."""
    messages = [
        adt(f"IMP-{i}", patient=i % 7, visit=f"V{i % 7}", evn=f"20261124{10 + i // 60:02d}{i % 60:02d}00")
        for i in range(COUNT)
    ]
    messages.append(adt("IMP-3", patient=3, visit="V3"))  # a resend
    messages.append(adt("IMP-BAD").replace(b"19400312", b"19401399"))
    messages.append(adt("IMP-A31", event="A31"))
    body = b"".join(m.replace(b"\r", b"\r\n") for m in messages)
    path.write_bytes(
        b"FHS|^~\\&|PAS|RRK\r\nBHS|^~\\&|PAS|RRK\r\n" + body + f"BTS|{len(messages)}\r\nFTS|1\r\n".encode()
    )
    return path


def homeward_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")}
    return {**base, "HOMEWARD_STORE": str(tmp_path / "store.sqlite3"), "HOMEWARD_LOG_FORMAT": "json", **env}


def run_import(tmp_path: Path, *files: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapter", "import", "--state", str(tmp_path / "state.json"), *map(str, files)],
        env=homeward_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """(extra env, count(sql)) for a fresh store of each kind."""
    if request.param == "sqlite":

        def count(sql: str) -> int:
            with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
                return int(conn.execute(sql).fetchone()[0])

        return {}, count
    url = request.getfixturevalue("postgres_url")
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOMEWARD_")}
    subprocess.run([sys.executable, "-m", "adapter", "migrate"], env={**base, "HOMEWARD_STORE_URL": url}, check=True)

    def count_pg(sql: str) -> int:
        with psycopg.connect(url) as conn:
            return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]

    return {"HOMEWARD_STORE_URL": url}, count_pg


class TestImport:
    def test_batch_file_summary_store_and_resume(self, tmp_path: Path, store) -> None:  # type: ignore[no-untyped-def]
        """A batch file is stored as if received, summarised with reasons, and a second run resumes past it."""
        env, count = store
        file = backlog(tmp_path / "backlog.hl7")
        first = run_import(tmp_path, file, **env)
        assert first.returncode == 1, first.stderr  # one message was refused
        assert (
            f"{COUNT + 3} messages: {COUNT} accepted, 1 duplicates, 1 filtered, 0 unrouted, 1 refused" in first.stdout
        )
        assert "refused 1 x 102 at PID-7" in first.stdout
        assert "note:" not in first.stdout  # BTS-1 agrees with what was found
        assert count("SELECT count(*) FROM inbound WHERE outcome = 'accepted'") == COUNT
        assert count("SELECT count(*) FROM outbox WHERE state = 'pending'") == COUNT
        assert count("SELECT count(*) FROM inbound WHERE peer = 'import:backlog.hl7'") == COUNT + 3
        assert "19401399" not in first.stdout + first.stderr  # a refusal names the field, never the value

        again = run_import(tmp_path, file, **env)
        assert again.returncode == 0, again.stderr
        assert "0 messages: 0 accepted" in again.stdout and "resumed at byte" in again.stdout
        assert count("SELECT count(*) FROM inbound") == COUNT + 3

    def test_interrupted_import_resumes_and_replays_only_duplicates(self, tmp_path: Path) -> None:
        """From a saved position only later messages are read; messages read twice are recognised as duplicates."""
        file = backlog(tmp_path / "backlog.hl7")
        with open(file, "rb") as stream:
            ends = [c.end for c in split_messages(read_lines(stream, 0), lambda n: None)]
        # A saved position: only what follows it is read (IMP-3's resend is new to this store).
        (tmp_path / "state.json").write_text(json.dumps({str(file.resolve()): ends[39]}))
        partial = run_import(tmp_path, file)
        assert f"{COUNT + 3 - 40} messages: {COUNT - 40 + 1} accepted, 0 duplicates" in partial.stdout
        # A crash after committing everything but before the last save: the replayed part is all duplicates.
        (tmp_path / "state.json").write_text(json.dumps({str(file.resolve()): ends[59]}))
        replay = run_import(tmp_path, file)
        assert f"{COUNT + 3 - 60} messages: 0 accepted, {COUNT - 60 + 1} duplicates" in replay.stdout
        with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
            assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == COUNT - 40 + 1

    def test_json_summary_progress_bar_on_a_terminal_and_audit_chain(self, tmp_path: Path) -> None:
        """--json gives the summary as data; on a terminal a progress bar runs to 100%; every message is audited."""
        file = backlog(tmp_path / "backlog.hl7")
        main, terminal = pty.openpty()  # stderr is a terminal, as when an operator runs the command
        # 30 rows x 100 columns: a new pty is 0 x 0, on which tqdm draws a bar of nothing.
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        seen: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(main, 4096)
                except OSError:  # EIO: the command ended and closed the terminal
                    return
                if not data:
                    return
                seen.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "adapter",
                    "import",
                    "--json",
                    "--state",
                    str(tmp_path / "state.json"),
                    str(file),
                ],
                env=homeward_env(tmp_path),
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=terminal,
                text=True,
                timeout=300,
            )
        finally:
            os.close(terminal)
            reader.join(10)
            os.close(main)
        assert result.returncode == 1  # one message was refused
        (summary,) = json.loads(result.stdout)
        assert summary["file"] == str(file) and summary["messages"] == COUNT + 3
        assert summary["outcomes"] == {"accepted": COUNT, "duplicate": 1, "filtered": 1, "unrouted": 0, "refused": 1}
        assert list(summary["refused_reasons"]) == ["102 at PID-7: not a real calendar date/time"]
        # The position is just after the last message: a re-run reads only the BTS/FTS trailer.
        trailer = len(f"BTS|{COUNT + 3}\r\nFTS|1\r\n")
        assert summary["declared"] == COUNT + 3 and summary["position"] == file.stat().st_size - trailer
        bar = b"".join(seen).decode(errors="replace")
        assert "backlog.hl7: 100%|" in bar, repr(bar[-300:])

        verified = subprocess.run(
            [sys.executable, "-m", "adapter", "audit", "verify", "--json"],
            env=homeward_env(tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr
        with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
            audited = conn.execute("SELECT count(DISTINCT inbound_id) FROM audit").fetchone()[0]
            stored = conn.execute("SELECT count(*) FROM inbound").fetchone()[0]
        assert audited == stored == COUNT + 3, "each message read, refused or a duplicate too, has its audit records"

    def test_killed_mid_import_a_rerun_finishes_with_nothing_twice(self, tmp_path: Path) -> None:
        """SIGKILL after the first saved position; the same command again stores the rest, each message once."""
        total = 1500
        file = tmp_path / "big.hl7"
        file.write_bytes(
            b"".join(
                adt(
                    f"BIG-{i}",
                    patient=i % 11,
                    visit=f"V{i % 11}",
                    evn=f"2026112{4 + i // 1440}{i % 1440 // 60:02d}{i % 60:02d}00",
                )
                for i in range(total)
            )
        )
        state = tmp_path / "state.json"
        command = [sys.executable, "-m", "adapter", "import", "--state", str(state), str(file)]
        first = subprocess.Popen(command, env=homeward_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not state.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL, "the import was still running when killed"
        saved = json.loads(state.read_text())[str(file.resolve())]
        assert 0 < saved < file.stat().st_size
        with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
            stored_before = conn.execute("SELECT count(*) FROM inbound WHERE outcome = 'accepted'").fetchone()[0]
        assert 500 <= stored_before < total

        again = subprocess.run(
            command, env=homeward_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr
        assert f"resumed at byte {saved}" in again.stdout
        # Messages committed after the last save are read again and recognised as duplicates, nothing more.
        counts = re.search(r"(\d+) messages: (\d+) accepted, (\d+) duplicates", again.stdout)
        assert counts is not None, again.stdout
        read, accepted, duplicates = map(int, counts.groups())
        assert accepted == total - stored_before and duplicates == read - accepted
        with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
            ids = [
                r[0]
                for r in conn.execute("SELECT message_control_id FROM inbound WHERE outcome = 'accepted' ORDER BY id")
            ]
            replayed = conn.execute("SELECT count(*) FROM inbound WHERE outcome = 'duplicate'").fetchone()[0]
            outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        assert ids == [f"BIG-{i}" for i in range(total)], "each message stored once, in file order"
        assert outbox == total and replayed == duplicates
