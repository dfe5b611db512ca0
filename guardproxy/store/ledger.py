"""Budget bookkeeping for the request pipeline: admit before the call, settle after it.

Wraps ``BudgetStore`` with what keeps the books right when the store is unreachable:

- ``fail_closed`` answers 503, ``fail_open`` serves unbudgeted (its charge settles like any other);
- a settlement that cannot be written goes to the on-disk ``Journal`` and is replayed at start-up
  and in the background within a second or so of the store answering again, exactly once (the
  settle script ignores an id it already settled);
- an admit whose reply was lost is released through the same journal, so a late admit holds nothing;
- a journal that cannot be written keeps its charges in memory until the store or the disk takes
  them, and while neither can take a charge no call is admitted (503), not even with ``fail_open``;
- every reservation of a running call has its lease renewed by one background task per process, so
  a long stream keeps its room and a crashed process's reservations free within one lease;
- every running stream's charge so far is written beside the journal before each batch of frames
  it relays (into the page cache, ``Journal.progress``), and checkpointed durably each
  ``CHECKPOINT_INTERVAL_S``, so a process killed mid-stream still charges all it had relayed (its
  adopter settles them);
- behind Sentinel, every settlement the primary took is kept ``store.replay_window_s`` and written
  again when the primary changes (a former primary keeps acknowledging writes for seconds after a
  failover, and they are lost when it becomes a replica); the settled markers make replays of the
  ones the new primary has harmless;
- each call's id is ``<epoch>.<seq>`` of this process (``markers``), and each settlement tells the store
  the lowest seq that can still settle, so its exactly-once markers hold what is in flight, not history
  (calls another process may settle later, such as background responses, keep per-day markers).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TypeAlias

import anyio

from guardproxy.budget.decision import Decision, RateLimits, Thresholds
from guardproxy.budget.levels import NO_LEVELS, KeyBudget, LevelArgs, LevelCap, WindowCaps, caps_of, window_ids
from guardproxy.budget.periods import Periods, periods_at
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.records import Admission, AlertArgs, JobArgs, Reservation
from guardproxy.config.settings import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.store.journal import Entry, Journal
from guardproxy.store.markers import Seqs, epoch_from
from guardproxy.store.protocol import Store
from guardproxy.store.redis.base import reply_lost
from guardproxy.store.velocity import count_velocity
from guardproxy.types import Micros

if TYPE_CHECKING:
    from guardproxy.store.health import StoreHealth

log = logging.getLogger("guardproxy.ledger")

#: A settled call's entry in the tenant's audit log (field -> value).
CallRecord: TypeAlias = Mapping[str, str | int]
#: How often the background task retries a waiting journal.
DRAIN_INTERVAL_S = 0.5
#: How often it looks for journals left by dead processes.
ADOPT_INTERVAL_S = 30.0
#: How often running streams' charges so far are checkpointed beside the journal.
CHECKPOINT_INTERVAL_S = 1.0
#: After a failover, settlements taken in this much time are replayed once more (those in flight
#: on connections to the former primary when the change was seen).
REPLAY_AGAIN_AFTER_S = 3.0
#: How long shutdown waits for the store to take the journal.
SHUTDOWN_DRAIN_S = 5.0
#: How often a tenant's last activity is written to the tenant index (per process).
REGISTER_EVERY_S = 3600.0
REGISTERED_KEPT = 100_000
#: After the tenant index could not be written, how long before this process tries again for a tenant.
REGISTER_RETRY_S = 10.0


class StreamCharge(Protocol):
    """A running stream's charge so far (``http/progress.py``)."""

    def entry(self) -> Entry:
        """The settlement of what it has relayed until now."""

    def grown(self) -> tuple[Entry, bool] | None:
        """The same, when its charge may have grown since the last call (else ``None``), and whether
        only its completion grew (no usage arrived since)."""


