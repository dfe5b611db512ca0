"""The SQLite store's own promises, beyond the contract suite: expired entries leave the file, and a
file locked by another connection past the timeout is "store unavailable" with nothing written."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.errors import StoreUnavailable
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from tests.helpers import wait_for

pytestmark = pytest.mark.anyio
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
LIMITS = Thresholds(10**9, 10**9, 10**10, 10**10)


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    db.close()
    return count


async def test_cached_responses_past_their_ttl_are_swept_from_the_file(tmp_path: Path) -> None:
    now = [time.time()]
    path = tmp_path / "spend.db"
    store = BudgetStore(SqliteClient(path, clock=lambda: now[0], sweep_every_s=0))
    try:
        for i in range(50):
            await store.cache_response("acme", f"d{i}", b'{"answer": 42}', ttl_s=60)
        await store.cache_set("st:job:1", "acme", 3600)
        assert await store.cached_response("acme", "d7") == b'{"answer": 42}'
        assert rows(path, "strings") == 51
        now[0] += 61
        assert await store.cached_response("acme", "d7") is None  # gone for reads at once
        await store.register_tenant("acme")  # any write sweeps (every sweep_every_s), on the store's thread
        await asyncio.to_thread(wait_for, lambda: rows(path, "strings") == 1 and rows(path, "expiry") == 1)
        assert await store.cache_get("st:job:1") == "acme"
    finally:
        await store.aclose()


async def test_a_file_locked_past_the_timeout_is_unavailable_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    store = BudgetStore(SqliteClient(path, busy_timeout_ms=300))
    try:
        await store.ping()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.admit("acme", PERIODS, LIMITS, [5], "r1", 60_000)
        assert 0.3 <= time.monotonic() - started < 3
        other.execute("ROLLBACK")
        other.close()
        assert rows(path, "zsets") == 0  # the refused admission reserved nothing
        admitted = await store.admit("acme", PERIODS, LIMITS, [5], "r1", 60_000)
        assert admitted.reservation is not None  # the lock gone, it goes through
    finally:
        await store.aclose()
