"""The budget store: spend counters and reservations in Redis (contract §7).

Admission and settlement are each one Lua script, so any number of proxy processes sharing one
Redis never overspend nor pass a per-minute rate limit; settlement applies at most once per
reservation id (a settled-marker the scripts check), so a retried or replayed settle never charges
twice. A reservation holds a lease that the process running the call renews (``renew``); one whose
process died frees within a lease. Without a Redis URL the store is one SQLite file (``sqlite.py``:
the same keys and commands, the scripts transcribed and checked against the Lua), shared by every
process that opens it. Every key of a tenant carries ``{tenant}`` as hash tag, so the scripts work on
Redis Cluster. ``protocol.Store`` is what the rest of guardproxy may ask of a store. Redis errors become
``StoreUnavailable`` in exactly one place, ``translated`` (its table is ``store_client.unavailable``).
``store_client`` builds the client for plain Redis, Sentinel or Cluster.

The scripts also queue alert events (a stream per tenant plus a zset of their next delivery time,
``alerts.py`` delivers them) when they decide one: the first refusal or downgrade of a period, and
a settlement that takes spend to a threshold, each once per period.
"""

from __future__ import annotations

import time
from collections.abc import Container, Sequence

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import Periods
from guardproxy.config.settings import StoreConfig
from guardproxy.store import client as store_client
from guardproxy.store.redis.alerts import AlertQueue
from guardproxy.store.redis.api_keys import ApiKeys
from guardproxy.store.redis.base import (
    text,
    translated,
)
from guardproxy.store.redis.brakes import Brakes
from guardproxy.store.redis.caches import Caches
from guardproxy.store.redis.call_log import CallLog
from guardproxy.store.redis.jobs import Jobs
from guardproxy.store.redis.reservations import Reservations
from guardproxy.store.redis.server import Server
from guardproxy.store.redis.tenants import Tenants
from guardproxy.store.redis.upstream_objects import UpstreamObjects
from guardproxy.store.sqlite import SqliteClient
from guardproxy.types import Micros

#: A worst case no budget fits (exact in Lua's numbers): ``sweep``'s admission never reserves.
NEVER_FITS = 2**52


