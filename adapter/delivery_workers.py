"""Delivery worker processes: `delivery.workers` processes each run the forwarder over their share of the queues.

One process cannot deliver 1,000 messages a second here: an HTTP request with httpx alone costs
about a millisecond of CPU (PERFORMANCE.md). So the serve process can start N delivery workers
(`homeward serve --deliver-shard I`, fresh interpreters, never a fork of a threaded process, that build
only the forwarder: no mappings, no intake); each
claims only the (target, ordering_key) queues whose hash falls in its shard (SQLite), or takes row
locks with SKIP LOCKED like any instance (PostgreSQL). Either way one patient's queue is in flight
in one process at a time and in arrival order. The serve process restarts a worker that dies; the
new one frees the claims of its own shard, which no other process takes. A worker ends itself when
the serve process goes (adapter/lifeline.py), so an orphan never delivers beside a new serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
from adapter.targets import build_targets

log = structlog.get_logger("homeward.delivery_workers")

# Wake the workers at most this often (a signal per message would cost more than it saves).
WAKE_INTERVAL_SECONDS = 0.01


class DeliveryWorkers(WorkerProcesses):
    """The delivery worker processes of one serve process: start, wake, watch and restart, stop."""

    def __init__(self, count: int, config: str | None):
        super().__init__(count, config)
        self._last_wake = 0.0
        self._wake_scheduled = False

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._args("--deliver-shard", str(index)))

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


def serve_shard(settings: Settings, shard: int) -> None:
    """Run a delivery worker (run_delivery_worker) to its end on uvloop's event loop.

    A delivery worker spends most of its CPU in httpx and the event loop under it; on uvloop's loop the
    same asyncio code costs about 0.15-0.2 ms a message less (one worker draining into tests/bench/sink.py:
    1.23-1.31 -> 1.04-1.11 ms). Nothing the worker does depends on which loop runs it; serve and the
    intake keep asyncio's own.
    """
    uvloop.run(run_delivery_worker(settings, shard))


async def run_delivery_worker(settings: Settings, shard: int) -> None:
    """A delivery worker (`homeward serve --deliver-shard I`): run the forwarder over shard I of
    delivery.workers until SIGTERM, then let the sends in flight finish and record them, and close."""
    audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    # It frees the claims of its own shard that a dead predecessor left (SQLite): no other process takes them.
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
