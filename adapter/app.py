"""Lifecycle: build the store, mappings, listener, forwarder and targets; run; shut down within a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time

import structlog

from adapter import __version__, metrics
from adapter.admin import AdminServer
from adapter.audit.fhir_audit import AuditEventSender
from adapter.audit.keys import load_keys
from adapter.config import Settings
from adapter.delivery_workers import DeliveryWorkers
from adapter.errors import ConfigError, StoreUnavailable
from adapter.forwarder import Forwarder, RetryPolicy
from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.mapping.routing import named_targets
from adapter.metrics import QueueCollector
from adapter.mllp.allow import AllowList
from adapter.mllp.server import MllpServer, server_ssl_context
from adapter.store import open_store
from adapter.store.base import Actor
from adapter.targets import build_targets
from adapter.workers import ForwarderWaker, Workers, bind

log = structlog.get_logger("homeward.app")

# Retention works in hours and days; an hourly purge keeps each batch small.
PURGE_INTERVAL_SECONDS = 3600.0
CHECKPOINT_INTERVAL_SECONDS = 3600.0


class App:
    """One running adapter: listener + forwarder over one store.

    With mllp.workers = N > 0 the listener and intake run in N worker processes (adapter/workers.py)
    and this process runs the forwarder; a worker is an App given `intake_sock`, the shared socket.
    With delivery.workers = M > 0 the forwarder runs in M processes instead (adapter/delivery_workers.py),
    each an App given `deliver_shard`, its share of the queues.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        intake_sock: socket.socket | None = None,
        config: str | None = None,
        deliver_shard: int | None = None,
    ):
        self.settings = settings
        self.role = (
            "intake"
            if intake_sock is not None
            else "deliver"
            if deliver_shard is not None
            else "forwarder"
            if settings.mllp.workers
            else "all"
        )
        self.mappings = load_mappings(settings.mapping.dir)  # a broken mapping stops start-up here
        self.audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
        # Only a process that delivers releases the claims a crash left behind: the serve process all of
        # them at start (before any delivery worker runs), a delivery worker those of its own shard.
        shard = (deliver_shard, settings.delivery.workers) if deliver_shard is not None else None
        self.store = open_store(settings, serving=self.role != "intake", audit_keys=self.audit_keys, shard=shard)
        self.targets = build_targets(settings)
        unknown = named_targets(self.mappings.site.routing) - set(self.targets)
        if unknown:
            raise ConfigError(
                f"{settings.mapping.dir}/site.yaml: routing: target(s) {sorted(unknown)} are not configured"
                f" (configured: {sorted(self.targets)})"
            )
        self.audit_events = AuditEventSender(settings.audit.fhir_url) if settings.audit.fhir_url else None
        self.forwarder = Forwarder(
            self.store,
            self.targets,
            RetryPolicy(settings.retry),
            # One worker per allowed request: the [fhir] cap plus each named target's.
            max_in_flight=settings.fhir.max_in_flight + sum(t.max_in_flight for t in settings.targets),
            policies={t.name: RetryPolicy(t.retry) for t in settings.targets if t.retry is not None},
            audit_events=self.audit_events,
        )
        options = IntakeOptions(
            timezone=settings.mapping.timezone,
            validation=settings.mapping.validation,
            strict=settings.hl7.strict,
            fallback_charset=settings.hl7.fallback_charset,
            allow=AllowList(settings.mllp.allow_networks, settings.mllp.allow_facilities),
        )
        self.delivery_workers: DeliveryWorkers | None = None
        if self.role in ("all", "forwarder") and settings.delivery.workers:
            self.delivery_workers = DeliveryWorkers(settings.delivery.workers, config)
        on_accepted = ForwarderWaker(os.getppid()) if self.role == "intake" else self.wake_delivery
        self.intake = Intake(self.store, self.mappings, options, on_accepted=on_accepted, audit_keys=self.audit_keys)
        self.server: MllpServer | None = None
        self.workers: Workers | None = None
        if self.role == "forwarder":
            self.workers = Workers(settings.mllp.workers, bind(settings.mllp), config)
        elif self.role != "deliver":
            self.server = MllpServer(
                self.intake,
                settings.mllp.host,
                settings.mllp.port,
                max_frame_bytes=settings.mllp.max_frame_bytes,
                idle_timeout=settings.mllp.idle_timeout_seconds,
                ssl_context=server_ssl_context(settings.mllp),
                max_connections=settings.mllp.max_connections,
                sock=intake_sock,
            )
        self.admin: AdminServer | None = None
        if settings.admin.port is not None:
            self.admin = AdminServer(settings.admin.host, settings.admin.port, self.readiness)
        self._queue_collector = QueueCollector(self.queue_stats)
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
        if self.role == "intake":
            await self._run_intake()
            return
        if self.role == "deliver":
            await self._run_delivery()
            return
        tasks = []
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

    async def _run_intake(self) -> None:
        """An intake worker: listen on the shared socket until SIGTERM, finish the frames in hand, close."""
        assert self.server is not None
        await self.server.start()
        await self._stop.wait()
        await self.server.stop(self.settings.mllp.shutdown_grace_seconds)
        self.store.close()

    async def _run_delivery(self) -> None:
        """A delivery worker: run the forwarder over this worker's share until SIGTERM, record what was sent, close."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.forwarder.wake)  # serve: a commit
        if self.audit_events is not None:
            self.audit_events.start()
        forwarder = asyncio.create_task(self.forwarder.run())
        await self._stop.wait()
        grace = self.settings.mllp.shutdown_grace_seconds
        await self.forwarder.stop(grace)
        forwarder.cancel()
        await asyncio.gather(forwarder, return_exceptions=True)
        if self.audit_events is not None:
            await self.audit_events.aclose(grace)
        self.store.close()
