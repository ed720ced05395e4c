"""Lifecycle: build the store, mappings, listener, forwarder and targets; run; shut down within a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import structlog

from adapter import __version__, metrics
from adapter.admin import AdminServer
from adapter.audit.fhir_audit import AuditEventSender
from adapter.audit.keys import load_keys
from adapter.config import Settings
from adapter.delivery_workers import DeliveryWorkers
from adapter.errors import ConfigError, StoreUnavailable
from adapter.forwarder import build_forwarder
from adapter.intake import Intake
from adapter.mapping.loader import load_mappings
from adapter.mapping.routing import named_targets
from adapter.metrics import QueueCollector
from adapter.mllp.server import MllpServer
from adapter.store import open_store
from adapter.store.base import Actor
from adapter.store.relay import WriteRelay
from adapter.store.sqlite import SqliteStore
from adapter.targets import build_targets
from adapter.workers import Workers, bind, deprioritise_this_thread, intake_options, mllp_server

log = structlog.get_logger("homeward.app")

# Retention works in hours and days; an hourly purge keeps each batch small.
PURGE_INTERVAL_SECONDS = 3600.0
CHECKPOINT_INTERVAL_SECONDS = 3600.0


class App:
    """One running adapter: listener + forwarder over one store.

    With mllp.workers = N > 0 the listener and intake run in N worker processes (adapter/workers.py,
    run_worker) and this process runs the forwarder; with delivery.workers = M > 0 the forwarder runs in
    M processes instead (adapter/delivery_workers.py, run_delivery_worker), each with its share of the queues.
    On SQLite this process commits the workers' writes (adapter/store/relay.py), and with intake workers
    it always leaves delivery to delivery workers (at least one).
    """

    def __init__(self, settings: Settings, *, config: str | None = None):
        self.settings = settings
        self.role = "forwarder" if settings.mllp.workers else "all"
        self.mappings = load_mappings(settings.mapping.dir)  # a broken mapping stops start-up here
        self.audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
        # This process runs the forwarder, so it releases the claims a crash left behind.
        self.store = open_store(settings, serving=True, audit_keys=self.audit_keys)
        self.targets = build_targets(settings)
        unknown = named_targets(self.mappings.site.routing) - set(self.targets)
        if unknown:
            raise ConfigError(
                f"{settings.mapping.dir}/site.yaml: routing: target(s) {sorted(unknown)} are not configured"
                f" (configured: {sorted(self.targets)})"
            )
        self.audit_events = AuditEventSender(settings.audit.fhir_url) if settings.audit.fhir_url else None
        self.forwarder = build_forwarder(settings, self.store, self.targets, self.audit_events)
        # SQLite with worker processes: one writer per file, this process (adapter/store/relay.py).
        self.relay: WriteRelay | None = None
        if isinstance(self.store, SqliteStore) and (settings.mllp.workers or settings.delivery.workers):
            self.relay = WriteRelay(self.store, self.wake_delivery)
        # With intake workers on SQLite this process commits their messages: delivering in the same
        # interpreter holds those commits behind its HTTP work (one GIL; ACK p99 at 500 msgs/s offered
        # went from 21 ms to 190 ms), so delivery then runs in at least one delivery worker.
        delivery_count = settings.delivery.workers or (1 if self.relay is not None and settings.mllp.workers else 0)
        self.delivery_workers: DeliveryWorkers | None = None
        if delivery_count:
            self.delivery_workers = DeliveryWorkers(delivery_count, config, self.relay)
        self.server: MllpServer | None = None
        self.workers: Workers | None = None
        if self.role == "forwarder":
            self.workers = Workers(settings.mllp.workers, bind(settings.mllp), config, self.relay)
        else:
            intake = Intake(
                self.store,
                self.mappings,
                intake_options(settings),
                on_accepted=self.wake_delivery,
                audit_keys=self.audit_keys,
            )
            self.server = mllp_server(settings, intake)
        self.admin: AdminServer | None = None
        if settings.admin.port is not None:
            self.admin = AdminServer(settings.admin.host, settings.admin.port, self.readiness)
        self._queue_collector = QueueCollector(self.queue_stats, self.store.last_received_at)
        self._stop = asyncio.Event()

    def wake_delivery(self) -> None:
        """A message was committed: wake whatever delivers (this process's forwarder or the delivery workers)."""
        if self.delivery_workers is not None:
            self.delivery_workers.wake()
        else:
            self.forwarder.wake()

    def queue_stats(self) -> list[tuple[str, int, float | None, int]]:
        """The store's per-target queue figures, with zeros for configured targets that have none."""
        stats: dict[str, tuple[str, int, float | None, int]] = {name: (name, 0, None, 0) for name in self.targets}
        stats.update({row[0]: row for row in self.store.queue_stats()})
        return list(stats.values())

    async def checkpoint_loop(self) -> None:
        """Log where the audit chain ends, at start and hourly: shipped logs become a witness outside
        the store, so a later `homeward audit verify --expect SEQ:HASH` can catch a rolled-back file."""
        while True:
            try:
                seq, head_hash = await asyncio.to_thread(self.store.audit_head)
                log.info("audit.checkpoint", seq=seq, hash=head_hash)
            except Exception as exc:  # a read that fails now is tried again next time; never ends the loop
                log.error("audit.checkpoint_failed", error=type(exc).__name__)
            await asyncio.sleep(CHECKPOINT_INTERVAL_SECONDS)

    async def purge_loop(self) -> None:
        """Retention: purge bodies past audit.body_retention_days now and then once an hour."""
        days = self.settings.audit.body_retention_days
        if not days:
            return
        actor = Actor("homeward serve", f"retention: bodies older than {days:g} days")
        while True:
            try:
                purged = await self.store.purge_bodies(time.time() - days * 86400, actor)
                if purged:
                    log.info("retention.purged", messages=purged, older_than_days=days)
            except StoreUnavailable:
                log.error("store.unavailable", stage="retention_purge")
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)

    def readiness(self) -> list[str]:
        """What stops this adapter from taking and keeping messages right now ([] when ready)."""
        problems = []
        if self.server is not None and not self.server.listening:
            problems.append("the MLLP listener is not bound")
        if self.workers is not None and self.workers.alive < self.workers.count:
            problems.append(f"{self.workers.alive} of {self.workers.count} intake workers running")
        if self.delivery_workers is not None and self.delivery_workers.alive < self.delivery_workers.count:
            problems.append(f"{self.delivery_workers.alive} of {self.delivery_workers.count} delivery workers running")
        try:
            self.store.check_writable(timeout=5.0)
        except StoreUnavailable as exc:
            problems.append(f"store not writable: {exc}")
        return problems

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or request_stop), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        tasks = []
        if self.relay is not None:
            self.relay.start()
        if self.server is not None:
            await self.server.start()
        if self.workers is not None:
            port = self.workers.sock.getsockname()[1]
            log.info(
                "mllp.listening",
                host=self.settings.mllp.host,
                port=port,
                tls=self.settings.mllp.tls_cert_file is not None,
            )
            loop.add_signal_handler(signal.SIGUSR1, self.wake_delivery)  # a worker committed a message
            self.workers.start()
            tasks.append(asyncio.create_task(self.workers.supervise()))
        metrics.REGISTRY.register(self._queue_collector)
        if self.admin is not None:
            self.admin.start()
        if self.audit_events is not None:
            self.audit_events.start()
        if self.workers is not None:
            # After the threads that must keep full priority have started (the store's writer, which
            # holds the write turn, and the admin port): the ACK path in the workers comes first.
            # Delivery workers started from here on inherit it.
            deprioritise_this_thread(self.settings.mllp.delivery_nice)
        if self.delivery_workers is not None:  # the workers deliver, not this process
            self.delivery_workers.start()
            tasks.append(asyncio.create_task(self.delivery_workers.supervise()))
        else:
            tasks.append(asyncio.create_task(self.forwarder.run()))
        retention = asyncio.create_task(self.purge_loop())
        checkpoints = asyncio.create_task(self.checkpoint_loop())
        tasks += [retention, checkpoints]
        target_desc = (self.settings.fhir.base_url and "fhir") or f"directory:{self.settings.outbox.dir}"
        log.info(
            "homeward.started",
            version=__version__,
            store="postgresql" if self.settings.store.url else str(self.settings.store.path),
            target=target_desc,
            events=sorted(self.mappings.messages),
        )
        await self._stop.wait()
        log.info("homeward.stopping")
        grace = self.settings.mllp.shutdown_grace_seconds
        if self.server is not None:
            await self.server.stop(grace)
        if self.workers is not None:
            await self.workers.stop(grace)
        if self.delivery_workers is not None:
            await self.delivery_workers.stop(grace)
        else:
            await self.forwarder.stop(grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.audit_events is not None:
            await self.audit_events.aclose(grace)
        if self.admin is not None:
            self.admin.stop()
        metrics.REGISTRY.unregister(self._queue_collector)
        with contextlib.suppress(Exception):  # the last witness; shutting down matters more
            seq, head_hash = self.store.audit_head()
            log.info("audit.checkpoint", seq=seq, hash=head_hash)
        self.store.close()
        log.info("homeward.stopped")
