"""The ledger's scripts: admit (decide and reserve), settle (exactly once per reservation id), renew
leases; the epoch of reservation ids and the day each reservation is booked on."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from guardproxy.budget.decision import RateLimits, Thresholds
from guardproxy.budget.levels import NO_LEVELS, LevelArgs
from guardproxy.budget.periods import Periods
from guardproxy.budget.records import NO_JOB, NO_RATE_LIMITS, Admission, AlertArgs, JobArgs, Reservation, Settlement
from guardproxy.store.admit_args import AdmitArgs, AdmitReply, settle_books
from guardproxy.store.layout import GlobalKeys
from guardproxy.store.markers import epoch_of
from guardproxy.store.redis.base import DAY_KEY_TTL_S, MONTH_KEY_TTL_S, StoreBase, text, translated
from guardproxy.types import Micros


class Reservations(StoreBase):
    """Reserve before a call, settle after it, each in one script call."""

    async def admit(
        self, tenant: str, periods: Periods, limits: Thresholds, worst_cases: Sequence[Micros],
        reservation_id: str, lease_ms: int, *, rate: RateLimits = NO_RATE_LIMITS, call_tokens: int = 0,
        alerts: AlertArgs | None = None, job: JobArgs = NO_JOB, provisional: bool = False,
        levels: LevelArgs = NO_LEVELS,
    ) -> Admission:
        """Decide which candidate to send and reserve its worst case for ``lease_ms``, in one round trip;
        a call over ``rate`` (requests, or ``call_tokens`` worst-case tokens, per minute) is refused,
        and so is one whose worst case does not fit its ``job``'s cap (``exhausted == "job"``) or a cap
        of its ``levels`` (``exhausted == "level"``, ``Admission.refused_by``). A ``provisional``
        refusal (a clamped admission may follow) records no blocked flag or alert."""
        call = AdmitArgs(tenant, periods, limits, worst_cases, reservation_id, lease_ms, rate, call_tokens,
                         alerts or AlertArgs(0, 0), job, provisional, levels)
        keys, args = call.script_call(self.keys(tenant), GlobalKeys(self.prefix, self.hash_tag))
        async with translated():
            result: list[Any] = await self._admit(keys=keys, args=args)
        return AdmitReply.decode(result).admission(call)

    async def settle(
        self, reservation: Reservation, charge: Micros, record: Mapping[str, str | int] | None = None,
        alerts: AlertArgs | None = None, job_ttl_s: int = NO_JOB.ttl_s, floor: int = 0,
    ) -> Settlement:
        """Release ``reservation``, add ``charge`` to its day and month and log ``record``: one round
        trip, applied at most once per reservation id (a charge of 0 is a release). The token window
        counts the record's real tokens; a threshold of ``alerts`` reached queues its event. The call's
        job (``reservation.job``) gets the record's tokens and the charge, kept ``job_ttl_s``. Every level
        the admission booked is charged too; a charge no admission booked names its levels itself
        (``reservation.levels``). For an id ``<epoch>.<seq>``, ``floor`` (> 0 only from the process owning the
        epoch) raises the epoch's high-water mark to ``floor - 1`` (``store.markers``)."""
        k = self.keys(reservation.tenant)
        keys = [k.spend_day(reservation.day), k.spend_month(reservation.month), k.reservations,
                k.reservation_amounts, k.reserved, k.calls, k.settled(reservation.day),
                k.rate_token_counts, k.rate_token_sum, k.budget, k.flags("day", reservation.day),
                k.flags("month", reservation.month), k.alerts, k.alerts_due,
                k.reservation_jobs, k.job_held, k.job(reservation.job), k.jobs, k.reservation_levels,
                k.done(epoch_of(reservation.id))]
        tokens = int((record or {}).get("prompt_tokens", 0)) + int((record or {}).get("completion_tokens", 0))
        a = alerts or AlertArgs(0, 0)
        args: list[str | int] = [reservation.id, max(0, charge), DAY_KEY_TTL_S, MONTH_KEY_TTL_S,
                                 self.calls_kept if record else 0, tokens, reservation.tenant, reservation.day,
                                 reservation.month, a.limit_day, a.limit_month, len(a.thresholds_ppm),
                                 *a.thresholds_ppm, reservation.job, job_ttl_s]
        # levels (settle.v4's "books"): a charge no admission booked names the caps it goes to
        books, level_keys = settle_books(reservation.levels, k, GlobalKeys(self.prefix, self.hash_tag))
        keys += level_keys
        args += [books, floor]  # markers: the floor after the books
        for name, value in (record or {}).items():
            args += [name, value]
        async with translated():
            result: list[Any] = await self._replicated(
                lambda client: client.evalsha(self._settle.sha, len(keys), *keys, *args), self._settle
            )
        return Settlement(applied=int(result[3]) == 1, released=int(result[2]) == 1)

    async def new_epoch(self) -> int:
        """A number no other process (of any host) has been given: the epoch of this process's ids."""
        async with translated():
            return int(await self.client.incr(f"{self.prefix}:{{gp-store}}:epoch"))

    async def renew(self, reservations: Sequence[Reservation], lease_ms: int) -> set[str]:
        """Extend the lease of live ``reservations`` to ``lease_ms`` from now: one script call per tenant
        (each under its tenant's hash tag), all at once; returns the ids no longer held (expired or
        settled). Not a pipeline: a cluster pipeline does not load scripts."""
        by_tenant: dict[str, list[str]] = {}
        for r in reservations:
            by_tenant.setdefault(r.tenant, []).append(r.id)

        async def renew_tenant(tenant: str, ids: list[str]) -> list[Any]:
            lost: list[Any] = await self._renew(keys=[self.keys(tenant).reservations], args=[lease_ms, *ids])
            return lost

        async with translated():
            results = await asyncio.gather(*(renew_tenant(t, ids) for t, ids in by_tenant.items()))
        return {text(i) for lost in results for i in lost}

    async def booking_day(self, tenant: str, reservation_id: str, day: str) -> str:
        """The day ``reservation_id`` was first booked on; ``day`` (and remembered as long as a day's
        settled-marker lives) when it is new."""
        key = self.keys(tenant).booked_on(reservation_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, day, nx=True, ex=DAY_KEY_TTL_S)
        pipe.get(key)
        async with translated():
            _, first = await pipe.execute()
        return day if first is None else text(first)

    async def move_booking_day(self, tenant: str, reservation_id: str, day: str) -> None:
        """Remember ``day`` as the day ``reservation_id`` is booked on (its earlier day never settled it)."""
        async with translated():
            await self.client.set(self.keys(tenant).booked_on(reservation_id), day, ex=DAY_KEY_TTL_S)

    async def settled_charge(self, tenant: str, day: str, reservation_id: str) -> Micros | None:
        """What ``reservation_id``, admitted or booked on ``day``, was charged when it settled; ``None``
        when it has not settled (or its marker has expired)."""
        async with translated():
            value = await self.client.hget(self.keys(tenant).settled(day), reservation_id)
        return None if value is None else int(value)
