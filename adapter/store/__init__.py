"""Durable storage of inbound messages, the outbox and the audit trail."""
