"""Durable storage of inbound messages, the outbox and the audit trail; `open_store` picks the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapter.audit.keys import AuditKeys
    from adapter.config import StoreSettings
    from adapter.store.base import Store


def open_store(settings: StoreSettings, audit_keys: AuditKeys | None = None) -> Store:
    """PostgreSQL when store.url is set, else the SQLite file at store.path.

    Raises StoreUnavailable when the database cannot be reached or its schema is not migrated.
    """
    if settings.url:
        from adapter.store.postgres import PostgresStore

        return PostgresStore(settings.url, max_connections=settings.max_connections, audit_keys=audit_keys)
    from adapter.store.sqlite import SqliteStore

    return SqliteStore(settings.path, synchronous=settings.synchronous, audit_keys=audit_keys)


def migrate(settings: StoreSettings) -> str:
    """Create or update the store's schema; return a line saying what was done."""
    if settings.url:
        from adapter.store.postgres import migrate as migrate_postgres

        version = migrate_postgres(settings.url)
        return f"postgresql store: schema version {version}"
    from adapter.store.sqlite import SqliteStore

    SqliteStore(settings.path, synchronous=settings.synchronous).close()  # it creates its schema on open
    return f"sqlite store {settings.path}: schema ready"
