"""The budget store: spend counters and reservations in Redis (contract §7).

Admission and settlement are each one Lua script, so any number of proxy processes sharing one
Redis never overspend; settlement applies at most once per reservation id (a settled-marker the
scripts check), so a retried or replayed settle never charges twice. A reservation holds a lease
that the process running the call renews (``renew``); one whose process died frees within a lease.
Without ``store.redis_url`` the same scripts run on an embedded in-process fakeredis. Every key of
a tenant carries ``{tenant}`` as hash tag, so the scripts work on Redis Cluster.
Redis errors become ``StoreUnavailable`` in exactly one place, ``_translated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from guardproxy.budget import Decision, Thresholds
from guardproxy.config import StoreConfig
from guardproxy.errors import StoreUnavailable
from guardproxy.periods import Periods
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.store")

DAY_KEY_TTL_S = 40 * 86400
MONTH_KEY_TTL_S = 400 * 86400
REDIS_POOL_SIZE = 256
REDIS_TIMEOUT_S = 2.0
_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,
    OSError,
)


@dataclass(frozen=True)
class Reservation:
    """Worst-case money held for one call until it settles (or its lease runs out unrenewed)."""

    id: str
    tenant: str
    day: str
    month: str
    amount: Micros


@dataclass(frozen=True)
class Admission:
    decision: Decision
    limits: Thresholds
    reservation: Reservation | None
    #: The id had been settled or released before this admit ran: nothing was reserved.
    already_settled: bool = False
    #: Not asked of the store at all (it was unavailable and ``fail_open`` served the call).
    unbudgeted: bool = False


@dataclass(frozen=True)
class Settlement:
    """What one settle did: ``applied`` is false when the id had already settled (a retry or replay
    that changed nothing); ``released`` is false when its reservation was no longer held."""

    applied: bool
    released: bool


@dataclass(frozen=True)
class PeriodSpend:
    spent: Micros
    reserved: Micros


@dataclass(frozen=True)
class Snapshot:
    """What the store holds for one tenant now."""

    day: PeriodSpend
    month: PeriodSpend
    override: dict[str, str]


class Keys:
    """Key names of one tenant; ``{tenant}`` is the Redis Cluster hash tag."""

    def __init__(self, prefix: str, tenant: str) -> None:
        self.base = f"{prefix}:{{{tenant}}}"

    def spend_day(self, day: str) -> str:
        return f"{self.base}:spend:day:{day}"

    def spend_month(self, month: str) -> str:
        return f"{self.base}:spend:month:{month}"

    @property
    def reservations(self) -> str:
        return f"{self.base}:resv"

    @property
    def reservation_amounts(self) -> str:
        return f"{self.base}:resv:amount"

    @property
    def reserved(self) -> str:
        return f"{self.base}:reserved"

    def settled(self, day: str) -> str:
        """Ids settled or released for reservations admitted on ``day`` (id -> charge micros)."""
        return f"{self.base}:settled:{day}"

    @property
    def budget(self) -> str:
        return f"{self.base}:budget"

    @property
    def calls(self) -> str:
        return f"{self.base}:calls"


def _script_source(name: str) -> str:
    return resources.files("guardproxy").joinpath("lua", name).read_text(encoding="utf-8")


@contextlib.asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"budget store unavailable: {type(exc).__name__}") from exc


def reply_lost(error: StoreUnavailable) -> bool:
    """The command may have run after all: the store failed while its reply was awaited (a timeout),
    not before the command was sent."""
    return isinstance(error.__cause__, (redis_errors.TimeoutError, TimeoutError))


class BudgetStore:
    """Spend, reservations, overrides and a small shared cache, for every tenant."""

    def __init__(
        self, client: aioredis.Redis, prefix: str = "gp", *, embedded: bool = False, calls_kept: int = 1000
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.embedded = embedded
        self.calls_kept = calls_kept
        self._admit = client.register_script(_script_source("admit.v2.lua"))
        self._settle = client.register_script(_script_source("settle.v2.lua"))
        self._renew = client.register_script(_script_source("renew.v1.lua"))

    @classmethod
    def from_config(cls, config: StoreConfig) -> BudgetStore:
        if config.embedded:
            import fakeredis

            return cls(fakeredis.FakeAsyncRedis(), config.key_prefix, embedded=True, calls_kept=config.call_log_size)
        # A blocking pool: a burst beyond the pool waits briefly for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30,
        )
        return cls(aioredis.Redis(connection_pool=pool), config.key_prefix, calls_kept=config.call_log_size)

    def keys(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant)

    async def aclose(self) -> None:
        await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        async with _translated():
            await self.client.ping()

    async def admit(
        self, tenant: str, periods: Periods, limits: Thresholds, worst_cases: Sequence[Micros],
        reservation_id: str, lease_ms: int,
    ) -> Admission:
        """Decide which candidate to send and reserve its worst case for ``lease_ms``, in one round trip."""
        k = self.keys(tenant)
        keys = [k.spend_day(periods.day), k.spend_month(periods.month), k.reservations,
                k.reservation_amounts, k.reserved, k.budget, k.settled(periods.day)]
        args: list[str | int] = [
            reservation_id, lease_ms,
            limits.soft_day, limits.hard_day, limits.soft_month, limits.hard_month, *worst_cases,
        ]
        async with _translated():
            result: list[Any] = await self._admit(keys=keys, args=args)
        index, used_day, used_month, exhausted = (int(v) for v in result[:4])
        effective = Thresholds(*(int(v) for v in result[4:8]))
        decision = Decision(
            index=index if index >= 0 else None, used_day=used_day, used_month=used_month,
            exhausted={1: "day", 2: "month"}.get(exhausted),
        )
        already_settled = len(result) > 8 and int(result[8]) == 1
        reservation = None
        if decision.index is not None and not already_settled:
            reservation = Reservation(reservation_id, tenant, periods.day, periods.month,
                                      worst_cases[decision.index])
        return Admission(decision, effective, reservation, already_settled)

    async def settle(
        self, reservation: Reservation, charge: Micros, record: Mapping[str, str | int] | None = None
    ) -> Settlement:
        """Release ``reservation``, add ``charge`` to its day and month and log ``record``: one round
        trip, applied at most once per reservation id (a charge of 0 is a release)."""
        k = self.keys(reservation.tenant)
        keys = [k.spend_day(reservation.day), k.spend_month(reservation.month), k.reservations,
                k.reservation_amounts, k.reserved, k.calls, k.settled(reservation.day)]
        args: list[str | int] = [reservation.id, max(0, charge), DAY_KEY_TTL_S, MONTH_KEY_TTL_S,
                                 self.calls_kept if record else 0]
        for field, value in (record or {}).items():
            args += [field, value]
        async with _translated():
            result: list[Any] = await self._settle(keys=keys, args=args)
        return Settlement(applied=int(result[3]) == 1, released=int(result[2]) == 1)

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

        async with _translated():
            results = await asyncio.gather(*(renew_tenant(t, ids) for t, ids in by_tenant.items()))
        return {_text(i) for lost in results for i in lost}

    async def register_tenant(self, tenant: str) -> None:
        """Remember a tenant (also one only seen through a service key) for metrics and the admin API."""
        async with _translated():
            await self.client.sadd(f"{self.prefix}:tenants", tenant)

    async def known_tenants(self) -> set[str]:
        async with _translated():
            members = await self.client.smembers(f"{self.prefix}:tenants")
        return {_text(m) for m in members}

    async def recent_calls(self, tenant: str, limit: int) -> list[dict[str, str]]:
        """The tenant's last ``limit`` settled calls, newest first, each with its ``time_ms``."""
        async with _translated():
            entries = await self.client.xrevrange(self.keys(tenant).calls, count=limit) or []
        calls = []
        for entry_id, fields in entries:
            call = {_text(a): _text(b) for a, b in (fields or {}).items()}
            call["time_ms"] = _text(entry_id or b"0").split("-")[0]
            calls.append(call)
        return calls

    async def snapshots(self, tenants: Sequence[tuple[str, Periods]]) -> list[Snapshot]:
        """Spend, reservations and overrides of many tenants in one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        for tenant, periods in tenants:
            k = self.keys(tenant)
            pipe.get(k.spend_day(periods.day))
            pipe.get(k.spend_month(periods.month))
            pipe.get(k.reserved)
            pipe.hgetall(k.budget)
        async with _translated():
            values = await pipe.execute()
        out = []
        for i in range(0, len(values), 4):
            day, month, reserved, override = values[i : i + 4]
            held = int(reserved or 0)
            out.append(Snapshot(
                day=PeriodSpend(int(day or 0), held), month=PeriodSpend(int(month or 0), held),
                override={_text(a): _text(b) for a, b in override.items()},
            ))
        return out

    async def set_override(self, tenant: str, fields: dict[str, str]) -> None:
        async with _translated():
            await self.client.hset(self.keys(tenant).budget, mapping=fields)  # type: ignore[arg-type]

    async def clear_override(self, tenant: str) -> None:
        async with _translated():
            await self.client.delete(self.keys(tenant).budget)

    async def cache_get(self, key: str) -> str | None:
        """Shared (cross-replica) cache, e.g. ServiceTitan job -> tenant."""
        async with _translated():
            value = await self.client.get(f"{self.prefix}:cache:{key}")
        return None if value is None else _text(value)

    async def cache_set(self, key: str, value: str, ttl_s: int) -> None:
        async with _translated():
            await self.client.set(f"{self.prefix}:cache:{key}", value, ex=max(1, ttl_s))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KeyStore:
    """Tenant API keys created at runtime (``guardproxy.keys``), hashed, in the budget store's Redis.

    ``{prefix}:keys`` maps a key's sha256 digest to its owner, so an unknown key costs one HGET on
    any replica; ``{prefix}:{tenant}:keys`` holds each key's metadata by id and ``…:keys:used`` its
    last use. Every operation touches one key, so no two keys of different slots ever meet in one
    command (Redis Cluster).
    """

    def __init__(self, store: BudgetStore) -> None:
        self.client = store.client
        self.index = f"{store.prefix}:keys"
        self.store = store

    def _meta(self, tenant: str) -> str:
        return f"{self.store.keys(tenant).base}:keys"

    def _used(self, tenant: str) -> str:
        return f"{self.store.keys(tenant).base}:keys:used"

    async def owner(self, digest: str) -> str | None:
        """The index entry (JSON) of the key with this sha256 hex digest, or ``None``."""
        async with _translated():
            value = await self.client.hget(self.index, digest)
        return None if value is None else _text(value)

    async def add(self, tenant: str, key_id: str, digest: str, owner: str, meta: str) -> None:
        # Metadata first: a key is usable only once it is listed, never the other way round.
        async with _translated():
            await self.client.hset(self._meta(tenant), key_id, meta)
            await self.client.hset(self.index, digest, owner)

    async def listed(self, tenant: str) -> tuple[dict[str, str], dict[str, str]]:
        """The tenant's keys' metadata (JSON by key id) and their last use (epoch ms by key id)."""
        async with _translated():
            meta = await self.client.hgetall(self._meta(tenant))
            used = await self.client.hgetall(self._used(tenant))
        return ({_text(a): _text(b) for a, b in meta.items()}, {_text(a): _text(b) for a, b in used.items()})

    async def remove(self, tenant: str, key_id: str, digest: str) -> None:
        # Index first: the key stops working before its listing goes.
        async with _translated():
            await self.client.hdel(self.index, digest)
            await self.client.hdel(self._meta(tenant), key_id)
            await self.client.hdel(self._used(tenant), key_id)

    async def touch(self, tenant: str, key_id: str, at_ms: int) -> None:
        async with _translated():
            await self.client.hset(self._used(tenant), key_id, str(at_ms))
