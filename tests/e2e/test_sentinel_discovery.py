"""Behind Sentinel, connections opened together share one discovery of the primary, and still follow a failover.

redis-py asks the Sentinels for the primary each time it opens a connection; guardproxy's pool
(``guardproxy/store/client.py``, ``_SentinelPool``) makes the connections opened together wait for one
discovery. Real processes: the session's primary, replica and three ``redis-sentinel`` (tests/redis_procs.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import redis

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.store.client import TIMEOUT_S, connect
from guardproxy.store.redis import BudgetStore
from tests.helpers import keys
from tests.redis_procs import RedisProc, SentinelSet, wait_for

BURST = 100
LIMITS = Thresholds(10**9, 10**9, 10**9, 10**9)
#: A discovery asks each of the three Sentinels once, on one connection to each; a burst may take a
#: few (e.g. one under way when the answer is set aside), never one per connection. The commands also
#: count the Sentinels' PING and PUBLISH to one another (a few a second each).
MOST_SENTINEL_COMMANDS = 30
MOST_SENTINEL_CONNECTIONS = 6
#: The failover tests keep the shared answer for longer than they take, so that only what should drop it
#: (a fresh look, a failed connection) can, not the clock.
KEEP_ANSWER_S = 600.0


@dataclass(frozen=True)
class SentinelLoad:
    """What the three Sentinels have served, summed: commands (their ``cmdstat_sentinel`` calls where
    ``INFO commandstats`` has them; a Sentinel of Redis 7.0 answers that section empty, so then every
    command, ``total_commands_processed``) and connections accepted."""

    commands: int
    connections: int

    def __sub__(self, other: SentinelLoad) -> SentinelLoad:
        return SentinelLoad(self.commands - other.commands, self.connections - other.connections)


def sentinel_load(topology: SentinelSet) -> SentinelLoad:
    commands = connections = 0
    for proc in topology.sentinels:
        with proc.client() as c:
            stats = c.info("commandstats")
            sentinel_calls = [int(v["calls"]) for k, v in stats.items() if k.split("|")[0] == "cmdstat_sentinel"]
            totals = c.info("stats")
            commands += sum(sentinel_calls) if sentinel_calls else int(totals["total_commands_processed"])
            connections += int(totals["total_connections_received"])
    return SentinelLoad(commands, connections)


class SentinelMeter:
    """The Sentinels' load from ``start()`` to ``stop()``, less the counting's own (measured by counting
    twice with nothing in between)."""

    def __init__(self, topology: SentinelSet) -> None:
        self.topology = topology
        first = sentinel_load(topology)
        self.own = sentinel_load(topology) - first
        self.started = first

    def start(self) -> None:
        self.started = sentinel_load(self.topology)

    def stop(self) -> SentinelLoad:
        return sentinel_load(self.topology) - self.started - self.own


def counter(port: int, section: str, field: str) -> int:
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as c:
        return int(c.info(section)[field])


def scripts_run(port: int) -> int:
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as c:
        stats = c.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


async def admit_burst(store: BudgetStore, tag: str, count: int = BURST) -> list[float]:
    """``count`` admissions (and their settlements) at once; the seconds each admission took."""
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))

    async def one(i: int) -> float:
        started = time.monotonic()
        admission = await store.admit("acme", periods, LIMITS, [100], f"{tag}{i}", 60_000)
        took = time.monotonic() - started
        assert admission.reservation is not None
        await store.settle(admission.reservation, 70)
        return took

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_a_burst_of_new_connections_asks_the_sentinels_once_not_once_per_connection(
    sentinel_set: SentinelSet, sentinel_url: str
) -> None:
    """100 calls at once on a fresh store open ~100 connections to the primary; redis-py asked the
    Sentinels for each (300 queries with three Sentinels; the slowest call took 0.2-0.3 s of the 2 s
    deadline on a quiet 2-core machine, more on a busy one). If this fails after a redis-py upgrade: its
    Sentinel connection no longer asks its pool's ``get_master_address`` when it connects (``_SentinelPool``)."""
    primary = sentinel_set.master_port()

    async def run() -> tuple[list[float], float]:
        connection = connect(sentinel_url)
        store = BudgetStore(connection.client, connection=connection, min_replica_acks=1)
        try:
            started = time.monotonic()
            took = await admit_burst(store, "r")
            return took, time.monotonic() - started
        finally:
            await store.aclose()

    meter = SentinelMeter(sentinel_set)
    opened = counter(primary, "stats", "total_connections_received")
    meter.start()
    took, whole = asyncio.run(run())
    asked = meter.stop()
    opened = counter(primary, "stats", "total_connections_received") - opened
    print(f"\n{BURST} calls at once: {opened} connections opened to the primary; the Sentinels served "
          f"{asked.commands} commands on {asked.connections} new connections; slowest admission "
          f"{max(took):.3f} s, whole burst (admit + settle) {whole:.3f} s")
    assert opened >= BURST * 0.9  # the burst did open a connection per call
    assert max(took) < TIMEOUT_S  # every call within the store's deadline (a later one raises)
    assert asked.commands <= MOST_SENTINEL_COMMANDS
    assert asked.connections <= MOST_SENTINEL_CONNECTIONS
    with sentinel_set.master_client() as c:
        assert int(c.get(keys()[0]) or 0) == BURST * 70  # each settlement once
        assert int(c.get("gp:{acme}:reserved") or 0) == 0


