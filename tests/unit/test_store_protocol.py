"""``store_protocol.Store`` is what ``BudgetStore`` offers, on both engines."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from guardproxy.config.settings import StoreConfig
from guardproxy.store.protocol import Store
from guardproxy.store.redis import BudgetStore


def typed(store: BudgetStore) -> Store:
    return store  # mypy --strict checks every method's signature here


@pytest.mark.anyio
async def test_the_sqlite_store_is_a_store(tmp_path: Path) -> None:
    store = BudgetStore.from_config(StoreConfig(sqlite_file=str(tmp_path / "spend.db")))
    try:
        assert isinstance(typed(store), Store) and store.embedded
    finally:
        await store.aclose()


def test_every_method_of_the_protocol_has_the_stores_signature() -> None:
    methods = [name for name, _ in inspect.getmembers(Store, inspect.isfunction) if not name.startswith("_")]
    assert len(methods) >= 30
    for name in methods:
        assert inspect.signature(getattr(Store, name)) == inspect.signature(getattr(BudgetStore, name)), name
