"""mllp.workers: intake in several processes on one listening socket, the forwarder in the serve process."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields
from tests.integration.test_delivery import adt, send, wait_until


def store_rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def send_concurrently(port: int, batches: list[list[bytes]]) -> list[str]:
    """One connection per batch, all at once; the MSA-1 codes of every ACK."""
    codes: list[str] = []
    lock = threading.Lock()

    def connection(batch: list[bytes]) -> None:
        result = send(port, *batch)
        with lock:
            codes.extend(result)

    threads = [threading.Thread(target=connection, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return codes


def nice(pid: int) -> int:
    """The nice value of a process's main thread (/proc/PID/stat field 19)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


def connections_per_process(port: int, pids: list[int]) -> list[int]:
    """How many established TCP connections on local `port` each process holds (/proc/net/tcp and its fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # 01: ESTABLISHED
                inodes.add(cols[9])
    counts = []
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                held += target.startswith("socket:[") and target[8:-1] in inodes
        counts.append(held)
    return counts


class TestIntakeWorkers:
    def test_a_burst_of_connections_is_shared_between_the_workers(self, serve) -> None:  # type: ignore[no-untyped-def]
        """Eight connections opened at once are spread over both workers (the first to wake does not take them all)."""
        server = serve(HOMEWARD_MLLP_WORKERS="2", HOMEWARD_LOG_LEVEL="info")
        server.wait_for_log("mllp.listening", count=3)  # serve's own line, then each worker's
        workers = [line["pid"] for line in server.wait_for_log("mllp.worker_started", count=2)]
        clients = [MllpClient("127.0.0.1", server.port, timeout=20) for _ in range(8)]
        try:
            for n, client in enumerate(clients):  # each connection has been accepted and served by now
                assert ack_fields(client.send(adt(f"B{n}", patient=n, visit=f"V{n}")))["MSA"][1] == "AA"
            counts = connections_per_process(server.port, workers)
        finally:
            for client in clients:
                client.close()
        assert sum(counts) == 8
        assert min(counts) >= 1, counts  # without the accept delay: [8, 0] (the spread is usually 4 and 4)

    def test_two_workers_keep_every_guarantee_and_a_killed_one_is_replaced(self, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """With two intake workers: all AA, resends are duplicates across workers, a SIGKILLed worker is
        restarted, every message is delivered once, the audit chain verifies, and SIGTERM stops them all."""
        server = serve(HOMEWARD_MLLP_WORKERS="2")
        started = server.wait_for_log("mllp.worker_started", count=2)
        # Six connections, each its own patient's messages in order; then every message resent on other connections.
        batches = [[adt(f"W{c}-{i}", patient=c, visit=f"V{c}") for i in range(8)] for c in range(6)]
        assert send_concurrently(server.port, batches) == ["AA"] * 48
        assert send_concurrently(server.port, batches[3:] + batches[:3]) == ["AA"] * 48

        os.kill(started[0]["pid"], signal.SIGKILL)
        server.wait_for_log("mllp.worker_exited")
        server.wait_for_log("mllp.worker_started", count=3)
        more = [[adt(f"X{c}-{i}", patient=c, visit=f"V{c}") for i in range(4)] for c in range(6)]
        assert send_concurrently(server.port, more) == ["AA"] * 24
        # The delivery thread runs at mllp.delivery_nice; the workers, the restarted one too, at full priority.
        workers = [line["pid"] for line in server.log_lines() if line.get("event") == "mllp.worker_started"]
        assert nice(server.proc.pid) == 10
        assert [nice(pid) for pid in workers[1:]] == [0, 0]

        store = tmp_path / "homeward.sqlite3"
        outcomes = dict(store_rows(store, "SELECT outcome, count(*) FROM inbound GROUP BY outcome"))
        assert outcomes == {"accepted": 72, "duplicate": 48}
        wait_until(lambda: len(list((tmp_path / "outbox").glob("*.json"))) == 72, 60, "72 bundles delivered")
        # Per patient, the outbox ids (the delivery order) follow the order each connection sent in.
        for c in range(6):
            ids = store_rows(
                store,
                "SELECT i.message_control_id FROM outbox o JOIN inbound i ON i.id = o.inbound_id"
                f" WHERE i.message_control_id LIKE 'W{c}-%' ORDER BY o.id",
            )
            assert [r[0] for r in ids] == [f"W{c}-{i}" for i in range(8)]
        verify = subprocess.run(
            [sys.executable, "-m", "adapter", "audit", "verify"], env=server.env, capture_output=True, timeout=60
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr

        assert server.stop() == 0
        pids = [line["pid"] for line in server.log_lines() if line.get("event") == "mllp.worker_started"]
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    def test_on_sqlite_serve_commits_the_workers_writes(self, serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """One writer per SQLite file: the workers never open it (serve commits what they send), serve leaves
        delivery to a delivery worker of its own (delivery.workers = 0), and a commit that fails there reaches
        the sender as AE 207 through the worker; the resend is then accepted."""
        server = serve(HOMEWARD_MLLP_WORKERS="2", HOMEWARD_LOG_LEVEL="info")
        workers = [line["pid"] for line in server.wait_for_log("mllp.worker_started", count=2)]
        (deliverer,) = server.wait_for_log("delivery.worker_started")
        assert deliverer["shard"] == 0
        assert (
            send_concurrently(server.port, [[adt(f"S{c}", patient=c, visit=f"V{c}")] for c in range(4)]) == ["AA"] * 4
        )
        store = tmp_path / "homeward.sqlite3"
        for pid in [*workers, server.proc.pid]:
            opened = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.exists()}
            assert (str(store) in opened) == (pid == server.proc.pid), (pid, sorted(opened))

        # Another process holds the file's write turn past the store's busy time-out (5 s): serve cannot commit.
        turn = os.open(f"{store}-writer.lock", os.O_RDWR)
        try:
            fcntl.flock(turn, fcntl.LOCK_EX)
            ack = ack_fields(MllpClient("127.0.0.1", server.port, timeout=30).send(adt("S9", patient=9, visit="V9")))
        finally:
            os.close(turn)
        assert ack["MSA"][1] == "AE"
        assert ack["ERR"][3].startswith("207")
        assert send(server.port, adt("S9", patient=9, visit="V9")) == ["AA"]
        assert store_rows(store, "SELECT outcome FROM inbound WHERE message_control_id = 'S9'") == [("accepted",)]

    def test_workers_end_with_a_killed_serve(self, serve) -> None:  # type: ignore[no-untyped-def]
        """A SIGKILLed serve takes its intake workers with it: none is left holding the port beside a new serve."""
        server = serve(HOMEWARD_MLLP_WORKERS="2")
        workers = [line["pid"] for line in server.wait_for_log("mllp.worker_started", count=2)]
        assert send(server.port, adt("K1")) == ["AA"]
        server.proc.kill()
        server.proc.wait(10)

        def gone(pid: int) -> bool:
            status = Path(f"/proc/{pid}/status")
            return not status.exists() or "zombie" in status.read_text()

        wait_until(lambda: all(gone(pid) for pid in workers), 20, "both intake workers ended")
