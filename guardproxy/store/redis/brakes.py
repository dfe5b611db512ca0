"""The fleet brakes' counters (``http/brakes.py``): a looping agent's repeats and a tenant's hourly
spend against its baseline, each one script call."""

from __future__ import annotations

from guardproxy.budget.records import LoopCount, VelocityCount
from guardproxy.store.redis.base import StoreBase, translated
from guardproxy.types import Micros


class Brakes(StoreBase):
    """Counting repeats and hourly spend, atomically."""

    async def count_repeat(
        self, tenant: str, key_id: str, job: str, digest: str, request_id: str, max_repeats: int, window_ms: int,
        *, action: str = "refuse", alerts: bool = False,
    ) -> LoopCount:
        """Count one request of ``key_id`` for ``job`` whose canonical digest is ``digest``: over the limit
        when the window already holds ``max_repeats`` of them (then it is not counted, and the first such
        request of a window queues a ``loop`` alert event when ``alerts``). One script call."""
        k = self.keys(tenant)
        keys = [k.loop_hits(key_id, job, digest), k.loop_alerted(key_id, job, digest), k.alerts, k.alerts_due]
        args: list[str | int] = [request_id, max_repeats, window_ms, action, int(alerts), tenant, key_id, job,
                                 digest]
        async with translated():
            over, repeats, retry_ms = (int(v) for v in await self._loop(keys=keys, args=args))
        return LoopCount(over=over == 1, repeats=repeats, retry_ms=retry_ms)

    async def count_hourly_spend(
        self, tenant: str, charge: Micros, factor_ppm: int, baseline_hours: int, min_micros: Micros,
        *, alerts: bool = False,
    ) -> VelocityCount:
        """Add ``charge`` to the tenant's spend of this UTC hour and compare its last hour with the
        average of the ``baseline_hours`` before: the first hour over ``factor_ppm`` / 1e6 times that
        (and over ``min_micros``) fires, once, queuing a ``velocity`` alert event when ``alerts``."""
        k = self.keys(tenant)
        keys = [k.spend_hours, k.velocity_fired, k.alerts, k.alerts_due]
        args: list[str | int] = [charge, factor_ppm, baseline_hours, min_micros, int(alerts), tenant]
        async with translated():
            last_hour, average, fired = (int(v) for v in await self._velocity(keys=keys, args=args))
        return VelocityCount(last_hour_micros=last_hour, average_micros=average, fired=fired == 1)
