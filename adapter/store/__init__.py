"""Durable storage of inbound messages, the outbox and the audit trail; open_store picks the backend."""

from __future__ import annotations

from adapter.audit.keys import AuditKeys, load_keys
from adapter.config import Settings
from adapter.store.base import Store


def open_store(settings: Settings, *, serving: bool = True, audit_keys: AuditKeys | None = None) -> Store:
    """The configured store. `serving=False` (the CLI beside a running server) leaves its claims alone.

    The audit keys sign the chain's head on every commit, so the CLI's audited actions need them too;
    without `audit_keys` they are loaded from the settings.
    """
    from adapter.store.sqlite import SqliteStore

    if audit_keys is None:
        audit_keys = load_keys(settings.audit.hmac_key.get_secret_value(), settings.audit.hmac_key_file)
    return SqliteStore(
        settings.store.path,
        synchronous=settings.store.synchronous,
        release_claims=serving,
        audit_keys=audit_keys,
    )
