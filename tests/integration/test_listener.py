"""The MLLP listener on a free port, driven by real clients over real sockets, with a real SQLite store."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.mllp.client import MllpClient
from adapter.mllp.framing import wrap
from adapter.mllp.server import MllpServer
from adapter.store.sqlite import SqliteStore
from tests.conftest import MAPPINGS, LoopThread, ack_fields, golden_message

A03 = golden_message("ADT_A03/basic.hl7")


def a03(control_id: str) -> bytes:
    return A03.replace(b"|MSG00001|", f"|{control_id}|".encode())


@dataclass
class Listener:
    server: MllpServer
    store: SqliteStore
    db: Path

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> MllpClient:
        return MllpClient("127.0.0.1", self.port, timeout=10)

    def rows(self, sql: str) -> list[tuple]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()


@pytest.fixture
def listener(tmp_path: Path, loop_thread: LoopThread) -> Iterator[Listener]:
    db = tmp_path / "store.sqlite3"
    store = SqliteStore(db)
    intake = Intake(store, load_mappings(MAPPINGS), IntakeOptions())
    server = MllpServer(intake, "127.0.0.1", 0, max_frame_bytes=64 * 1024, idle_timeout=5)
    loop_thread.run(server.start())
    yield Listener(server, store, db)
    loop_thread.run(server.stop(2))
    store.close()


class TestListener:
    def test_accepts_and_stores_before_aa(self, listener: Listener) -> None:
        """An A03 gets AA, and by then it is in the store with one queued delivery."""
        with listener.client() as client:
            ack = ack_fields(client.send(a03("C-1")))
        assert ack["MSA"][1:3] == ["AA", "C-1"]
        assert listener.rows("SELECT outcome FROM inbound") == [("accepted",)]
        assert listener.rows("SELECT state FROM outbox") == [("pending",)]

    def test_split_frame(self, listener: Listener) -> None:
        """A frame written in small pieces with pauses is read whole and acknowledged."""
        data = wrap(a03("C-split"))
        with listener.client() as client:
            for i in range(0, len(data), 7):
                client.sock.sendall(data[i : i + 7])
            assert ack_fields(client.read_frame())["MSA"][1:3] == ["AA", "C-split"]

    def test_two_frames_in_one_write(self, listener: Listener) -> None:
        """Two messages sent in one write get two ACKs, in order."""
        with listener.client() as client:
            client.sock.sendall(wrap(a03("C-a")) + wrap(a03("C-b")))
            first, second = client.read_frame(), client.read_frame()
        assert ack_fields(first)["MSA"][2] == "C-a"
        assert ack_fields(second)["MSA"][2] == "C-b"

    def test_junk_then_message(self, listener: Listener) -> None:
        """Junk before a start block is skipped; the message after it is acknowledged."""
        with listener.client() as client:
            client.sock.sendall(b"\r\nGET / HTTP/1.0\r\n\r\n")
            assert ack_fields(client.send(a03("C-junk")))["MSA"][1] == "AA"

    def test_oversize_frame_gets_ar_and_connection_survives(self, listener: Listener) -> None:
        """A frame over the limit gets AR naming the limit, its head is kept, and the next message is AA."""
        big = a03("C-big") + b"\rNTE|1||" + b"x" * 100_000
        with listener.client() as client:
            ack = ack_fields(client.send(big))
            assert ack["MSA"][1:3] == ["AR", "C-big"]
            assert "max_frame_bytes" in ack["ERR"][8]
            assert ack_fields(client.send(a03("C-after")))["MSA"][1] == "AA"
        kept = listener.rows("SELECT outcome, size FROM inbound WHERE message_control_id = 'C-big'")
        assert kept[0][0] == "refused" and 0 < kept[0][1] <= 4096

    def test_unparseable_payload_gets_ae_and_is_kept(self, listener: Listener) -> None:
        """A payload that is not HL7 gets AE 100, is stored with the reason, and the connection stays open."""
        with listener.client() as client:
            ack = ack_fields(client.send(b"this is not hl7"))
            assert ack["MSA"][1] == "AE"
            assert ack["ERR"][3].startswith("100^")
            assert ack_fields(client.send(a03("C-next")))["MSA"][1] == "AA"
        rows = listener.rows("SELECT raw, outcome, reason FROM inbound ORDER BY id")
        assert rows[0][0] == b"this is not hl7" and rows[0][1] == "refused" and "MSH" in rows[0][2]

    def test_incomplete_frame_at_eof_is_kept(self, listener: Listener) -> None:
        """A frame cut off by the sender closing is stored as incomplete and not acknowledged."""
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
            sock.sendall(b"\x0b" + a03("C-cut")[:80])
        for _ in range(100):
            rows = listener.rows("SELECT reason FROM inbound")
            if rows:
                break
            threading.Event().wait(0.05)
        assert rows and "incomplete frame" in rows[0][0]

    def test_twenty_concurrent_connections(self, listener: Listener) -> None:
        """Twenty clients sending at once each get AA for each of their messages, and all are stored."""
        errors: list[BaseException] = []

        def sender(n: int) -> None:
            try:
                with listener.client() as client:
                    for k in range(5):
                        ack = ack_fields(client.send(a03(f"C-{n}-{k}")))
                        assert ack["MSA"][1:3] == ["AA", f"C-{n}-{k}"]
            except BaseException as exc:  # collected and re-raised in the test thread
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert listener.rows("SELECT count(*) FROM inbound WHERE outcome = 'accepted'") == [(100,)]

    def test_duplicate_gets_aa_and_is_not_queued_twice(self, listener: Listener) -> None:
        """A resend of an accepted message (same MSH-4 + MSH-10) gets AA and adds no delivery."""
        with listener.client() as client:
            assert ack_fields(client.send(a03("C-dup")))["MSA"][1] == "AA"
            assert ack_fields(client.send(a03("C-dup")))["MSA"][1] == "AA"
        assert listener.rows("SELECT outcome FROM inbound ORDER BY id") == [("accepted",), ("duplicate",)]
        assert listener.rows("SELECT count(*) FROM outbox") == [(1,)]
