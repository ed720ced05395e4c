"""Delivery worker processes: `delivery.workers` processes each run the forwarder over their share of the queues.

One process cannot deliver 1,000 messages a second here: an HTTP request with httpx alone costs
about a millisecond of CPU (PERFORMANCE.md). So the serve process can start N delivery workers
(`homeward serve --deliver-shard I`, fresh interpreters, never a fork of a threaded process, that build
only the forwarder: no mappings, no intake); each
claims only the (target, ordering_key) queues whose hash falls in its shard (SQLite), or takes row
locks with SKIP LOCKED like any instance (PostgreSQL). Either way one patient's queue is in flight
in one process at a time and in arrival order. On SQLite a worker's claims and outcomes are
committed by the serve process (adapter/store/relay.py: one writer per file). The serve process
restarts a worker that dies, and the claims of its shard, which no other process takes, are freed
before the new one starts. A worker ends itself when
the serve process goes (adapter/lifeline.py), so an orphan never delivers beside a new serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time

import structlog
import uvloop

from adapter.audit.fhir_audit import AuditEventSender
from adapter.audit.keys import load_keys
from adapter.config import Settings
from adapter.forwarder import build_forwarder
from adapter.lifeline import WorkerProcesses
from adapter.store import open_store
from adapter.store.base import Store
from adapter.store.relay import RelayedStore, WriteRelay
from adapter.targets import build_targets

log = structlog.get_logger("homeward.delivery_workers")

# Wake the workers at most this often (a signal per message would cost more than it saves).
WAKE_INTERVAL_SECONDS = 0.01


class DeliveryWorkers(WorkerProcesses):
    """The delivery worker processes of one serve process: start, wake, watch and restart, stop."""

    def __init__(self, count: int, config: str | None, relay: WriteRelay | None = None):
        super().__init__(count, config)
        self.relay = relay  # SQLite: the workers' claims and outcomes are committed by this process
        self._last_wake = 0.0
        self._wake_scheduled = False

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        store = self.relay.channel((index, self.count)) if self.relay else None
        return self._popen(["--deliver-shard", str(index)], (), store)

    def _log_started(self, proc: subprocess.Popen[bytes], index: int) -> None:
        log.info("delivery.worker_started", pid=proc.pid, shard=index)

    def _log_exited(self, proc: subprocess.Popen[bytes], index: int, status: int) -> None:
        log.error("delivery.worker_exited", pid=proc.pid, shard=index, status=status)

    def wake(self) -> None:
        """A message was committed: wake every worker (SIGUSR1) at most every WAKE_INTERVAL_SECONDS,
        and once more after the last of a burst, so no commit waits for the forwarder's poll."""
        now = time.monotonic()
        if now - self._last_wake >= WAKE_INTERVAL_SECONDS:
            self._signal()
        elif not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_later(WAKE_INTERVAL_SECONDS, self._signal)

    def _signal(self) -> None:
        self._wake_scheduled = False
        self._last_wake = time.monotonic()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)


def serve_shard(settings: Settings, shard: int, store_sock: socket.socket | None = None) -> None:
    """Run a delivery worker (run_delivery_worker) to its end on uvloop's event loop.

    A delivery worker spends most of its CPU in httpx and the event loop under it; on uvloop's loop the
    same asyncio code costs less (tests/bench/bench_backlog.py, two workers: 1.15-1.17 -> 1.06-1.12 ms a
    message for serve and the workers together). Nothing the worker does depends on which loop runs it;
    serve and the intake keep asyncio's own.
    """
    uvloop.run(run_delivery_worker(settings, shard, store_sock))


async def run_delivery_worker(settings: Settings, shard: int, store_sock: socket.socket | None = None) -> None:
    """A delivery worker (`homeward serve --deliver-shard I [--store-fd M]`): run the forwarder over shard I
    of delivery.workers until SIGTERM, then let the sends in flight finish and record them, and close.
    With `store_sock` (SQLite) its claims and outcomes are committed by the serve process."""
    audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    store: Store | RelayedStore
    if store_sock is not None:
        # serve freed the claims a dead predecessor left in this shard before it made the channel.
        store = RelayedStore(store_sock)
        await store.start()
    else:
        # It frees the claims of its own shard that a dead predecessor left: no other process takes them.
        store = open_store(settings, serving=True, audit_keys=audit_keys, shard=(shard, settings.delivery.workers))
    audit_events = AuditEventSender(settings.audit.fhir_url) if settings.audit.fhir_url else None
    forwarder = build_forwarder(settings, store, build_targets(settings), audit_events)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, forwarder.wake)  # serve: a message was committed
    if audit_events is not None:
        audit_events.start()
    running = asyncio.create_task(forwarder.run())
    await stop.wait()
    grace = settings.mllp.shutdown_grace_seconds
    await forwarder.stop(grace)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    if audit_events is not None:
        await audit_events.aclose(grace)
    store.close()
