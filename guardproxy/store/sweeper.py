"""Background housekeeping of tenants that stopped calling (issue "unbounded keys").

An active tenant's admissions free its expired reservations; a tenant that never calls again would
keep them (and ``{t}:reserved``) for ever. At start-up and every ``SWEEP_INTERVAL_S`` each process
takes the next ``SWEEP_BATCH`` tenants of the index (round-robin), frees the expired reservations of
those idle for more than ``idle_ms`` (their last noted activity; ``BudgetStore.sweep``) and trims every
one's alert events and delivery records older than ``ALERTS_KEPT_DAYS``. Several processes sweeping
the same tenant is harmless.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from guardproxy.budget.periods import periods_at, utc_now
from guardproxy.config.settings import Config
from guardproxy.store.ledger import REGISTER_EVERY_S
from guardproxy.store.loops import repeating
from guardproxy.store.redis import BudgetStore

log = logging.getLogger("guardproxy.sweeper")

SWEEP_INTERVAL_S = 60.0
SWEEP_BATCH = 500
ALERTS_KEPT_DAYS = 40


class Sweeper:
    """Sweeps idle tenants in the background (``running``), a batch per round, round-robin."""

    def __init__(self, store: BudgetStore, config: Callable[[], Config], interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.store = store
        self.config = config
        self.interval_s = interval_s
        self._offset = 0

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        # a first round at start-up: a restart after a crash frees what the crash left
        return repeating(self.sweep_once, lambda: self.interval_s, name="sweeper", log=log)

    def idle_ms(self) -> int:
        """Idle for longer than the index's note interval and a lease: no admission of it is running."""
        return int((REGISTER_EVERY_S + 2 * self.config().store.lease_s) * 1000)

    async def sweep_once(self) -> int:
        """One batch; returns how many of its tenants held reservations."""
        config = self.config()
        page = await self.store.tenants_page(self._offset, SWEEP_BATCH)
        self._offset = 0 if len(page) < SWEEP_BATCH else self._offset + SWEEP_BATCH
        if not page:
            return 0
        now = utc_now()
        idle_before_ms = int(now.timestamp() * 1000) - self.idle_ms()
        batch = [(t, periods_at(now, config.policy_for(t).zone)) for t, _ in page]
        idle = {t for t, last_ms in page if last_ms < idle_before_ms}
        swept = await self.store.sweep(batch, idle, ALERTS_KEPT_DAYS * 86_400_000)
        if swept:
            log.info("sweeper: freed expired reservations of %d idle tenants", swept)
        return swept
