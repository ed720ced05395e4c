"""The audit trail: its hash chain, its keys, and the queries operators run over it."""