@pytest.mark.slow
def test_a_failover_after_a_shared_discovery_is_followed(sentinel_set: SentinelSet, sentinel_url: str) -> None:
    """The shared answer does not pin the old primary: once the pool has it (and 100 connections to
    that primary), a failover. A fresh look (the ledger's half-second ``primary()``) names the new primary
    as soon as the Sentinels do, and the next burst runs on it alone; so does, without that look, a burst once the old
    primary is demoted (READONLY drops its connections and the shared answer)."""
    old = sentinel_set.master_port()

    async def run() -> None:
        connection = connect(sentinel_url, answer_reuse_s=KEEP_ANSWER_S)
        # No replica confirmations: the new primary has no replica until the old one rejoins (~10 s), and
        # a write short of them would look afresh too; here only ``primary()`` does.
        store = BudgetStore(connection.client, connection=connection, min_replica_acks=0)
        try:
            await admit_burst(store, "warm")
            new = await asyncio.to_thread(sentinel_set.failover)
            # As the ledger does: look every half second. The Sentinels' SENTINEL MASTERS (what the
            # client asks) names the promoted replica up to ~1 s after GET-MASTER-ADDR-BY-NAME does.
            for _ in range(20):
                if await store.primary() == f"127.0.0.1:{new}":
                    break
                await asyncio.sleep(0.5)
            assert await store.primary() == f"127.0.0.1:{new}"
            on_old, on_new = scripts_run(old), scripts_run(new)
            await admit_burst(store, "after")
            assert scripts_run(old) == on_old  # nothing written to the former primary
            assert scripts_run(new) - on_new >= 2 * BURST
        finally:
            await store.aclose()

    asyncio.run(run())
    with sentinel_set.master_client() as c:
        assert int(c.get(keys()[0]) or 0) == 2 * BURST * 70


@pytest.mark.slow
def test_a_demoted_primary_drops_the_shared_answer(sentinel_set: SentinelSet, sentinel_url: str) -> None:
    """No fresh look this time: the pool's answer and its 100 connections point at a primary that a
    failover demoted. The burst after the demotion meets READONLY on those connections (503s, nothing
    charged); the one after that opens new connections, and they go to the new primary, asking the
    Sentinels once."""
    old = sentinel_set.master_port()

    def demoted(proc: RedisProc) -> bool:
        with proc.client(decode_responses=True) as c:
            return bool(c.info("replication")["role"] == "slave")

    meter = SentinelMeter(sentinel_set)

    async def run() -> tuple[SentinelLoad, int]:
        connection = connect(sentinel_url, answer_reuse_s=KEEP_ANSWER_S)
        store = BudgetStore(connection.client, connection=connection, min_replica_acks=0)  # as above
        try:
            await admit_burst(store, "warm")
            new = await asyncio.to_thread(sentinel_set.failover)
            old_proc = next(s for s in sentinel_set.servers if s.port == old)
            await asyncio.to_thread(wait_for, "the old primary demoted", lambda: demoted(old_proc), 40.0)
            refused = await asyncio.gather(*(admit_burst(store, f"ro{i}-", 1) for i in range(BURST)),
                                           return_exceptions=True)
            assert all(isinstance(r, Exception) for r in refused)  # each pooled connection met READONLY
            on_new = scripts_run(new)
            meter.start()
            await admit_burst(store, "after")
            asked = meter.stop()
            assert scripts_run(new) - on_new >= 2 * BURST
            return asked, new
        finally:
            await store.aclose()

    asked, new = asyncio.run(run())
    print(f"\nafter the demotion, {BURST} new connections: the Sentinels served {asked.commands} commands on "
          f"{asked.connections} new connections")
    assert asked.commands <= MOST_SENTINEL_COMMANDS
    assert asked.connections <= MOST_SENTINEL_CONNECTIONS
    with redis.Redis(host="127.0.0.1", port=new, socket_timeout=5) as c:
        assert int(c.get(keys()[0]) or 0) == 2 * BURST * 70
