"""Budget bookkeeping for the request pipeline: admit before the call, settle after it.

Wraps ``BudgetStore`` with what keeps the books right when the store is unreachable:

- ``fail_closed`` answers 503, ``fail_open`` serves unbudgeted (its charge settles like any other);
- a settlement that cannot be written goes to the on-disk ``Journal`` and is replayed at start-up
  and in the background within a second or so of the store answering again, exactly once (the
  settle script ignores an id it already settled);
- an admit whose reply was lost is released through the same journal, so a late admit holds nothing;
- every reservation of a running call has its lease renewed by one background task per process, so
  a long stream keeps its room and a crashed process's reservations free within one lease.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias

import anyio

from guardproxy.budget import Decision, RateLimits, Thresholds
from guardproxy.config import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.journal import Entry, Journal
from guardproxy.periods import Periods, periods_at
from guardproxy.store import Admission, AlertArgs, BudgetStore, JobArgs, Reservation, reply_lost
from guardproxy.types import Micros

if TYPE_CHECKING:
    from guardproxy.store_health import StoreHealth

log = logging.getLogger("guardproxy.ledger")

#: A settled call's entry in the tenant's audit log (field -> value).
CallRecord: TypeAlias = Mapping[str, str | int]
#: How often the background task retries a waiting journal.
DRAIN_INTERVAL_S = 0.5
#: How often it looks for journals left by dead processes.
ADOPT_INTERVAL_S = 30.0
#: How long shutdown waits for the store to take the journal.
SHUTDOWN_DRAIN_S = 5.0
#: How often a tenant's last activity is written to the tenant index (per process).
REGISTER_EVERY_S = 3600.0
REGISTERED_KEPT = 100_000


class Ledger:
    """Admission and settlement of every call of this process, and the background work they need.

    ``journal`` is ``None`` for the embedded store, which cannot become unreachable.
    ``on_duplicate`` hears each settlement the store ignored because its id had already settled.
    """

    def __init__(
        self, store: BudgetStore, config: Config, clock: Callable[[], datetime], journal: Journal | None = None,
        on_duplicate: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.journal = journal
        self.on_duplicate = on_duplicate
        self.lease_ms = int(config.store.lease_s * 1000)
        self._live: dict[str, Reservation] = {}
        #: When each tenant was last written to the tenant index by this process (monotonic s).
        self._registered: dict[str, float] = {}
        #: Watches the store's eviction policy and resets (``store_health``); ``None``: not watched.
        self.health: StoreHealth | None = None

    def periods(self, tenant: str) -> Periods:
        return periods_at(self.clock(), self.config.policy_for(tenant).zone)

    # -- the calls' side -------------------------------------------------------------------------

    def alert_args(self, tenant: str) -> AlertArgs:
        """What the scripts need to queue ``tenant``'s alert events (nothing while no webhook is set)."""
        policy = self.config.policy_for(tenant)
        alerts = self.config.alerts
        return AlertArgs(policy.daily_micros, policy.monthly_micros, alerts.thresholds_ppm(), alerts.enabled)

    def job_args(self, tenant: str, job: str) -> JobArgs:
        """What the scripts need for ``tenant``'s ``job`` (``""``: the call names none)."""
        return JobArgs(job, self.config.policy_for(tenant).job_micros, self.config.store.job_retention_days * 86400)

    async def admit(
        self, tenant: str, worst_cases: Sequence[Micros], call_tokens: int = 0, job: str = "", *,
        provisional: bool = False,
    ) -> Admission:
        """Decide and reserve (``call_tokens``: the call's worst-case tokens, for the tenant's tpm;
        ``job``: the work order it belongs to, whose cap it must fit too; ``provisional``: a refusal is
        not recorded, as a clamped admission may follow); raises 503 while the store is down, unless
        configured to fail open."""
        refusal = None
        if self.health is not None:
            await self.health.recheck()
            refusal = self.health.refusal()
        if refusal is not None:
            # Checked before fail_open: the store answers, but its counters cannot be trusted.
            raise GuardError(ErrorKind.STORE_UNAVAILABLE, refusal, headers={"retry-after": "30"})
        periods = self.periods(tenant)
        policy = self.config.policy_for(tenant)
        limits = Thresholds.for_policy(policy)
        reservation_id = uuid.uuid4().hex
        try:
            now = time.monotonic()
            if tenant not in self._registered or now >= self._registered[tenant]:
                # At most hourly per tenant and process: the index keeps tenants by last activity, for
                # metrics and the admin API (service-key tenants too), and forgets idle ones.
                await self.store.register_tenant(tenant, self.config.store.tenant_retention_days,
                                                 self.config.store.tenant_index_max)
                if len(self._registered) >= REGISTERED_KEPT:
                    self._registered.clear()  # arbitrary service-key tenant ids must not grow it either
                self._registered[tenant] = now + REGISTER_EVERY_S
            admission = await self.store.admit(
                tenant, periods, limits, worst_cases, reservation_id, self.lease_ms,
                rate=RateLimits(policy.rpm, policy.tpm), call_tokens=call_tokens, alerts=self.alert_args(tenant),
                job=self.job_args(tenant, job), provisional=provisional,
            )
        except StoreUnavailable as exc:
            if self.health is not None:
                self.health.suspect()
            if not self.config.store.fail_open:
                if reply_lost(exc):
                    # The script may have run after all: release the id, so that a late admit holds nothing.
                    # (fail_open needs no release: the call's own settlement of this id does it.)
                    with anyio.CancelScope(shield=True):
                        lost = Reservation(reservation_id, tenant, periods.day, periods.month, 0, job)
                        await self._keep(Entry(lost, 0))
                raise GuardError(
                    ErrorKind.STORE_UNAVAILABLE,
                    "The budget store is unavailable, so no spend can be admitted. Try again shortly.",
                    headers={"retry-after": "1"},
                ) from None
            log.warning("budget store unavailable: serving tenant=%s unbudgeted (fail_open)", tenant)
            # Not written anywhere; it settles (and charges) like any other, through the journal if need be.
            unbudgeted = Reservation(reservation_id, tenant, periods.day, periods.month, worst_cases[0], job)
            return Admission(Decision(0, 0, 0), limits, unbudgeted, unbudgeted=True)
        if admission.already_settled:
            raise GuardError(ErrorKind.STORE_UNAVAILABLE, "The reservation was released before it was made; "
                             "try again.", headers={"retry-after": "1"})
        if admission.reservation is not None:
            self._live[reservation_id] = admission.reservation
        return admission

    async def settle(self, reservation: Reservation, charge: Micros, record: CallRecord | None = None) -> None:
        """Release the reservation, charge and log the call, once; never raises for an unreachable store
        (the settlement waits in the journal)."""
        self._live.pop(reservation.id, None)
        entry = Entry(reservation, max(0, charge), record)
        try:
            await self._apply(entry)
        except StoreUnavailable:
            if self.health is not None:
                self.health.suspect()
            await self._keep(entry)

    # -- the journal -----------------------------------------------------------------------------

    def journal_pending(self) -> int:
        """Settlements waiting on disk for the store."""
        return len(self.journal) if self.journal is not None else 0

    def journal_growing(self) -> bool:
        """Settlements wait and the store did not take them at the last try (for readiness)."""
        return self.journal is not None and len(self.journal) > 0 and self.journal.stalled

    async def drain(self) -> int:
        """Write what waits in the journal; returns how many settlements were written."""
        if self.journal is None:
            return 0
        return await self.journal.drain(self._apply)

    async def _apply(self, entry: Entry) -> None:
        settlement = await self.store.settle(entry.reservation, entry.charge, entry.record,
                                             self.alert_args(entry.reservation.tenant),
                                             self.config.store.job_retention_days * 86400)
        if not settlement.applied:
            log.warning("settlement of reservation %s (tenant=%s, %d micro-USD) ignored: it had already settled",
                        entry.reservation.id, entry.reservation.tenant, entry.charge)
            if self.on_duplicate is not None:
                self.on_duplicate()

    async def _keep(self, entry: Entry) -> None:
        if self.journal is None:
            log.error("budget store unavailable: charge of %d micro-USD for tenant=%s lost (no journal)",
                      entry.charge, entry.reservation.tenant)
            return
        try:
            await self.journal.append(entry)
        except OSError as exc:  # a full or read-only disk: nothing left to keep the charge in
            log.error("journal unwritable (%s): charge of %d micro-USD for tenant=%s (reservation %s) lost",
                      exc, entry.charge, entry.reservation.tenant, entry.reservation.id)

    # -- background work -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Replay the journal (this process's and those of dead ones), then keep draining it and
        renewing leases until the block ends; a last drain is attempted on the way out."""
        if self.journal is not None:
            await self.journal.adopt_orphans()
            await self.drain()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._background)
                try:
                    yield
                finally:
                    group.cancel_scope.cancel()
        finally:
            if self.journal is not None:
                with anyio.move_on_after(SHUTDOWN_DRAIN_S, shield=True):
                    await self.drain()
                self.journal.close()

    async def _background(self) -> None:
        renew_every_s = self.config.store.lease_s / 3
        next_renewal = next_adoption = time.monotonic()
        while True:
            await anyio.sleep(min(DRAIN_INTERVAL_S, renew_every_s))
            now = time.monotonic()
            try:
                if self.journal_pending():
                    await self.drain()
                if now >= next_renewal:
                    next_renewal = now + renew_every_s
                    await self.renew()
                if self.journal is not None and now >= next_adoption:
                    next_adoption = now + ADOPT_INTERVAL_S
                    await self.journal.adopt_orphans()
            except StoreUnavailable:
                pass  # tried again next tick
            except Exception:  # the background task must outlive any one failure; it is logged
                log.exception("ledger background task: unexpected error (continuing)")

    async def renew(self) -> None:
        """Extend the lease of every reservation of this process's running calls."""
        live = list(self._live.values())
        if not live:
            return
        lost = await self.store.renew(live, self.lease_ms)
        for reservation_id in lost:
            if self._live.pop(reservation_id, None) is not None:
                log.warning("reservation %s expired while its call was still running (lease %.1f s)",
                            reservation_id, self.config.store.lease_s)