def level_caps(
    config: Config, tenant: str, now: datetime, models: Sequence[str] | None = None, key_id: str = "",
    key_budget: KeyBudget | None = None, policy: BudgetPolicy | None = None,
) -> list[LevelCap]:
    """The caps of every level a call of ``tenant`` belongs to beside its day and month: global (UTC),
    the tenant's hour and week, its key's (``key_id``: ``fleet.key_fingerprint``) and those of the
    candidate ``models`` (``None``: every model the tenant caps). ``policy``: the tenant's with its
    runtime override (admission applies an override's hour and week in the script itself)."""
    policy = policy or config.policy_for(tenant)
    caps: list[LevelCap] = []
    if config.global_caps:
        caps += caps_of("global", "global", config.global_caps, window_ids(now, UTC))
    own = WindowCaps(hour=policy.hourly_micros, week=policy.weekly_micros)
    keyed = key_budget is not None and bool(key_budget.caps)
    if not (own or keyed or policy.model_caps):
        return caps  # the common case: nothing more to compute at each admission
    ids = window_ids(now, policy.zone)
    caps += caps_of("tenant", "tenant", own, ids, policy.soft_cap, policy.hard_cap)
    if key_budget is not None and keyed:
        caps += caps_of("key", f"key:{key_id}", key_budget.caps, ids, policy.soft_cap)
    for model, model_caps in policy.model_caps:
        if models is None or model in models:
            caps += caps_of("model", f"model:{model}", model_caps, ids, policy.soft_cap, model=model)
    return caps


