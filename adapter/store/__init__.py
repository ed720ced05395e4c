"""Durable storage of inbound messages, the outbox and the audit trail; open_store picks the backend."""

from __future__ import annotations

from adapter.config import Settings
from adapter.store.base import Store


def open_store(settings: Settings, *, serving: bool = True) -> Store:
    """The configured store. `serving=False` (the CLI beside a running server) leaves its claims alone."""
    from adapter.store.sqlite import SqliteStore

    return SqliteStore(settings.store.path, synchronous=settings.store.synchronous, release_claims=serving)
