"""Alert events, queued by the scripts (a stream per tenant plus a zset of their next delivery time)
and delivered by ``observe.alerts.AlertSender``: claiming due events, recording deliveries, trimming."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from guardproxy.budget.records import AlertRecord, QueuedAlert
from guardproxy.store.redis.base import MONTH_KEY_TTL_S, StoreBase, text, translated

#: An alert event still undelivered this long after the trim point is no longer due.
GIVE_UP_MS = 2 * 86_400_000


class AlertQueue(StoreBase):
    """The queue of alert events each tenant's scripts fill."""

    async def claim_alerts(self, tenants: Sequence[str], lease_ms: int, limit: int = 20) -> list[QueuedAlert]:
        """The due alert events of ``tenants``, each claimed for ``lease_ms``: one script call per tenant
        (under its hash tag), all at once (not a pipeline: a cluster pipeline does not load scripts)."""

        async def claim(tenant: str) -> list[Any]:
            k = self.keys(tenant)
            items: list[Any] = await self._claim(keys=[k.alerts, k.alerts_due, k.alerts_delivery],
                                                 args=[lease_ms, limit])
            return items

        async with translated():
            results = await asyncio.gather(*(claim(t) for t in tenants))
        out = []
        for tenant, items in zip(tenants, results, strict=True):
            for item in items:
                values = [text(v) for v in item]
                fields = dict(zip(values[3::2], values[4::2], strict=True))
                hooks = {int(h) for h in values[2].split(",") if h}
                out.append(QueuedAlert(tenant, values[0], fields, int(values[1]), hooks))
        return out

    async def record_delivery(
        self, alert: QueuedAlert, hooks: set[int], state: str, next_at_ms: int = 0, error: str = ""
    ) -> None:
        """Record one delivery attempt of ``alert``: the webhooks (``hooks``) that have taken it, and its
        ``state``: ``delivered`` or ``dropped`` (done), or ``retrying`` (due again at ``next_at_ms``)."""
        k = self.keys(alert.tenant)
        pipe = self.client.pipeline(transaction=False)
        if state == "retrying":
            pipe.zadd(k.alerts_due, {alert.id: next_at_ms}, xx=True)
        else:
            pipe.zrem(k.alerts_due, alert.id)
        pipe.hset(k.alerts_delivery, mapping={
            f"{alert.id}:state": state, f"{alert.id}:attempts": str(alert.attempts + 1),
            f"{alert.id}:hooks": ",".join(map(str, sorted(hooks))), f"{alert.id}:error": error[:300],
        })
        pipe.expire(k.alerts_delivery, MONTH_KEY_TTL_S)
        pipe.expire(k.alerts, MONTH_KEY_TTL_S)  # the stream too: a tenant gone quiet leaves no events behind
        async with translated():
            await pipe.execute()

    async def recent_alerts(self, tenants: Sequence[str], limit: int) -> list[AlertRecord]:
        """The latest ``limit`` alert events of ``tenants``, newest first, with their delivery state."""
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            k = self.keys(tenant)
            pipe.xrevrange(k.alerts, count=limit)
            pipe.hgetall(k.alerts_delivery)
            pipe.zrange(k.alerts_due, 0, -1, withscores=True)
        async with translated():
            values = await pipe.execute()
        out = []
        for i, tenant in enumerate(tenants):
            entries, delivery, due = values[3 * i : 3 * i + 3]
            state = {text(a): text(b) for a, b in (delivery or {}).items()}
            due_at = {text(m): int(score) for m, score in due or []}
            for entry_id, fields in entries or []:
                eid = text(entry_id)
                out.append(AlertRecord(
                    tenant, eid, {text(a): text(b) for a, b in (fields or {}).items()},
                    state=state.get(f"{eid}:state") or ("pending" if eid in due_at else "unknown"),
                    attempts=int(state.get(f"{eid}:attempts", "0")), error=state.get(f"{eid}:error", ""),
                    next_attempt_ms=due_at.get(eid),
                ))
        out.sort(key=lambda a: tuple(int(p) for p in a.id.split("-")), reverse=True)
        return out[:limit]

    async def _trim_alerts(self, tenant: str, before_ms: int) -> None:
        """Alert events (and their delivery records) older than ``before_ms`` go."""
        k = self.keys(tenant)
        async with translated():
            await self.client.xtrim(k.alerts, minid=f"{before_ms}-0", approximate=False)
            fields: list[bytes] = await self.client.hkeys(k.alerts_delivery)  # type: ignore[assignment]
            old = [f for f in fields if int(text(f).split("-", 1)[0] or 0) < before_ms]
            if old:
                await self.client.hdel(k.alerts_delivery, *old)
            await self.client.zremrangebyscore(k.alerts_due, "-inf", before_ms - GIVE_UP_MS)
