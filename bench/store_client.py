"""What the Redis client costs guardproxy per call: admit + settle through ``BudgetStore`` on one
redis-server, with the client built in different ways, in one process on uvloop.

    python bench/store_client.py [--calls 20000] [--concurrency 32]

Prints, per client variant, the client process's CPU per admit+settle pair (``time.process_time``)
and the pairs per second; the redis-server's own CPU is not counted. Variants:

- ``blocking``: ``BlockingConnectionPool`` with per-socket read/write timeouts (guardproxy before), under
  ``BudgetStore._call`` as it is now (so this row slightly overstates the old cost: see the third);
- ``plain+deadline``: a plain ``ConnectionPool``, no socket timeouts, ``BudgetStore._call``'s one deadline and
  slot per call (guardproxy after);
- ``plain, no deadline``: the same with ``_call`` reduced to translating errors: what the deadline costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import redis.asyncio as aioredis
import uvloop

from guardproxy.budget import Thresholds
from guardproxy.errors import StoreUnavailable
from guardproxy.periods import Periods
from guardproxy.store import BudgetStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Thresholds(soft_day=10**15, hard_day=10**15, soft_month=10**16, hard_month=10**16)


def _variants(url: str) -> dict[str, Callable[[], aioredis.Redis]]:
    def blocking() -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=256, timeout=2.0, socket_timeout=2.0,
                                                        socket_connect_timeout=2.0, health_check_interval=30)
        return aioredis.Redis(connection_pool=pool)

    def plain() -> aioredis.Redis:
        pool = aioredis.ConnectionPool.from_url(url, max_connections=256, socket_connect_timeout=2.0,
                                                health_check_interval=30)
        return aioredis.Redis(connection_pool=pool)

    return {"blocking": blocking, "plain+deadline": plain, "plain, no deadline": plain}


async def _measure(client: aioredis.Redis, deadline: bool, calls: int, concurrency: int) -> tuple[float, float]:
    store = BudgetStore(client, "gpstorebench")
    periods = Periods(day="2026-01-01", month="2026-01", day_resets_at=NOW, month_resets_at=NOW)

    @contextlib.asynccontextmanager
    async def translate_only() -> AsyncIterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(str(exc)) from exc

    if not deadline:
        store._call = translate_only  # type: ignore[method-assign]

    async def worker(n: int, offset: int) -> None:
        for i in range(n):
            admission = await store.admit("t", periods, LIMITS, [1000, 100], f"r{offset}-{i}", 60_000)
            assert admission.reservation is not None
            await store.settle(admission.reservation, 500, {"model": "m", "cost_micros": 500})

    await worker(50, -1)  # connect, load the scripts
    per_task = calls // concurrency
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(per_task, k) for k in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.aclose(close_connection_pool=True)
    pairs = per_task * concurrency
    return cpu / pairs * 1000, pairs / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{port}/0"
            results: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.rounds):  # interleaved rounds
                for name, make in _variants(url).items():
                    deadline = "no deadline" not in name
                    results.setdefault(name, []).append(
                        uvloop.run(_measure(make(), deadline, args.calls, args.concurrency)))
            for name, runs in results.items():
                cpu = sorted(r[0] for r in runs)[len(runs) // 2]
                rate = sorted(r[1] for r in runs)[len(runs) // 2]
                print(f"{name:<20} {cpu:.3f} ms CPU per admit+settle   {rate:,.0f} pairs/s")
        finally:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