class Ledger:
    """Admission and settlement of every call of this process, and the background work they need.

    ``journal`` keeps the charges the store cannot take (``None``: none kept, for tests).
    ``on_duplicate`` hears each settlement the store ignored because its id had already settled;
    ``on_velocity`` hears the tenant of each spend-velocity alert fired (``brakes.count_velocity``).
    """

    def __init__(
        self, store: Store, config: Config, clock: Callable[[], datetime], journal: Journal | None = None,
        on_duplicate: Callable[[], None] | None = None, on_velocity: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.journal = journal
        self.on_duplicate = on_duplicate
        self.on_velocity = on_velocity
        self.lease_ms = int(config.store.lease_s * 1000)
        self._live: dict[str, Reservation] = {}
        #: When each tenant was last written to the tenant index by this process (monotonic s).
        self._registered: dict[str, float] = {}
        #: Watches the store's eviction policy and resets (``store_health``); ``None``: not watched.
        self.health: StoreHealth | None = None
        #: Running streams: reservation id -> the settlement of what the stream has relayed so far.
        self._streams: dict[str, StreamCharge] = {}
        self._checkpointed = False
        #: Settlements the store took, with when (monotonic), kept for a replay after a failover.
        self._recent: collections.deque[tuple[float, Entry]] = collections.deque()
        self._keeps_recent = store.follows_failovers and config.store.replay_window_s > 0
        self._primary: str | None = None
        self._replay_again_at: float | None = None
        #: This process's epoch and the seqs that can still settle (``markers``); ``None`` until the store
        #: gave an epoch (meanwhile ids are uuids with per-day markers).
        self.seqs: Seqs | None = None
        self._epoch_retry_at = 0.0
        self._epoch_pid = os.getpid()

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

    def level_args(
        self, tenant: str, models: Sequence[str], key_id: str = "", key_budget: KeyBudget | None = None,
        policy: BudgetPolicy | None = None,
    ) -> LevelArgs:
        """The caps of every level a call of ``tenant`` belongs to (``level_caps``) now."""
        return LevelArgs(tuple(level_caps(self.config, tenant, self.clock(), models, key_id, key_budget, policy)),
                         tuple(models))

    def charge_levels(
        self, tenant: str, model: str = "", key_id: str = "", key_budget: KeyBudget | None = None,
    ) -> tuple[LevelCap, ...]:
        """The caps a charge of ``tenant`` for ``model`` (``""``: none) made now goes to when no admission
        booked it (``Reservation.levels``: external spend, a call served unbudgeted)."""
        caps = level_caps(self.config, tenant, self.clock(), [model] if model else [], key_id, key_budget)
        return tuple(cap for cap in caps if cap.binds(model))

    async def _epoch_seqs(self) -> Seqs | None:
        """This process's epoch and seqs, asked of the store at the first call (after any fork); ``None``
        while the store cannot give one (tried again a second later)."""
        if self.seqs is not None and self._epoch_pid != os.getpid():
            self.seqs = None  # a forked child: its parent's epoch is not its own
        if self.seqs is None and time.monotonic() >= self._epoch_retry_at:
            try:
                epoch = epoch_from(await self.store.new_epoch())
            except StoreUnavailable:
                self._epoch_retry_at = time.monotonic() + 1.0
                return None
            if self.seqs is None:  # another call may have been given one meanwhile
                window = self.config.store.replay_window_s if self._keeps_recent else 0.0
                self.seqs = Seqs(epoch, time.monotonic(), window)
                self._epoch_pid = os.getpid()
        return self.seqs

    async def admit(
        self, tenant: str, worst_cases: Sequence[Micros], call_tokens: int = 0, job: str = "", *,
        provisional: bool = False, levels: LevelArgs = NO_LEVELS, settled_later: bool = False,
    ) -> Admission:
        """Decide and reserve (``call_tokens``: the call's worst-case tokens, for the tenant's tpm;
        ``job``: the work order it belongs to, whose cap it must fit too; ``provisional``: a refusal is
        not recorded, as a clamped admission may follow; ``settled_later``: another process may settle
        the call long after it answered, e.g. a background response); raises 503 while the store is
        down, unless configured to fail open."""
        refusal = None
        if self.health is not None:
            await self.health.recheck(tenant)
            refusal = self.health.refusal()
        if refusal is not None:
            # Checked before fail_open: the store answers, but its counters cannot be trusted.
            raise GuardError(ErrorKind.STORE_UNAVAILABLE, refusal, headers={"retry-after": "30"})
        periods = self.periods(tenant)
        policy = self.config.policy_for(tenant)
        limits = Thresholds.for_policy(policy)
        if self.journal is not None and self.journal.unwritten:
            # The store refused charges and the journal could not keep them: nothing could keep this one.
            raise _nowhere_to_charge()
        seqs = None if settled_later else await self._epoch_seqs()
        reservation_id = uuid.uuid4().hex if seqs is None else seqs.take()
        may_settle = False  # markers: the id may still settle when this returns (its seq stays held)
        try:
            now = time.monotonic()
            if tenant not in self._registered or now >= self._registered[tenant]:
                # At most hourly per tenant and process: the index keeps tenants by last activity, for
                # metrics and the admin API (service-key tenants too), and forgets idle ones.
                if len(self._registered) >= REGISTERED_KEPT:
                    self._registered.clear()  # arbitrary service-key tenant ids must not grow it either
                try:
                    await self.store.register_tenant(tenant, self.config.store.tenant_retention_days,
                                                     self.config.store.tenant_index_max)
                    self._registered[tenant] = now + REGISTER_EVERY_S
                except StoreUnavailable:
                    if self.health is None or not self.health.cluster:
                        raise  # one server: the admission would fail too, without waiting twice
                    # On Cluster the index is one key on one shard, and a dead shard must not refuse
                    # the tenants of the others. Tried again a little later.
                    self._registered[tenant] = now + REGISTER_RETRY_S
            admission = await self.store.admit(
                tenant, periods, limits, worst_cases, reservation_id, self.lease_ms,
                rate=RateLimits(policy.rpm, policy.tpm), call_tokens=call_tokens, alerts=self.alert_args(tenant),
                job=self.job_args(tenant, job), provisional=provisional, levels=levels,
            )
        except StoreUnavailable as exc:
            if self.health is not None:
                self.health.suspect(tenant)
            # fail_open serves unbudgeted only while the journal can keep the charge.
            nowhere = self.journal is not None and not self.journal.writable
            if not self.config.store.fail_open or nowhere:
                if reply_lost(exc):
                    # The script may have run after all: release the id, so that a late admit holds nothing.
                    # (A call served with fail_open needs no release: its own settlement of this id does it.)
                    with anyio.CancelScope(shield=True):
                        lost = Reservation(reservation_id, tenant, periods.day, periods.month, 0, job)
                        may_settle = True  # markers: by this release
                        await self._keep(Entry(lost, 0))
                if nowhere:
                    raise _nowhere_to_charge() from None
                raise GuardError(
                    ErrorKind.STORE_UNAVAILABLE,
                    "The budget store is unavailable, so no spend can be admitted. Try again shortly.",
                    headers={"retry-after": "1"},
                ) from None
            log.warning("budget store unavailable: serving tenant=%s unbudgeted (fail_open)", tenant)
            # Not written anywhere; it settles (and charges) like any other, through the journal if need be,
            # at every level it belongs to (the caps of its first candidate, the one it is sent to).
            sent = levels.models[0] if levels.models else ""
            unbudgeted = Reservation(reservation_id, tenant, periods.day, periods.month, worst_cases[0], job,
                                     tuple(cap for cap in levels.caps if cap.binds(sent)))
            may_settle = True
            return Admission(Decision(0, 0, 0), limits, unbudgeted, unbudgeted=True)
        else:
            if admission.already_settled:
                raise GuardError(ErrorKind.STORE_UNAVAILABLE, "The reservation was released before it was made; "
                                 "try again.", headers={"retry-after": "1"})
            if admission.reservation is not None:
                self._live[reservation_id] = admission.reservation
            return admission
        finally:
            if seqs is not None and not may_settle and reservation_id not in self._live:
                seqs.release(reservation_id)  # never reserved: nothing can settle it

    async def settle(self, reservation: Reservation, charge: Micros, record: CallRecord | None = None) -> None:
        """Release the reservation, charge and log the call, once; never raises for an unreachable store
        (the settlement waits in the journal)."""
        self._live.pop(reservation.id, None)
        entry = Entry(reservation, max(0, charge), record)
        try:
            await self._apply(entry)
        except StoreUnavailable:
            if self.health is not None:
                self.health.suspect(reservation.tenant)
            await self._keep(entry)

    def track(self, reservation_id: str, so_far: StreamCharge) -> None:
        """Checkpoint a running stream: ``so_far`` gives the settlement of what it has relayed until now."""
        if self.journal is not None:
            self._streams[reservation_id] = so_far

    def untrack(self, reservation_id: str) -> None:
        """The stream ended (its settlement follows): no more checkpoints of it."""
        self._streams.pop(reservation_id, None)

    def relaying(self, reservation_id: str) -> None:
        """A tracked stream is about to relay what it has just read: its charge so far, when it grew,
        goes beside the journal first (``Journal.progress``), so that a crash charges every frame relayed."""
        if self.journal is None:
            return
        so_far = self._streams.get(reservation_id)
        if so_far is None:
            return
        grown = so_far.grown()
        if grown is not None:
            entry, only_completion = grown
            self.journal.progress(entry, only_completion=only_completion)
            self._checkpointed = True

    async def checkpoint(self) -> None:
        """Write every running stream's charge so far beside the journal (nothing once none runs and
        nothing is left of earlier ones)."""
        if self.journal is None or not (self._streams or self._checkpointed):
            return
        entries = [so_far.entry() for so_far in list(self._streams.values())]
        await self.journal.checkpoint(entries)
        self._checkpointed = bool(entries)

    async def hold(self, reservation: Reservation, lease_ms: int) -> None:
        """Keep ``reservation`` for ``lease_ms`` from now with no process renewing it: its call ends
        after its answer (a background response) and is settled by whichever process sees it end."""
        self._live.pop(reservation.id, None)
        await self.store.renew([reservation], lease_ms)

    # -- the journal -----------------------------------------------------------------------------

    def journal_pending(self) -> int:
        """Settlements waiting on disk for the store."""
        return len(self.journal) if self.journal is not None else 0

    async def journal_problem(self) -> str | None:
        """Why a charge the store cannot take would have nowhere to wait (for readiness), else ``None``."""
        if self.journal is None:
            return None
        problem = await self.journal.check()
        if problem is not None and self.journal.unwritten:
            return f"{problem}; {self.journal.unwritten} charge(s) are kept in memory only"
        return problem

    def journal_growing(self) -> bool:
        """Settlements wait and the store did not take them at the last try (for readiness)."""
        return self.journal is not None and len(self.journal) > 0 and self.journal.stalled

    async def drain(self) -> int:
        """Write what waits in the journal; returns how many settlements were written."""
        if self.journal is None:
            return 0
        return await self.journal.drain(self._apply)

    async def _apply(self, entry: Entry) -> None:
        # markers: only the process owning the id's epoch raises its mark (an adopter never does)
        seqs = self.seqs if self.seqs is not None and self.seqs.owns(entry.reservation.id) is not None else None
        if self._epoch_pid != os.getpid():
            seqs = None  # a forked child settling its parent's id is an adopter
        floor = seqs.floor(time.monotonic(), entry.reservation.id) if seqs is not None else 0
        settlement = await self.store.settle(entry.reservation, entry.charge, entry.record,
                                             self.alert_args(entry.reservation.tenant),
                                             self.config.store.job_retention_days * 86400, floor=floor)
        if seqs is not None:
            seqs.release(entry.reservation.id)
        if self._keeps_recent:
            self._recent.append((time.monotonic(), entry))
        if settlement.applied:
            # Once per charge: a replayed settlement is not applied again, so it is not counted again.
            await count_velocity(self.store, self.config, entry.reservation.tenant, entry.charge, self.on_velocity)
        else:
            log.warning("settlement of reservation %s (tenant=%s, %d micro-USD) ignored: it had already settled",
                        entry.reservation.id, entry.reservation.tenant, entry.charge)
            if self.on_duplicate is not None:
                self.on_duplicate()

    async def _keep(self, entry: Entry) -> None:
        if self.journal is None:
            log.error("budget store unavailable: charge of %d micro-USD for tenant=%s lost (no journal)",
                      entry.charge, entry.reservation.tenant)
            if self.seqs is not None:
                self.seqs.release(entry.reservation.id)  # nothing will settle it
            return
        if not await self.journal.append(entry):  # a full or read-only disk: kept in memory, retried
            log.error("journal unwritable (%s): charge of %d micro-USD for tenant=%s (reservation %s) kept in "
                      "memory until the store or the journal takes it", self.journal.problem, entry.charge,
                      entry.reservation.tenant, entry.reservation.id)

    # -- background work -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Replay the journal (this process's and those of dead ones), then keep draining it and
        renewing leases until the block ends; a last drain is attempted on the way out."""
        if self.journal is not None:
            if await self.journal.check() is not None:
                log.error("journal: %s: a charge the store cannot take would have nowhere to wait; /readyz "
                          "answers 503 until the journal can be written", self.journal.problem)
            await self.journal.adopt_orphans()
            await self.drain()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._background)
                group.start_soon(self._checkpoints)
                try:
                    yield
                finally:
                    group.cancel_scope.cancel()
        finally:
            if self.journal is not None:
                with anyio.move_on_after(SHUTDOWN_DRAIN_S, shield=True):
                    await self.drain()
                    await self.checkpoint()  # streams still running keep theirs for the next start
                self.journal.close()

    async def _background(self) -> None:
        renew_every_s = self.config.store.lease_s / 3
        next_renewal = next_adoption = time.monotonic()
        while True:
            await anyio.sleep(min(DRAIN_INTERVAL_S, renew_every_s))
            now = time.monotonic()
            try:
                if self.journal is not None:
                    await self.journal.check()
                await self.follow_primary()
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

    async def follow_primary(self) -> int:
        """Behind Sentinel: when the primary changed since the last look, write every settlement of the
        replay window again (now, and once more ``REPLAY_AGAIN_AFTER_S`` later); returns how many were
        replayed. A replay the store cannot take waits in the journal like any settlement."""
        if not self._keeps_recent:
            return 0
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.config.store.replay_window_s:
            self._recent.popleft()
        primary = await self.store.primary()
        changed = primary is not None and self._primary is not None and primary != self._primary
        if primary is not None:
            if changed:
                log.warning("store: the primary moved from %s to %s; writing the %d settlement(s) of the last "
                            "%.0f s again (those it already has are ignored)", self._primary, primary,
                            len(self._recent), self.config.store.replay_window_s)
                self._replay_again_at = now + REPLAY_AGAIN_AFTER_S
            self._primary = primary
        if not changed:
            if self._replay_again_at is None or now < self._replay_again_at:
                return 0
            self._replay_again_at = None
        replayed = list(self._recent)
        self._recent.clear()  # each replay that the store takes comes back into the window
        for _, entry in replayed:
            try:
                await self._apply(entry)
            except StoreUnavailable:
                await self._keep(entry)
        return len(replayed)

    async def _checkpoints(self) -> None:
        while True:
            await anyio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                await self.checkpoint()
            except Exception:  # like _background: logged, never fatal
                log.exception("ledger checkpoint task: unexpected error (continuing)")

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


def _nowhere_to_charge() -> GuardError:
    return GuardError(
        ErrorKind.STORE_UNAVAILABLE,
        "The budget store is unavailable and the proxy's journal cannot be written, so no spend can be "
        "admitted. Try again shortly.",
        headers={"retry-after": "1"},
    )
