"""The budget store: spend counters and reservations in Redis (contract §7).

Admission and settlement are each one Lua script, so any number of proxy processes sharing one
Redis never overspend; settlement applies at most once per reservation id (a settled-marker the
scripts check), so a retried or replayed settle never charges twice. A reservation holds a lease
that the process running the call renews (``renew``); one whose process died frees within a lease.
Without ``store.redis_url`` the same scripts run on an embedded in-process fakeredis. Every key of
a tenant carries ``{tenant}`` as hash tag, so the scripts work on Redis Cluster. Redis errors become
``StoreUnavailable`` in exactly one place, ``_translated`` (its table is ``store_client.unavailable``).
``store_client`` builds the client for plain Redis, Sentinel or Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from guardproxy import store_client
from guardproxy.budget import Decision, Thresholds
from guardproxy.config import StoreConfig
from guardproxy.errors import StoreUnavailable
from guardproxy.periods import Periods
from guardproxy.store_client import StoreClient, StoreConnection
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.store")

DAY_KEY_TTL_S = 40 * 86400
MONTH_KEY_TTL_S = 400 * 86400
#: How long /readyz's probe key lives (it is rewritten at every probe).
READY_PROBE_TTL_MS = 60_000


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

    def booked_on(self, reservation_id: str) -> str:
        """The day an external spend's id was first booked on (its settled-marker's day)."""
        return f"{self.base}:booked:{reservation_id}"

    @property
    def calls(self) -> str:
        return f"{self.base}:calls"


def _script_source(name: str) -> str:
    return resources.files("guardproxy").joinpath("lua", name).read_text(encoding="utf-8")


@contextlib.asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    async with store_client.translated():
        yield


def reply_lost(error: StoreUnavailable) -> bool:
    """The command may have run after all: the store failed while its reply was awaited (a timeout),
    not before the command was sent."""
    return isinstance(error.__cause__, (redis_errors.TimeoutError, TimeoutError))


class BudgetStore:
    """Spend, reservations, overrides and a small shared cache, for every tenant."""

    def __init__(
        self, client: StoreClient, prefix: str = "gp", *, embedded: bool = False, calls_kept: int = 1000,
        connection: StoreConnection | None = None, min_replica_acks: int = 0, replica_ack_timeout_ms: int = 500,
    ) -> None:
        self.client = client
        self.connection = connection
        self.min_replica_acks = min_replica_acks
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
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
        connection = store_client.connect(config.redis_url)
        return cls(connection.client, config.key_prefix, calls_kept=config.call_log_size, connection=connection,
                   min_replica_acks=config.min_replica_acks, replica_ack_timeout_ms=config.replica_ack_timeout_ms)

    def keys(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant)

    async def aclose(self) -> None:
        if self.connection is not None:
            await self.connection.aclose()
        elif isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        async with _translated():
            await self.client.ping()

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` (saying why) unless the store takes writes now, as settlements need.

        A write to a ``{readyz}`` probe key: fails on a replica (READONLY), a primary short of replicas
        (NOREPLICAS) or a cluster slot without a shard. With ``min_replica_acks`` the probe also waits for
        that many replicas, as settlements do. On a cluster, every primary must report ``cluster_state:ok``.
        """
        key = f"{self.prefix}:{{readyz}}:probe"
        async with _translated():
            if isinstance(self.client, RedisCluster):
                states = await self.client.cluster_info(target_nodes=RedisCluster.PRIMARIES)
                failing = sorted(node for node, info in _per_node(states).items()
                                 if info.get("cluster_state") != "ok")
                if failing:
                    raise StoreUnavailable(f"cluster_state is not ok on {', '.join(failing)}")
                await self.client.set(key, str(time.time()), px=READY_PROBE_TTL_MS)
                return
            await self._replicated(lambda client: client.set(key, str(time.time()), px=READY_PROBE_TTL_MS))

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
            result: list[Any] = await self._replicated(
                lambda client: client.evalsha(self._settle.sha, len(keys), *keys, *args), self._settle
            )
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

    async def booking_day(self, tenant: str, reservation_id: str, day: str) -> str:
        """The day ``reservation_id`` was first booked on; ``day`` (and remembered as long as a day's
        settled-marker lives) when it is new."""
        key = self.keys(tenant).booked_on(reservation_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, day, nx=True, ex=DAY_KEY_TTL_S)
        pipe.get(key)
        async with _translated():
            _, first = await pipe.execute()
        return day if first is None else _text(first)

    async def move_booking_day(self, tenant: str, reservation_id: str, day: str) -> None:
        """Remember ``day`` as the day ``reservation_id`` is booked on (its earlier day never settled it)."""
        async with _translated():
            await self.client.set(self.keys(tenant).booked_on(reservation_id), day, ex=DAY_KEY_TTL_S)

    async def settled_charge(self, tenant: str, day: str, reservation_id: str) -> Micros | None:
        """What ``reservation_id``, admitted or booked on ``day``, was charged when it settled; ``None``
        when it has not settled (or its marker has expired)."""
        async with _translated():
            value = await self.client.hget(self.keys(tenant).settled(day), reservation_id)
        return None if value is None else int(value)

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

    async def call_costs(self, tenants: Sequence[str], count: int) -> tuple[int, list[list[tuple[int, Micros, str]]]]:
        """The server's time (ms) and each tenant's last ``count`` logged calls, newest first, as
        ``(time_ms, cost_micros, outcome)`` (for forecasts; the log's entry ids are the server's time)."""
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.xrevrange(self.keys(tenant).calls, count=count)
        async with _translated():
            logs = await pipe.execute()
            # Not pipelined: Redis Cluster pipelines take only commands with keys.
            seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000, [
            [(int(_text(entry_id).split("-")[0]), int((fields or {}).get(b"cost_micros", b"0")),
              _text((fields or {}).get(b"outcome", b""))) for entry_id, fields in log or []]
            for log in logs
        ]

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


    async def _replicated(self, write: Callable[[Any], Any], script: AsyncScript | None = None) -> Any:
        """Run ``write`` and, with ``min_replica_acks``, ``WAIT`` for replicas in the same round trip.

        Too few acknowledgements raise ``StoreUnavailable``: after a failover a write only the old primary
        took is lost, so it must not count as written. ``script`` is loaded and the write run again when
        the server does not know it (a new primary). Errors leave unwrapped, for ``_translated``.
        """
        try:
            return await self._replicated_once(write)
        except redis_errors.NoScriptError:
            if script is None:
                raise
            await self.client.script_load(script.script)
            return await self._replicated_once(write)

    async def _replicated_once(self, write: Callable[[Any], Any]) -> Any:
        if not self.min_replica_acks:
            return await write(self.client)
        async with self.client.pipeline(transaction=False) as pipe:
            write(pipe)
            pipe.wait(self.min_replica_acks, self.replica_ack_timeout_ms)
            result, acked = await pipe.execute()
        if int(acked) < self.min_replica_acks:
            if self.connection is not None:
                await self.connection.rediscover()
            raise StoreUnavailable(f"budget store unavailable: {acked} of {self.min_replica_acks} replicas "
                                   f"confirmed the write within {self.replica_ack_timeout_ms} ms")
        return result


def _per_node(states: Any) -> dict[str, dict[str, Any]]:
    """``CLUSTER INFO`` answers keyed by node (one node's answer comes back unkeyed)."""
    if isinstance(states, dict) and "cluster_state" in states:
        return {"node": states}
    return {str(node): info for node, info in dict(states).items()}


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
