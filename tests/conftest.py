"""Shared fixtures: real SQLite files, real PostgreSQL schemas, the MLLP listener on a free port, `homeward serve`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fhir_server import FhirServer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
MAPPINGS = ROOT / "mappings"
# The machine's PostgreSQL (trust auth); HOMEWARD_TEST_POSTGRES_URL points the tests elsewhere.
POSTGRES_URL = os.environ.get("HOMEWARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/**/*.bundle.json")


def golden_message(relative: str) -> bytes:
    """A golden HL7 file as CR-separated bytes (files are kept with LF for reading)."""
    return (GOLDEN / relative).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r")


class ServeProcess:
    """`homeward serve` in a subprocess with its own store and log file; the port is read from its log."""

    def __init__(self, tmp: Path, env: dict[str, str], args: tuple[str, ...] = ()):
        self.tmp = tmp
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.env = {
            **os.environ,
            "HOMEWARD_MLLP_PORT": "0",
            "HOMEWARD_STORE": str(tmp / "homeward.sqlite3"),
            "HOMEWARD_OUTBOX_DIR": str(tmp / "outbox"),
            "HOMEWARD_LOG_FORMAT": "json",
            **env,
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapter", "serve", *args],
            env=self.env,
            cwd=tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("event") == "mllp.listening":
                    return int(line["port"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"homeward serve exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"homeward serve did not listen in time:\n{self.log_path.read_text()}")

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"event": "non-json", "text": raw})
        return lines

    def wait_for_log(self, event: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.log_lines() if line.get("event") == event]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} '{event}' log lines:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start `homeward serve` subprocesses (call with extra arguments and env); all are stopped at teardown."""
    started: list[ServeProcess] = []

    def start(*args: str, **env: str) -> ServeProcess:
        process = ServeProcess(tmp_path, env, args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


class LoopThread:
    """An asyncio loop in a thread, so blocking socket clients can talk to in-process servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def ack_fields(ack: bytes) -> dict[str, list[str]]:
    """Split an ACK into {segment name: fields}, numbered as HL7 numbers them (MSH-1 is the separator)."""
    segments: dict[str, list[str]] = {}
    for line in re.split(r"\r|\n", ack.decode()):
        if not line:
            continue
        fields = line.split("|")
        if fields[0] == "MSH":
            fields.insert(1, "|")
        segments[fields[0]] = fields
    return segments


def _postgres_reachable() -> str | None:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server's URL; started with pg_ctlcluster if it is down. Fails (never skips) if unreachable."""
    problem = _postgres_reachable()
    if problem is not None and Path("/etc/postgresql").is_dir():
        for version in sorted(p.name for p in Path("/etc/postgresql").iterdir()):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        deadline = time.monotonic() + 30
        while problem is not None and time.monotonic() < deadline:
            time.sleep(0.5)
            problem = _postgres_reachable()
    if problem is not None:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable (the PostgreSQL store tests need it): {problem}")
    return POSTGRES_URL


def new_schema(server_url: str) -> str:
    """Create a fresh schema and return a URL whose search_path is it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in server_url else "?"
    return f"{server_url}{joiner}options=-csearch_path%3D{schema}"


def drop_schema(url: str) -> None:
    import psycopg

    base, _, schema = url.rpartition("options=-csearch_path%3D")
    with psycopg.connect(base.rstrip("?&"), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema of its own, dropped after the test."""
    url = new_schema(postgres_server)
    yield url
    drop_schema(url)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """The real FHIR server (Medplum's engine, in memory) on loopback for the whole session; fails loudly if it cannot start."""
    server = FhirServer(tmp_path_factory.mktemp("fhir-server") / "server.log")
    yield server
    server.stop()
