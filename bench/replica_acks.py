"""What ``store.min_replica_acks`` costs a settlement: settle latency with and without ``WAIT``.

Starts a primary, one replica and three Sentinels on loopback (tests/redis_procs.py), then runs
``--count`` sequential settlements through ``BudgetStore`` with ``min_replica_acks`` 0 and 1 and
prints the median and 99th percentile of each. Run from the repository root:

    .venv/bin/python -m bench.replica_acks --count 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import Reservation
from guardproxy.store.client import connect
from guardproxy.store.redis import BudgetStore
from tests.redis_procs import SentinelSet


async def settle_latencies_us(url: str, acks: int, count: int) -> list[float]:
    connection = connect(url)
    store = BudgetStore(connection.client, "bench", connection=connection, min_replica_acks=acks)
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    out = []
    try:
        for i in range(count):
            reservation = Reservation(f"r{acks}-{i}", "bench", periods.day, periods.month, 100)
            started = time.perf_counter()
            await store.settle(reservation, 100)
            out.append((time.perf_counter() - started) * 1e6)
    finally:
        await store.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    topology = SentinelSet()
    topology.start()
    try:
        for acks in (0, 1, 0, 1):  # twice each, interleaved, against drift on a shared machine
            latencies = asyncio.run(settle_latencies_us(topology.url, acks, args.count))
            q = statistics.quantiles(latencies, n=100)
            print(f"min_replica_acks={acks}: p50 {q[49]:.0f} us, p99 {q[98]:.0f} us over {args.count} settlements")
    finally:
        topology.stop()


if __name__ == "__main__":
    main()
