"""Durable storage of inbound messages, the outbox and the audit trail; open_store picks the backend."""

from __future__ import annotations

from adapter.audit.keys import AuditKeys, load_keys
from adapter.config import Settings
from adapter.store.base import Store


def open_store(
    settings: Settings,
    *,
    serving: bool = True,
    audit_keys: AuditKeys | None = None,
    shard: tuple[int, int] | None = None,
) -> Store:
    """The configured store: PostgreSQL when store.url is set, else the SQLite file at store.path.

    `serving=False` (the CLI beside a running server) leaves SQLite's claims alone; PostgreSQL's
    claims are row locks of the session that holds them, so there is nothing to release.
    The audit keys sign the chain's head on every commit, so the CLI's audited actions need them too;
    without `audit_keys` they are loaded from the settings. Raises StoreUnavailable when the
    PostgreSQL database cannot be reached or its schema is not migrated.
    `shard` (index, count): a delivery worker's share of the queues on SQLite; on PostgreSQL every
    claim is a row lock taken with SKIP LOCKED, so delivery workers need no share of their own.
    """
    if audit_keys is None:
        audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    if settings.store.url:
        from adapter.store.postgres import PostgresStore

        return PostgresStore(settings.store.url, max_connections=settings.store.max_connections, audit_keys=audit_keys)
    from adapter.store.sqlite import SqliteStore

    return SqliteStore(
        settings.store.path,
        synchronous=settings.store.synchronous,
        release_claims=serving,
        audit_keys=audit_keys,
        shard=shard,
    )


def migrate(settings: Settings) -> str:
    """Create or update the store's schema; return a line saying what was done."""
    if settings.store.url:
        from adapter.store.postgres import migrate as migrate_postgres

        version = migrate_postgres(settings.store.url)
        return f"postgresql store: schema version {version}"
    from adapter.store.sqlite import SqliteStore

    SqliteStore(settings.store.path, synchronous=settings.store.synchronous, release_claims=False).close()
    return f"sqlite store {settings.store.path}: schema ready"
