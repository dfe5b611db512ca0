"""The tenants the store knows (an index by last activity), their runtime overrides, and what they
spend and hold, read for status and metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence

from guardproxy.budget.decision import WINDOW_MS
from guardproxy.budget.levels import LevelCap
from guardproxy.budget.periods import Periods
from guardproxy.budget.records import PeriodSpend, Snapshot
from guardproxy.store.layout import GlobalKeys
from guardproxy.store.redis.base import StoreBase, text, translated
from guardproxy.types import Micros


class Tenants(StoreBase):
    """The tenant index, each tenant's override, and snapshots of their spend."""

    @property
    def tenant_index(self) -> str:
        """Every tenant seen (service-key tenants too), by last activity (zset tenant -> ms)."""
        return f"{self.prefix}:tenant-index"

    async def register_tenant(self, tenant: str, retention_days: int = 62, max_tenants: int = 100_000) -> None:
        """Note ``tenant``'s activity in the tenant index (metrics and the admin API list it), and forget
        tenants idle more than ``retention_days`` and all but the ``max_tenants`` most recent."""
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.tenant_index, {tenant: now_ms})
        pipe.zremrangebyscore(self.tenant_index, "-inf", now_ms - retention_days * 86_400_000)
        pipe.zremrangebyrank(self.tenant_index, 0, -max_tenants - 1)
        async with translated():
            await pipe.execute()

    async def known_tenants(self, limit: int | None = None) -> set[str]:
        """The tenants in the index, or only the ``limit`` most recently active ones."""
        async with translated():
            members: list[bytes] = await self.client.zrevrange(  # type: ignore[assignment]
                self.tenant_index, 0, -1 if limit is None else limit - 1)
        return {text(m) for m in members}

    async def recent_tenants(self, limit: int) -> list[str]:
        """The ``limit`` most recently active tenants of the index, most recent first."""
        if limit <= 0:
            return []
        async with translated():
            members: list[bytes] = await self.client.zrevrange(self.tenant_index, 0, limit - 1)  # type: ignore[assignment]
        return [text(m) for m in members]

    async def tenants_page(self, offset: int, count: int) -> list[tuple[str, int]]:
        """``count`` tenants of the index from ``offset`` (least recently active first), with the time of
        their last noted activity (ms)."""
        async with translated():
            members: list[tuple[bytes, float]] = await self.client.zrange(  # type: ignore[assignment]
                self.tenant_index, offset, offset + count - 1, withscores=True)
        return [(text(m), int(score)) for m, score in members]

    async def migrate_tenant_set(self) -> int:
        """Move the tenants of the unbounded set ``{prefix}:tenants`` (before the index) into the index."""
        legacy = f"{self.prefix}:tenants"
        async with translated():
            if await self.client.type(legacy) not in (b"set", "set"):
                return 0
            members = await self.client.smembers(legacy)
            if members:
                now_ms = int(time.time() * 1000)
                await self.client.zadd(self.tenant_index, {text(m): now_ms for m in members}, nx=True)
            await self.client.delete(legacy)
        return len(members)

    async def snapshots(self, tenants: Sequence[tuple[str, Periods]]) -> list[Snapshot]:
        """Spend, reservations and overrides of many tenants in one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        # This process's clock, not TIME (a cluster answers TIME per node): the figures are for display.
        since = f"({int(time.time() * 1000) - WINDOW_MS}"
        for tenant, periods in tenants:
            k = self.keys(tenant)
            pipe.get(k.spend_day(periods.day))
            pipe.get(k.spend_month(periods.month))
            pipe.get(k.reserved)
            pipe.hgetall(k.budget)
            pipe.hexists(k.flags("day", periods.day), "blocked")
            pipe.hexists(k.flags("month", periods.month), "blocked")
            pipe.zcount(k.rate_requests, since, "+inf")
            pipe.zcount(k.rate_tokens, since, "+inf")
            pipe.get(k.rate_token_sum)
        async with translated():
            values = await pipe.execute()
        out = []
        step = 9
        for i in range(0, len(values), step):
            day, month, reserved, override, blocked_day, blocked_month, requests, calls, tokens = values[i : i + step]
            held = int(reserved or 0)
            out.append(Snapshot(
                day=PeriodSpend(int(day or 0), held), month=PeriodSpend(int(month or 0), held),
                override={text(a): text(b) for a, b in override.items()},
                refused=bool(blocked_day or blocked_month),
                # the token sum as of the last admission (which sweeps it); an idle minute empties it
                window_requests=int(requests or 0), window_tokens=int(tokens or 0) if calls else 0,
            ))
        return out

    async def level_usage(self, tenant: str, caps: Sequence[LevelCap]) -> list[tuple[Micros, Micros]]:
        """(settled in its window, held by its scope's live reservations) of each of ``tenant``'s ``caps``,
        in one pipelined round trip (for status; admission reads the same keys atomically)."""
        if not caps:
            return []
        k, g = self.keys(tenant), GlobalKeys(self.prefix, self.hash_tag)
        pipe = self.client.pipeline(transaction=False)
        for cap in caps:
            where = g if cap.level == "global" else k
            pipe.get(where.level_spend(cap.scope, cap.window, cap.period))
            pipe.get(where.level_held(cap.scope))
        async with translated():
            values = await pipe.execute()
        return [(int(values[i] or 0), max(0, int(values[i + 1] or 0))) for i in range(0, len(values), 2)]

    async def set_override(self, tenant: str, fields: dict[str, str], periods: Periods | None = None) -> None:
        """Write a runtime override; it re-arms the alerts and ends the blocked state of ``periods``
        (each event can fire again under the new limits), and lists the tenant."""
        k = self.keys(tenant)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(k.budget, mapping=fields)  # type: ignore[arg-type]
        pipe.zadd(self.tenant_index, {tenant: int(time.time() * 1000)})
        if periods is not None:
            pipe.delete(k.flags("day", periods.day), k.flags("month", periods.month))
        async with translated():
            await pipe.execute()

    async def clear_override(self, tenant: str, periods: Periods | None = None) -> None:
        k = self.keys(tenant)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(k.budget)
        if periods is not None:
            pipe.delete(k.flags("day", periods.day), k.flags("month", periods.month))
        async with translated():
            await pipe.execute()
