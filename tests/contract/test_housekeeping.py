"""Housekeeping on every backend: the bounded tenant index, and the commands the sweeps use (the same
replies from the SQLite store as from Redis)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio


async def test_the_tenant_index_keeps_only_the_most_recently_active(budget_store: BudgetStore) -> None:
    for i in range(5):
        await budget_store.register_tenant(f"t{i}", max_tenants=3)
        await anyio.sleep(0.005)  # distinct activity times
    assert await budget_store.known_tenants() == {"t2", "t3", "t4"}
    assert await budget_store.recent_tenants(2) == ["t4", "t3"]
    await budget_store.register_tenant("t2", max_tenants=3)  # active again: now the most recent
    assert (await budget_store.recent_tenants(3))[0] == "t2"


async def test_trimming_streams_and_ranks_answers_as_redis_does(budget_store: BudgetStore) -> None:
    client: Any = budget_store.client
    key = "gp:{acme}:housekeeping"
    await client.xadd(key, {"n": "1"}, id="1000-0")
    await client.xadd(key, {"n": "2"}, id="2000-0")
    await client.xadd(key, {"n": "3"}, id="3000-1")
    await client.xtrim(key, minid="2000-0", approximate=False)  # Redis trims "~" by whole nodes only
    assert [entry_id for entry_id, _ in await client.xrange(key)] in ([b"2000-0", b"3000-1"], ["2000-0", "3000-1"])
    zkey = "gp:{acme}:ranks"
    for score, member in ((1, "a"), (2, "b"), (3, "c"), (4, "d")):
        await client.zadd(zkey, {member: score})
    assert await client.zremrangebyrank(zkey, 0, -3) == 2  # all but the two highest
    assert [m if isinstance(m, bytes) else m.encode() for m in await client.zrange(zkey, 0, -1)] == [b"c", b"d"]
    assert await client.zremrangebyrank(zkey, 0, -3) == 0
    hkey = "gp:{acme}:fields"
    await client.hset(hkey, "x", "1")
    await client.hset(hkey, "y", "2")
    assert sorted(f if isinstance(f, bytes) else f.encode() for f in await client.hkeys(hkey)) == [b"x", b"y"]
