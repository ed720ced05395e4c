"""Intake worker processes: `mllp.workers` processes accept on one shared listening socket and run the intake.

The serve process binds the socket (so port 0 works), starts each worker as a fresh interpreter
(`homeward serve --intake-fd N`, the socket passed by descriptor, never a fork of a threaded process),
runs delivery (on SQLite, in delivery workers of its own), the admin port and the audit loops, and
restarts a worker that dies.
Every guarantee is the store's, so it holds across processes. On SQLite a worker's writes are
committed by the serve process (adapter/store/relay.py: one writer per file, `--store-fd N`); on
PostgreSQL each worker commits through its own connections. Either way the AA follows the commit, a
resend is a duplicate whichever worker takes it (unique MSH-4 + MSH-10), one connection's messages are
committed in the order sent (a connection stays with one worker, and it waits for each ACK), and
the audit chain is extended inside each commit from the last record stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import structlog

from adapter.audit.keys import load_keys
from adapter.config import MllpSettings, Settings
from adapter.intake import Intake, IntakeOptions
from adapter.lifeline import WorkerProcesses
from adapter.mapping.loader import load_mappings
from adapter.mllp.allow import AllowList
from adapter.mllp.server import MllpServer, server_ssl_context
from adapter.store import open_store
from adapter.store.base import Store
from adapter.store.relay import RelayedStore, WriteRelay

log = structlog.get_logger("homeward.workers")

# Wake the forwarder at most this often from one worker (a signal per message would cost more than it saves).
WAKE_INTERVAL_SECONDS = 0.01


def bind(settings: MllpSettings) -> socket.socket:
    """The listening socket every worker accepts on."""
    sock = socket.create_server((settings.host, settings.port), backlog=1024)
    sock.setblocking(False)
    return sock


class Workers(WorkerProcesses):
    """The intake worker processes of one serve process: start, watch and restart, stop."""

    def __init__(self, count: int, sock: socket.socket, config: str | None, relay: WriteRelay | None = None):
        super().__init__(count, config)
        self.sock = sock
        self.relay = relay  # SQLite: the workers' writes are committed by this process
        # Workers are started from a thread of their own, made now: on Linux a nice value belongs to a
        # thread and a child inherits its parent thread's, so a worker restarted after the event loop
        # thread lowered its priority (deprioritise_this_thread) still runs at full priority.
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="worker-spawner")
        self._spawner.submit(lambda: None).result()

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        fd = self.sock.fileno()
        return self._popen(["--intake-fd", str(fd)], (fd,), self.relay.channel() if self.relay else None)

    def _log_started(self, proc: subprocess.Popen[bytes], index: int) -> None:
        log.info("mllp.worker_started", pid=proc.pid)

    def _log_exited(self, proc: subprocess.Popen[bytes], index: int, status: int) -> None:
        log.error("mllp.worker_exited", pid=proc.pid, status=status)

    def start(self) -> None:
        self.procs = [self._spawner.submit(self._start_one, i).result() for i in range(self.count)]

    async def _restart_one(self, index: int) -> subprocess.Popen[bytes]:
        return await asyncio.get_running_loop().run_in_executor(self._spawner, self._start_one, index)

    async def stop(self, grace: float) -> None:
        await super().stop(grace)
        self.sock.close()
        self._spawner.shutdown(wait=False)


def deprioritise_this_thread(nice: int) -> None:
    """Give the calling thread (Linux: only this thread; threads it starts later inherit it) the nice
    value `nice`: raising one's own nice value needs no privilege."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # a refusal costs the ACK path its head start, not the service
        log.warning("mllp.delivery_nice_failed", error=type(exc).__name__)
        return
    log.info("mllp.delivery_nice", nice=nice)


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


def intake_options(settings: Settings) -> IntakeOptions:
    return IntakeOptions(
        timezone=settings.mapping.timezone,
        validation=settings.mapping.validation,
        strict=settings.hl7.strict,
        fallback_charset=settings.hl7.fallback_charset,
        allow=AllowList(settings.mllp.allow_networks, settings.mllp.allow_facilities),
    )


def mllp_server(settings: Settings, intake: Intake, sock: socket.socket | None = None) -> MllpServer:
    return MllpServer(
        intake,
        settings.mllp.host,
        settings.mllp.port,
        max_frame_bytes=settings.mllp.max_frame_bytes,
        idle_timeout=settings.mllp.idle_timeout_seconds,
        ssl_context=server_ssl_context(settings.mllp),
        max_connections=settings.mllp.max_connections,
        sock=sock,
    )


async def run_worker(settings: Settings, sock: socket.socket, store_sock: socket.socket | None = None) -> None:
    """An intake worker (`homeward serve --intake-fd N [--store-fd M]`): listen on the shared socket until
    SIGTERM, finish the frames in hand, close. It builds only the intake: no forwarder, no targets, no
    HTTP client (about 10 MB less per worker than the whole adapter). With `store_sock` its writes go
    to the serve process, which wakes its own forwarder; else it opens the store itself."""
    audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    mappings = load_mappings(settings.mapping.dir)
    store: Store | RelayedStore
    if store_sock is not None:
        store = RelayedStore(store_sock)
        await store.start()
        on_accepted: Callable[[], None] = lambda: None  # noqa: E731 - serve knows of each commit itself
    else:
        # The serve process runs the forwarder and owns the claims; a worker leaves them alone.
        store = open_store(settings, serving=False, audit_keys=audit_keys)
        on_accepted = ForwarderWaker(os.getppid())
    intake = Intake(store, mappings, intake_options(settings), on_accepted=on_accepted, audit_keys=audit_keys)
    server = mllp_server(settings, intake, sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop(settings.mllp.shutdown_grace_seconds)
    store.close()