class BudgetStore(Server, Reservations, Tenants, CallLog, AlertQueue, ApiKeys, Jobs, Brakes, Caches, UpstreamObjects):
    """Spend, reservations, overrides and a small shared cache, for every tenant."""

    @classmethod
    def from_config(cls, config: StoreConfig) -> BudgetStore:
        if config.embedded:
            sqlite = SqliteClient(config.sqlite_path(), synchronous=config.synchronous)
            return cls(sqlite, config.key_prefix, calls_kept=config.call_log_size, hash_tag=config.hash_tag)
        connection = store_client.connect(config.redis_url)
        return cls(connection.client, config.key_prefix, calls_kept=config.call_log_size, connection=connection,
                   min_replica_acks=config.min_replica_acks, replica_ack_timeout_ms=config.replica_ack_timeout_ms,
                   hash_tag=config.hash_tag)

    async def sweep(self, tenants: Sequence[tuple[str, Periods]], idle: set[str], alerts_kept_ms: int) -> int:
        """Free the expired reservations of the ``idle`` ones of ``tenants`` (an active tenant's admissions
        do it) and trim every one's alert records older than ``alerts_kept_ms``; returns how many idle
        tenants held reservations.

        The release is admit.v4's own sweep, run by an admission that cannot fit (a worst case of
        ``NEVER_FITS``) marked provisional, so it records nothing: no reservation, no blocked flag, no
        alert; it also drops ``{t}:reserved`` once no reservation is left."""
        pipe = self.client.pipeline(transaction=False)
        for tenant, _ in tenants:
            pipe.exists(self.keys(tenant).reservations)
            pipe.exists(self.keys(tenant).alerts_delivery)
        async with translated():
            held = await pipe.execute()
        swept = 0
        now_ms = int(time.time() * 1000)
        for i, (tenant, periods) in enumerate(tenants):
            if held[2 * i] and tenant in idle:
                swept += 1
                await self.admit(tenant, periods, Thresholds(0, 0, 0, 0), [NEVER_FITS], "sweep", 0, provisional=True)
            if held[2 * i + 1]:
                await self._trim_alerts(tenant, now_ms - alerts_kept_ms)
        return swept

    # -- the semantic cache (values from ``http/semantic.py``; one MULTI per write, no script) --------

    async def semantic_version(self, tenant: str) -> int:
        """The counter of changes to ``tenant``'s semantic entries (0: none yet)."""
        async with translated():
            value = await self.client.get(self.keys(tenant).semantic_version)
        return int(value or 0)

    async def semantic_entries(
        self, tenant: str, since_ms: int, known: Container[str]
    ) -> tuple[int, dict[str, bytes | None]]:
        """The version, and the index values of the entries created at or after ``since_ms`` that are
        not in ``known`` (``None``: dropped meanwhile): one round trip, plus one when there are new ones."""
        k = self.keys(tenant)
        async with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(k.semantic_version)
                pipe.zrangebyscore(k.semantic_ids, since_ms, "+inf")
                version, ids = await pipe.execute()
            new = sorted({text(i) for i in ids if text(i) not in known})
            values = await self.client.hmget(k.semantic_index, new) if new else []
        raw = [None if v is None else v if isinstance(v, bytes) else v.encode() for v in values]
        return int(version or 0), dict(zip(new, raw, strict=True))

    async def add_semantic_entry(
        self, tenant: str, entry_id: str, index_value: bytes, answer: bytes, *, created_ms: int, ttl_s: int,
        max_entries: int,
    ) -> int:
        """Add one entry and drop the expired ones and the oldest beyond ``max_entries``; the version
        after the addition (the drop raises it once more when it drops anything)."""
        k = self.keys(tenant)
        ttl_ms = ttl_s * 1000
        async with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(k.semantic_index, entry_id, index_value)
                pipe.set(k.semantic_answer(entry_id), answer, px=ttl_ms)
                pipe.zadd(k.semantic_ids, {entry_id: created_ms})
                pipe.incr(k.semantic_version)
                for key in (k.semantic_index, k.semantic_ids, k.semantic_version):
                    pipe.pexpire(key, ttl_ms)
                pipe.zrangebyscore(k.semantic_ids, "-inf", f"({created_ms - ttl_ms}")
                pipe.zrange(k.semantic_ids, 0, -(max_entries + 1))
                replies = await pipe.execute()
            version = int(replies[3])
            stale = {text(i) for i in (*replies[-2], *replies[-1])}
            if stale:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.hdel(k.semantic_index, *stale)
                    pipe.zrem(k.semantic_ids, *stale)
                    pipe.delete(*(k.semantic_answer(i) for i in stale))
                    pipe.incr(k.semantic_version)
                    await pipe.execute()
        return version

    async def semantic_answer(self, tenant: str, entry_id: str) -> bytes | None:
        """One entry's answer, if it has not expired."""
        async with translated():
            value = await self.client.get(self.keys(tenant).semantic_answer(entry_id))
        return None if value is None else (value if isinstance(value, bytes) else value.encode())

    async def count_semantic_hit(self, tenant: str, saved_micros: Micros) -> None:
        k = self.keys(tenant)
        async with translated(), self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(k.semantic_stats, "hits", 1)
            pipe.hincrby(k.semantic_stats, "saved_micros", saved_micros)
            await pipe.execute()

    async def semantic_stats(self, tenants: Sequence[str]) -> dict[str, tuple[int, Micros]]:
        """Each tenant's semantic hits and the micro-USD they saved, since the store began (one round trip)."""
        async with translated():
            pipe = self.client.pipeline(transaction=False)
            for tenant in tenants:
                pipe.hmget(self.keys(tenant).semantic_stats, ["hits", "saved_micros"])
            replies = await pipe.execute() if tenants else []
        return {t: (int(hits or 0), int(saved or 0)) for t, (hits, saved) in zip(tenants, replies, strict=True)}
