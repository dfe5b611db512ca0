"""The budget store: spend counters and reservations in Redis (contract §7).

Admission and settlement are each one Lua script, so any number of proxy processes sharing one
Redis never overspend. Without ``store.redis_url`` the same scripts run on an embedded in-process
fakeredis. Every key of a tenant carries ``{tenant}`` as hash tag, so the scripts work on Redis
Cluster. Redis errors become ``StoreUnavailable`` in exactly one place, ``BudgetStore._call``, which
also bounds every call by one deadline.
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
    """Worst-case money held for one call until it settles (or its ttl passes)."""

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

    @property
    def budget(self) -> str:
        return f"{self.base}:budget"

    @property
    def calls(self) -> str:
        return f"{self.base}:calls"


def _script_source(name: str) -> str:
    return resources.files("guardproxy").joinpath("lua", name).read_text(encoding="utf-8")


class BudgetStore:
    """Spend, reservations, overrides and a small shared cache, for every tenant."""

    def __init__(
        self, client: aioredis.Redis, prefix: str = "gp", *, embedded: bool = False, calls_kept: int = 1000
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.embedded = embedded
        self.calls_kept = calls_kept
        self._admit = client.register_script(_script_source("admit.v1.lua"))
        self._settle = client.register_script(_script_source("settle.v1.lua"))
        # At most this many calls in flight; the others wait their turn (within their deadline).
        self._slots = asyncio.Semaphore(REDIS_POOL_SIZE)

    @classmethod
    def from_config(cls, config: StoreConfig) -> BudgetStore:
        if config.embedded:
            import fakeredis

            return cls(fakeredis.FakeAsyncRedis(), config.key_prefix, embedded=True, calls_kept=config.call_log_size)
        # A plain pool and no per-socket timeouts: the deadline and the bound on calls in flight are
        # ``_call``'s, once per call, which costs the event loop far less than a blocking pool's
        # Condition and a timer per socket read and write (bench/README.md: redis-py client).
        pool = aioredis.ConnectionPool.from_url(
            config.redis_url, max_connections=REDIS_POOL_SIZE, socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        return cls(aioredis.Redis(connection_pool=pool), config.key_prefix, calls_kept=config.call_log_size)

    def keys(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant)

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One store call: a slot among ``REDIS_POOL_SIZE`` in flight, and ``REDIS_TIMEOUT_S`` for the whole
        of it (waiting for the slot included); Redis errors and the deadline become ``StoreUnavailable``.

        A command cut by the deadline has its connection closed by redis-py, so no late reply is ever
        read as the answer to another command.
        """
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S), self._slots:
                yield
        except _UNAVAILABLE as exc:  # TimeoutError, the deadline's, is an OSError
            raise StoreUnavailable(f"budget store unavailable: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        async with self._call():
            await self.client.ping()

    async def admit(
        self, tenant: str, periods: Periods, limits: Thresholds, worst_cases: Sequence[Micros],
        reservation_id: str, reservation_ttl_ms: int,
    ) -> Admission:
        """Decide which candidate to send and reserve its worst case, in one round trip."""
        k = self.keys(tenant)
        keys = [k.spend_day(periods.day), k.spend_month(periods.month), k.reservations,
                k.reservation_amounts, k.reserved, k.budget]
        args: list[str | int] = [
            reservation_id, reservation_ttl_ms,
            limits.soft_day, limits.hard_day, limits.soft_month, limits.hard_month, *worst_cases,
        ]
        async with self._call():
            result: list[Any] = await self._admit(keys=keys, args=args)
        index, used_day, used_month, exhausted = (int(v) for v in result[:4])
        effective = Thresholds(*(int(v) for v in result[4:8]))
        decision = Decision(
            index=index if index >= 0 else None, used_day=used_day, used_month=used_month,
            exhausted={1: "day", 2: "month"}.get(exhausted),
        )
        reservation = None
        if decision.index is not None:
            reservation = Reservation(reservation_id, tenant, periods.day, periods.month,
                                      worst_cases[decision.index])
        return Admission(decision, effective, reservation)

    async def settle(
        self, reservation: Reservation, charge: Micros, record: Mapping[str, str | int] | None = None
    ) -> None:
        """Release ``reservation``, add ``charge`` to its day and month and log ``record``: one round trip."""
        k = self.keys(reservation.tenant)
        keys = [k.spend_day(reservation.day), k.spend_month(reservation.month), k.reservations,
                k.reservation_amounts, k.reserved, k.calls]
        args: list[str | int] = [reservation.id, max(0, charge), DAY_KEY_TTL_S, MONTH_KEY_TTL_S,
                                 self.calls_kept if record else 0]
        for field, value in (record or {}).items():
            args += [field, value]
        async with self._call():
            await self._settle(keys=keys, args=args)

    async def register_tenant(self, tenant: str) -> None:
        """Remember a tenant (also one only seen through a service key) for metrics and the admin API."""
        async with self._call():
            await self.client.sadd(f"{self.prefix}:tenants", tenant)

    async def known_tenants(self) -> set[str]:
        async with self._call():
            members = await self.client.smembers(f"{self.prefix}:tenants")
        return {_text(m) for m in members}

    async def recent_calls(self, tenant: str, limit: int) -> list[dict[str, str]]:
        """The tenant's last ``limit`` settled calls, newest first, each with its ``time_ms``."""
        async with self._call():
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
        async with self._call():
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
        async with self._call():
            await self.client.hset(self.keys(tenant).budget, mapping=fields)  # type: ignore[arg-type]

    async def clear_override(self, tenant: str) -> None:
        async with self._call():
            await self.client.delete(self.keys(tenant).budget)

    async def cache_get(self, key: str) -> str | None:
        """Shared (cross-replica) cache, e.g. ServiceTitan job -> tenant."""
        async with self._call():
            value = await self.client.get(f"{self.prefix}:cache:{key}")
        return None if value is None else _text(value)

    async def cache_set(self, key: str, value: str, ttl_s: int) -> None:
        async with self._call():
            await self.client.set(f"{self.prefix}:cache:{key}", value, ex=max(1, ttl_s))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
