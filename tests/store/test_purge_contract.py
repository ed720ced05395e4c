"""Retention on every store backend: purge_bodies drops finished bodies, keeps the rest, audits each."""

from __future__ import annotations

from adapter.store.base import DeliveryState, Store
from tests.store.test_contract import ME, NOW, put, run, stages


def test_purge_bodies(store_factory) -> None:  # type: ignore[no-untyped-def]
    """Only old, finished messages are purged; a purged message cannot be replayed; a second purge finds none."""
    store: Store = store_factory()

    async def body() -> None:
        old = await put(store, "OLD-D", "p1", at=NOW - 100)
        await put(store, "OLD-P", "p2", at=NOW - 100)
        await put(store, "NEW-D", "p3", at=NOW)
        for item in await store.claim_due(NOW + 1, 10, 60):
            if item.message_control_id != "OLD-P":
                await store.mark_delivered(item, NOW + 1, {"status": 200})
        assert await store.purge_bodies(NOW - 50, ME) == 1
        rec = await store.get_delivery(old)
        assert rec is not None and rec.state == DeliveryState.DELIVERED
        assert (await stages(store, inbound_id=rec.inbound_id))[-1] == "body_purged"
        assert await store.purge_bodies(NOW - 50, ME) == 0
        assert await store.replay(NOW + 2, ME, control_id="OLD-D") == []
        assert len(await store.replay(NOW + 2, ME, control_id="NEW-D")) == 1

    run(body())
