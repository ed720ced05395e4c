"""Prometheus metrics (prometheus-client): counted where things happen, never derived from log lines.

One registry per process; the gauges that describe the queue are read from the store at scrape
time, so they are right after a restart and cost nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# An ACK is mostly the fsync: milliseconds; the tail matters more than the middle.
_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RECEIVED = Counter(
    "homeward_messages_received",
    "Frames received over MLLP, by event (unknown when unparsable)",
    ["event"],
    registry=REGISTRY,
)
ACKED = Counter("homeward_messages_acked", "ACKs sent, by event and MSA-1 code", ["event", "code"], registry=REGISTRY)
DELIVERED = Counter(
    "homeward_messages_delivered", "Deliveries accepted by their target", ["event", "target"], registry=REGISTRY
)
FAILED = Counter(
    "homeward_delivery_failures",
    "Failed delivery attempts (retried or dead-lettered), by event, target and HTTP status ('' without one)",
    ["event", "target", "status"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "homeward_messages_dead_lettered", "Deliveries moved to the dead letters", ["event", "target"], registry=REGISTRY
)
ACK_LATENCY = Histogram(
    "homeward_ack_latency_seconds",
    "Frame received to ACK ready (parse, map, durable store)",
    buckets=_ACK_BUCKETS,
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "homeward_delivery_latency_seconds",
    "One delivery attempt, request to response",
    ["target"],
    buckets=_DELIVERY_BUCKETS,
    registry=REGISTRY,
)
AUDIT_EVENTS = Counter(
    "homeward_audit_events",
    "FHIR AuditEvents for the audit repository, by result (sent, failed, dropped)",
    ["result"],
    registry=REGISTRY,
)


class QueueCollector(Collector):
    """Queue depth, age of the oldest undelivered message and dead letters waiting, per target, and when
    the last frame arrived: read from the store, so right after a restart, with intake workers in other
    processes, and with several instances on one database."""

    def __init__(
        self,
        stats: Callable[[], Iterable[tuple[str, int, float | None, int]]],
        last_received: Callable[[], float | None] = lambda: None,
    ):
        self.stats = stats
        self.last_received = last_received

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily("homeward_queue_depth", "Deliveries waiting (pending)", labels=["target"])
        oldest = GaugeMetricFamily(
            "homeward_oldest_undelivered_age_seconds",
            "Age of the oldest pending delivery (0 when none)",
            labels=["target"],
        )
        dead = GaugeMetricFamily(
            "homeward_dead_letters", "Deliveries in the dead letters, waiting for a person", labels=["target"]
        )
        now = time.time()
        for target, pending, oldest_at, dead_count in self.stats():
            depth.add_metric([target], pending)
            oldest.add_metric([target], max(0.0, now - oldest_at) if oldest_at is not None else 0.0)
            dead.add_metric([target], dead_count)
        yield depth
        yield oldest
        yield dead
        last = GaugeMetricFamily(
            "homeward_last_message_received_timestamp_seconds",
            "Unix time of the newest frame in the store (absent until there is one)",
        )
        received_at = self.last_received()
        if received_at is not None:  # no sample rather than 0, which would read as "quiet since 1970"
            last.add_metric([], received_at)
        yield last

    def describe(self) -> Iterable[Any]:
        return []
