"""The store's one deadline per call, on a real redis-server frozen with SIGSTOP (no per-socket timeouts)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import pytest

from guardproxy import store as store_module
from guardproxy.budget import Thresholds
from guardproxy.config import StoreConfig
from guardproxy.errors import StoreUnavailable
from guardproxy.periods import Periods
from guardproxy.store import BudgetStore
from tests.conftest import RedisServer

LIMITS = Thresholds(soft_day=10**12, hard_day=10**12, soft_month=10**13, hard_month=10**13)
NOW = datetime(2026, 11, 23, tzinfo=UTC)
PERIODS = Periods(day="2026-11-23", month="2026-11", day_resets_at=NOW, month_resets_at=NOW)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_frozen_redis_costs_each_call_one_deadline_and_a_thawed_one_answers_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "REDIS_TIMEOUT_S", 0.5)
    server = RedisServer()
    server.start()
    assert server.process is not None
    store = BudgetStore.from_config(StoreConfig(redis_url=server.url, key_prefix="gpdeadline"))
    try:
        first = await store.admit("t", PERIODS, LIMITS, [700], "r1", 60_000)
        assert first.reservation is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            # Calls in flight together each end at their deadline, not one after another.
            async with asyncio.timeout(5):  # a store call without a deadline would hang here
                results = await asyncio.gather(
                    *(store.admit("t", PERIODS, LIMITS, [700], f"frozen{i}", 60_000) for i in range(20)),
                    store.settle(first.reservation, 500), return_exceptions=True,
                )
            elapsed = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert 0.4 < elapsed < 2.0
        # Connections cut mid-command were closed: no late reply is read as another command's answer.
        # Commands sent during the freeze may still run once Redis resumes (they reserve and are never
        # settled): let them, then compare before and after.
        await asyncio.sleep(0.3)
        before = await store.snapshots([("t", PERIODS)])
        second = await store.admit("t", PERIODS, LIMITS, [300], "r2", 60_000)
        assert second.reservation is not None
        assert second.decision.index == 0
        await store.settle(second.reservation, 250)
        after = await store.snapshots([("t", PERIODS)])
        assert after[0].day.spent - before[0].day.spent == 250
        assert after[0].day.reserved == before[0].day.reserved
    finally:
        await store.aclose()
        server.stop()
