"""The store contract's fixture: `store_factory(name)` opens a store; the same name reopens the same data.

Every contract test runs on SQLite (a file under tmp_path) and PostgreSQL (a schema of its own on the
machine's server); several stores opened with one name on PostgreSQL are several instances on one database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter.store.base import Store
from adapter.store.postgres import PostgresStore, migrate
from adapter.store.sqlite import SqliteStore
from tests.conftest import drop_schema, new_schema

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[Store] = []
    urls: dict[str, str] = {}

    def open_store(name: str = "main") -> Store:
        store: Store
        if request.param == "postgres":
            if name not in urls:
                urls[name] = new_schema(request.getfixturevalue("postgres_server"))
                migrate(urls[name])
            store = PostgresStore(urls[name], max_connections=4)
        else:
            store = SqliteStore(tmp_path / f"{name}.sqlite3", synchronous="NORMAL")
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
    for url in urls.values():
        drop_schema(url)
