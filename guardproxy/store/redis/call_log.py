"""Each tenant's call log (a stream the settle script appends to): the recent calls, their costs for
forecasts, and pages of it for the chargeback export."""

from __future__ import annotations

from collections.abc import Sequence

from guardproxy.budget.records import CallCosts, LoggedCall, LoggedCost
from guardproxy.store.redis.base import StoreBase, text, translated


class CallLog(StoreBase):
    """Reading the settled calls' log."""

    async def recent_calls(self, tenant: str, limit: int) -> list[dict[str, str]]:
        """The tenant's last ``limit`` settled calls, newest first, each with its ``time_ms``."""
        async with translated():
            entries = await self.client.xrevrange(self.keys(tenant).calls, count=limit) or []
        calls = []
        for entry_id, fields in entries:
            call = {text(a): text(b) for a, b in (fields or {}).items()}
            call["time_ms"] = text(entry_id or b"0").split("-")[0]
            calls.append(call)
        return calls

    async def call_costs(self, tenants: Sequence[str], count: int) -> CallCosts:
        """The server's time (ms) and each tenant's last ``count`` logged calls, newest first, as
        ``(time_ms, cost_micros, outcome)`` (for forecasts; the log's entry ids are the server's time)."""
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.xrevrange(self.keys(tenant).calls, count=count)
        async with translated():
            logs = await pipe.execute()
            # Not pipelined: Redis Cluster pipelines take only commands with keys.
            seconds, micros = await self.client.time()
        return CallCosts(int(seconds) * 1000 + int(micros) // 1000, [
            [LoggedCost(int(text(entry_id).split("-")[0]), int((fields or {}).get(b"cost_micros", b"0")),
                        text((fields or {}).get(b"outcome", b""))) for entry_id, fields in log or []]
            for log in logs
        ])

    async def logged_calls(
        self, tenant: str, start_ms: int, end_ms: int, *, after: str | None = None, count: int = 1000,
    ) -> list[LoggedCall]:
        """Up to ``count`` entries of the tenant's call log settled in ``[start_ms, end_ms)``, oldest first,
        from just after the entry id ``after`` when paging on."""
        low = f"({after}" if after else str(max(0, start_ms))
        async with translated():
            entries = await self.client.xrange(self.keys(tenant).calls, low, f"{max(0, end_ms - 1)}", count=count)
        return [LoggedCall(text(entry_id or b"0-0"), {text(a): text(b) for a, b in (fields or {}).items()})
                for entry_id, fields in entries or []]

    async def call_log_extent(self, tenant: str) -> tuple[int, int | None]:
        """How many entries the tenant's call log holds, and when its oldest was settled (ms; ``None``: empty)."""
        key = self.keys(tenant).calls
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        async with translated():
            length, oldest = await pipe.execute()
        first = int(text(oldest[0][0]).split("-")[0]) if oldest else None
        return int(length), first
