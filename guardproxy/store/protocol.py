"""What guardproxy asks of a budget store, as one typed protocol (arguments by name, replies as records).

``redis.BudgetStore`` implements it on both engines: on Redis (plain, Sentinel, Cluster) through the Lua
scripts, on one SQLite file through their transcriptions (``sqlite.py``). The modules that keep the
books (``ledger``, ``alerts``, ``state``, ``keys``, ``status``) take a ``Store``, never a client: nothing
outside ``redis/``, ``sqlite.py`` and ``copy.py`` speaks Redis commands. The replies are ``records``' values.

A new store capability is a method here and on ``BudgetStore`` (in the module of its concern in ``redis/``;
keys named by ``layout.Keys``, under the tenant's ``{tenant}`` hash tag), and a contract test in
``tests/contract`` runs it on every backend.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from typing import Protocol, runtime_checkable

from guardproxy.budget.decision import RateLimits, Thresholds
from guardproxy.budget.levels import NO_LEVELS, LevelArgs, LevelCap
from guardproxy.budget.periods import Periods
from guardproxy.budget.records import (
    NO_JOB,
    NO_RATE_LIMITS,
    Admission,
    AlertArgs,
    AlertRecord,
    CallCosts,
    JobArgs,
    JobUsage,
    KeyListing,
    LoggedCall,
    LoopCount,
    QueuedAlert,
    Reservation,
    Settlement,
    Snapshot,
    VelocityCount,
)
from guardproxy.types import Micros


@runtime_checkable
class Store(Protocol):
    """A budget store: spend, reservations, overrides, keys, logs and caches of every tenant."""

    #: Settled calls kept per tenant in the call log.
    calls_kept: int

    #: The SQLite store (one file on this machine) rather than Redis.
    @property
    def embedded(self) -> bool: ...

    #: Behind Sentinel: the primary may change (``primary`` names it), so acknowledged settlements are
    #: kept for a replay after a failover.
    @property
    def follows_failovers(self) -> bool: ...

    async def primary(self) -> str | None: ...

    async def aclose(self) -> None: ...

    async def ping(self) -> None: ...

    async def check_writable(self) -> None: ...

    # -- admission and settlement (each one atomic step: a script, or one transaction) ----------------

    async def admit(
        self, tenant: str, periods: Periods, limits: Thresholds, worst_cases: Sequence[Micros],
        reservation_id: str, lease_ms: int, *, rate: RateLimits = NO_RATE_LIMITS, call_tokens: int = 0,
        alerts: AlertArgs | None = None, job: JobArgs = NO_JOB, provisional: bool = False,
        levels: LevelArgs = NO_LEVELS,
    ) -> Admission: ...

    async def settle(
        self, reservation: Reservation, charge: Micros, record: Mapping[str, str | int] | None = None,
        alerts: AlertArgs | None = None, job_ttl_s: int = NO_JOB.ttl_s, floor: int = 0,
    ) -> Settlement: ...

    async def new_epoch(self) -> int: ...

    async def renew(self, reservations: Sequence[Reservation], lease_ms: int) -> set[str]: ...

    # -- external spend ------------------------------------------------------------------------------

    async def booking_day(self, tenant: str, reservation_id: str, day: str) -> str: ...

    async def move_booking_day(self, tenant: str, reservation_id: str, day: str) -> None: ...

    async def settled_charge(self, tenant: str, day: str, reservation_id: str) -> Micros | None: ...

    # -- tenants, overrides, snapshots, the call log ---------------------------------------------------

    async def register_tenant(self, tenant: str, retention_days: int = 62, max_tenants: int = 100_000) -> None: ...

    async def recent_tenants(self, limit: int) -> list[str]: ...

    async def known_tenants(self, limit: int | None = None) -> set[str]: ...

    async def snapshots(self, tenants: Sequence[tuple[str, Periods]]) -> list[Snapshot]: ...

    async def level_usage(self, tenant: str, caps: Sequence[LevelCap]) -> list[tuple[Micros, Micros]]: ...

    async def set_override(self, tenant: str, fields: dict[str, str], periods: Periods | None = None) -> None: ...

    async def clear_override(self, tenant: str, periods: Periods | None = None) -> None: ...

    async def recent_calls(self, tenant: str, limit: int) -> list[dict[str, str]]: ...

    async def call_costs(self, tenants: Sequence[str], count: int) -> CallCosts: ...

    async def logged_calls(
        self, tenant: str, start_ms: int, end_ms: int, *, after: str | None = None, count: int = 1000,
    ) -> list[LoggedCall]: ...

    async def call_log_extent(self, tenant: str) -> tuple[int, int | None]: ...

    # -- the fleet brakes (each one atomic step, as admission is) --------------------------------------

    async def count_repeat(
        self, tenant: str, key_id: str, job: str, digest: str, request_id: str, max_repeats: int, window_ms: int,
        *, action: str = "refuse", alerts: bool = False,
    ) -> LoopCount: ...

    async def count_hourly_spend(
        self, tenant: str, charge: Micros, factor_ppm: int, baseline_hours: int, min_micros: Micros,
        *, alerts: bool = False,
    ) -> VelocityCount: ...

    # -- alert events ----------------------------------------------------------------------------------

    async def claim_alerts(self, tenants: Sequence[str], lease_ms: int, limit: int = 20) -> list[QueuedAlert]: ...

    async def record_delivery(
        self, alert: QueuedAlert, hooks: set[int], state: str, next_at_ms: int = 0, error: str = ""
    ) -> None: ...

    async def recent_alerts(self, tenants: Sequence[str], limit: int) -> list[AlertRecord]: ...

    # -- jobs ------------------------------------------------------------------------------------------

    async def job_usage(self, tenant: str, job: str) -> JobUsage | None: ...

    async def recent_jobs(self, tenant: str, limit: int) -> list[JobUsage]: ...

    async def job_spent(self, tenant: str, job: str) -> Micros: ...

    # -- runtime API keys --------------------------------------------------------------------------------

    async def key_owner(self, digest: str) -> str | None: ...

    async def add_key(self, tenant: str, key_id: str, digest: str, owner: str, meta: str) -> None: ...

    async def listed_keys(self, tenant: str) -> KeyListing: ...

    async def remove_key(self, tenant: str, key_id: str, digest: str) -> None: ...

    async def touch_key(self, tenant: str, key_id: str, at_ms: int) -> None: ...

    # -- caches (responses; shared lookups such as ServiceTitan's) -----------------------------------------

    async def cached_response(self, tenant: str, digest: str) -> bytes | None: ...

    async def cache_response(
        self, tenant: str, digest: str, value: bytes, ttl_s: int, *, max_tenant_bytes: int = 16 << 20,
        max_total_bytes: int = 256 << 20,
    ) -> bool: ...

    # -- objects created through the proxy, and calls settled when they end (batches, background) ----

    async def record_objects(
        self, tenant: str, object_ids: Sequence[str], upstream: str, ttl_s: int | None
    ) -> None: ...

    async def object_upstreams(self, tenant: str, object_ids: Sequence[str]) -> list[str | None]: ...

    async def forget_object(self, tenant: str, object_id: str) -> None: ...

    async def open_deferred(self, tenant: str, object_id: str, fields: Mapping[str, str | int]) -> None: ...

    async def deferred_record(self, tenant: str, object_id: str) -> dict[str, str] | None: ...

    async def open_deferred_ids(self, tenant: str) -> list[str]: ...

    async def close_deferred(
        self, tenant: str, object_id: str, fields: Mapping[str, str | int], keep_s: int
    ) -> None: ...

    # -- the semantic cache ----------------------------------------------------------------------

    async def semantic_version(self, tenant: str) -> int: ...

    async def semantic_entries(
        self, tenant: str, since_ms: int, known: Container[str]
    ) -> tuple[int, dict[str, bytes | None]]: ...

    async def add_semantic_entry(
        self, tenant: str, entry_id: str, index_value: bytes, answer: bytes, *, created_ms: int, ttl_s: int,
        max_entries: int,
    ) -> int: ...

    async def semantic_answer(self, tenant: str, entry_id: str) -> bytes | None: ...

    async def count_semantic_hit(self, tenant: str, saved_micros: Micros) -> None: ...

    async def semantic_stats(self, tenants: Sequence[str]) -> dict[str, tuple[int, Micros]]: ...

    async def cache_get(self, key: str) -> str | None: ...

    async def cache_set(self, key: str, value: str, ttl_s: int) -> None: ...
