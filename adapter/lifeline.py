"""Worker processes of `homeward serve`: started, restarted when they die, stopped, and ending with serve."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

# A worker that dies is started again, but not in a tight loop if it dies at once.
RESTART_DELAY_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


class WorkerProcesses:
    """N worker processes of one serve process: start, watch and restart, stop.

    Subclasses say how to start worker `index` (`_spawn`) and log its start and exit under their own
    event names (literal, so the README's log catalogue test finds them).
    """

    def __init__(self, count: int, config: str | None):
        self.count = count
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = False

    @property
    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def _args(self, *extra: str) -> list[str]:
        """The command line of a worker: `homeward serve` with `extra` and serve's own --config."""
        args = [sys.executable, "-m", "adapter", "serve", *extra]
        return [*args, "--config", self.config] if self.config else args

    def _popen(
        self, extra: list[str], pass_fds: tuple[int, ...], store: socket.socket | None
    ) -> subprocess.Popen[bytes]:
        """Start `homeward serve` with `extra`; with `store` (one end of a relay channel, adapter/store/relay.py)
        the worker gets it as `--store-fd N`, and this process's copy is closed once the worker has its own."""
        if store is None:
            return subprocess.Popen(self._args(*extra), pass_fds=pass_fds)
        with store:
            fd = store.fileno()
            return subprocess.Popen(self._args(*extra, "--store-fd", str(fd)), pass_fds=(*pass_fds, fd))

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _log_started(self, proc: subprocess.Popen[bytes], index: int) -> None:
        raise NotImplementedError

    def _log_exited(self, proc: subprocess.Popen[bytes], index: int, status: int) -> None:
        raise NotImplementedError

    def _start_one(self, index: int) -> subprocess.Popen[bytes]:
        proc = self._spawn(index)
        self._log_started(proc, index)
        return proc

    async def _restart_one(self, index: int) -> subprocess.Popen[bytes]:
        return self._start_one(index)

    def start(self) -> None:
        self.procs = [self._start_one(i) for i in range(self.count)]

    async def supervise(self) -> None:
        """Restart a worker that exits while serving (logged as an error with its exit status)."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(self.procs):
                status = proc.poll()
                if status is None or self._stopping:
                    continue
                self._log_exited(proc, i, status)
                await asyncio.sleep(RESTART_DELAY_SECONDS)
                if not self._stopping:
                    self.procs[i] = await self._restart_one(i)

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each finishes what it holds), then wait; kill after `grace` + 5 s."""
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


def end_with_parent() -> None:
    """In a worker: get SIGTERM when the serve process dies, and stop at once if it is already gone.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a worker outlives a SIGKILLed serve. The signal
    comes when the *thread* that started the worker ends, so serve starts workers from threads that
    live as long as it does.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:
        sys.exit(0)
