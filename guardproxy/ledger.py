"""Budget bookkeeping for the request pipeline: admit before the call, settle after it.

Wraps ``BudgetStore`` with the policy for an unreachable store: ``fail_closed`` answers 503,
``fail_open`` serves unbudgeted; in both, a charge that cannot be written is kept in memory and
written with the next settlement that gets through, so spend is not lost to a Redis blip.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeAlias

from guardproxy.budget import Decision, Thresholds
from guardproxy.config import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.periods import Periods, periods_at
from guardproxy.store import Admission, BudgetStore, Reservation
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.ledger")

BACKLOG_LIMIT = 100_000
#: A settled call's entry in the tenant's audit log (field -> value).
CallRecord: TypeAlias = Mapping[str, str | int]


class Ledger:
    def __init__(self, store: BudgetStore, config: Config, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._backlog: collections.deque[tuple[Reservation, Micros, CallRecord | None]] = collections.deque(
            maxlen=BACKLOG_LIMIT
        )
        self._registered: set[str] = set()

    def periods(self, tenant: str) -> Periods:
        return periods_at(self.clock(), self.config.policy_for(tenant).zone)

    async def admit(self, tenant: str, worst_cases: Sequence[Micros], ttl_ms: int) -> Admission:
        """Decide and reserve; raises 503 while the store is down, unless configured to fail open."""
        periods = self.periods(tenant)
        limits = Thresholds.for_policy(self.config.policy_for(tenant))
        reservation_id = uuid.uuid4().hex
        try:
            if tenant not in self._registered:
                # Once per tenant and process: lets metrics and the admin API list service-key tenants.
                await self.store.register_tenant(tenant)
                self._registered.add(tenant)
            return await self.store.admit(tenant, periods, limits, worst_cases, reservation_id, ttl_ms)
        except StoreUnavailable:
            if not self.config.store.fail_open:
                raise GuardError(
                    ErrorKind.STORE_UNAVAILABLE,
                    "The budget store is unavailable, so no spend can be admitted. Try again shortly.",
                    headers={"retry-after": "1"},
                ) from None
            log.warning("budget store unavailable: serving tenant=%s unbudgeted (fail_open)", tenant)
            # Not written anywhere; settling it charges the spend once the store answers again.
            unbudgeted = Reservation(reservation_id, tenant, periods.day, periods.month, worst_cases[0])
            return Admission(Decision(0, 0, 0), limits, unbudgeted)

    async def settle(self, reservation: Reservation, charge: Micros, record: CallRecord | None = None) -> None:
        """Release the reservation, charge and log the call; never raises for an unreachable store."""
        try:
            await self.store.settle(reservation, charge, record)
        except StoreUnavailable:
            if len(self._backlog) == self._backlog.maxlen:
                log.error("settlement backlog full: dropping the oldest unwritten charge")
            self._backlog.append((reservation, charge, record))
            log.error("budget store unavailable: charge of %d micro-USD for tenant=%s kept to retry (%d waiting)",
                      charge, reservation.tenant, len(self._backlog))
            return
        await self._drain_backlog()

    async def _drain_backlog(self) -> None:
        while self._backlog:
            # Taken off before the await, so two settlements draining at once never write one twice.
            entry = self._backlog.popleft()
            try:
                await self.store.settle(*entry)
            except StoreUnavailable:
                self._backlog.appendleft(entry)
                return
            if not self._backlog:
                log.warning("budget store back: all waiting charges written")
