"""The store contract's fixture: `store_factory(name)` opens a store; the same name reopens the same data.

SQLite now; another backend joins by adding a param here (the contract tests do not change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter.store.base import Store
from adapter.store.sqlite import SqliteStore

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def open_store(name: str = "main") -> Store:
        store = SqliteStore(tmp_path / f"{name}.sqlite3", synchronous="NORMAL")
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
