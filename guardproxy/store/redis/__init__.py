"""The budget store: spend counters and reservations in Redis (contract §7).

Admission and settlement are each one Lua script, so any number of proxy processes sharing one
Redis never overspend nor pass a per-minute rate limit; settlement applies at most once per
reservation id (a settled-marker the scripts check), so a retried or replayed settle never charges
twice. A reservation holds a lease that the process running the call renews (``renew``); one whose
process died frees within a lease. Without a Redis URL the store is one SQLite file (``store/sqlite.py``:
the same keys and commands, the scripts transcribed and checked against the Lua), shared by every
process that opens it. Every key of a tenant carries ``{tenant}`` as hash tag, so the scripts work on
Redis Cluster. ``protocol.Store`` is what the rest of guardproxy may ask of a store. Redis errors become
``StoreUnavailable`` in exactly one place, ``base.translated`` (its table is ``store_client.unavailable``).
``store_client`` builds the client for plain Redis, Sentinel or Cluster.

The scripts also queue alert events (a stream per tenant plus a zset of their next delivery time,
``observe/alerts.py`` delivers them) when they decide one: the first refusal or downgrade of a period, and
a settlement that takes spend to a threshold, each once per period.

``BudgetStore`` is assembled here from one class per concern, each in its own module over
``base.StoreBase`` (the client, the key names, the scripts, replicated writes):

- ``server``: closing, ``/readyz``'s probes, Sentinel's primary;
- ``reservations``: admit, settle, renew, and the day a reservation is booked on;
- ``tenants``: the tenant index, overrides, spend snapshots;
- ``call_log``: the settled calls' log; ``alerts``: the alert events' queue;
- ``api_keys``: runtime API keys; ``jobs``: jobs' counters; ``brakes``: the fleet brakes' counters;
- ``caches``: the response cache and the shared cache; ``semantic``: the semantic cache's entries;
- ``upstream_objects``: objects created upstream and calls settled when they end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import Periods
from guardproxy.config.settings import StoreConfig
from guardproxy.store import client as store_client
from guardproxy.store.redis.alerts import AlertQueue
from guardproxy.store.redis.api_keys import ApiKeys
from guardproxy.store.redis.base import translated
from guardproxy.store.redis.brakes import Brakes
from guardproxy.store.redis.caches import Caches
from guardproxy.store.redis.call_log import CallLog
from guardproxy.store.redis.jobs import Jobs
from guardproxy.store.redis.reservations import Reservations
from guardproxy.store.redis.semantic import SemanticEntries
from guardproxy.store.redis.server import Server
from guardproxy.store.redis.tenants import Tenants
from guardproxy.store.redis.upstream_objects import UpstreamObjects
from guardproxy.store.sqlite import SqliteClient

#: A worst case no budget fits (exact in Lua's numbers): ``sweep``'s admission never reserves.
NEVER_FITS = 2**52


class BudgetStore(Server, Reservations, Tenants, CallLog, AlertQueue, ApiKeys, Jobs, Brakes, Caches, UpstreamObjects,
                  SemanticEntries):
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
