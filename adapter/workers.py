"""Intake worker processes: `mllp.workers` processes accept on one shared listening socket and run the intake.

The serve process binds the socket (so port 0 works), starts each worker as a fresh interpreter
(`homeward serve --intake-fd N`, the socket passed by descriptor, never a fork of a threaded process),
runs the forwarder, the admin port and the audit loops itself, and restarts a worker that dies.
Every guarantee is the store's, so it holds across processes: each worker commits through its own
connection under SQLite's (or PostgreSQL's) write lock, so the AA still follows the commit, a resend
is a duplicate whichever worker takes it (unique MSH-4 + MSH-10), one connection's messages are
committed in the order sent (a connection stays with one worker, and it waits for each ACK), and
the audit chain is extended inside each commit from the last record stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import structlog

from adapter.config import MllpSettings

log = structlog.get_logger("homeward.workers")

# A worker that dies is started again, but not in a tight loop if it dies at once.
RESTART_DELAY_SECONDS = 1.0
# Wake the forwarder at most this often from one worker (a signal per message would cost more than it saves).
WAKE_INTERVAL_SECONDS = 0.01


def bind(settings: MllpSettings) -> socket.socket:
    """The listening socket every worker accepts on."""
    sock = socket.create_server((settings.host, settings.port), backlog=1024)
    sock.setblocking(False)
    return sock


class Workers:
    """The intake worker processes of one serve process: start, watch and restart, stop."""

    def __init__(self, count: int, sock: socket.socket, config: str | None):
        self.count = count
        self.sock = sock
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = False

    @property
    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def _start_one(self) -> subprocess.Popen[bytes]:
        fd = self.sock.fileno()
        args = [sys.executable, "-m", "adapter", "serve", "--intake-fd", str(fd)]
        if self.config:
            args += ["--config", self.config]
        proc = subprocess.Popen(args, pass_fds=(fd,))
        log.info("mllp.worker_started", pid=proc.pid)
        return proc

    def start(self) -> None:
        self.procs = [self._start_one() for _ in range(self.count)]

    async def supervise(self) -> None:
        """Restart a worker that exits while serving (logged as an error with its exit status)."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(self.procs):
                status = proc.poll()
                if status is None or self._stopping:
                    continue
                log.error("mllp.worker_exited", pid=proc.pid, status=status)
                await asyncio.sleep(RESTART_DELAY_SECONDS)
                if not self._stopping:
                    self.procs[i] = self._start_one()

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each finishes the frame it is handling), then wait; kill after `grace` + 5 s."""
        self._stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.sock.close()


class ForwarderWaker:
    """In a worker: tell the serve process's forwarder that a message was committed (SIGUSR1), at most
    every WAKE_INTERVAL_SECONDS, and once more after the last of a burst, so no commit waits for the poll."""

    def __init__(self, pid: int):
        self.pid = pid
        self._last = 0.0
        self._scheduled = False

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= WAKE_INTERVAL_SECONDS:
            self._signal()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(WAKE_INTERVAL_SECONDS, self._signal)

    def _signal(self) -> None:
        self._scheduled = False
        self._last = time.monotonic()
        with contextlib.suppress(ProcessLookupError):  # the serve process is gone: this worker is stopping
            os.kill(self.pid, signal.SIGUSR1)
