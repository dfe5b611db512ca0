"""Jobs (work orders): what each has cost and holds, and the most recently active."""

from __future__ import annotations

from guardproxy.budget.records import JobUsage
from guardproxy.store.redis.base import StoreBase, text, translated
from guardproxy.types import Micros


class Jobs(StoreBase):
    """Each tenant's jobs' counters (the scripts write them)."""

    async def job_usage(self, tenant: str, job: str) -> JobUsage | None:
        """One job's counters, ``None`` when it has none (never called, or expired)."""
        async with translated():
            fields = await self.client.hgetall(self.keys(tenant).job(job))
        if not fields:
            return None
        return JobUsage.from_hash(job, {text(a): text(b) for a, b in fields.items()})

    async def job_spent(self, tenant: str, job: str) -> Micros:
        """What ``job`` has cost and its live reservations hold, as admission counts it against its cap."""
        k = self.keys(tenant)
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(k.job(job), "cost_micros")
        pipe.hget(k.job_held, job)
        async with translated():
            cost, held = await pipe.execute()
        return int(cost or 0) + int(held or 0)

    async def recent_jobs(self, tenant: str, limit: int) -> list[JobUsage]:
        """The tenant's ``limit`` most recently active jobs, newest first (two round trips)."""
        k = self.keys(tenant)
        async with translated():
            ids = [text(j) for j in await self.client.zrevrange(k.jobs, 0, max(0, limit - 1))]  # type: ignore[arg-type]
            pipe = self.client.pipeline(transaction=False)
            for job in ids:
                pipe.hgetall(k.job(job))
            values = await pipe.execute() if ids else []
        return [JobUsage.from_hash(job, {text(a): text(b) for a, b in fields.items()})
                for job, fields in zip(ids, values, strict=True) if fields]
