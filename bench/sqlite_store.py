"""The SQLite store against Redis, budgeted call by budgeted call: admit + settle pairs through ``BudgetStore``.

    python bench/sqlite_store.py [--pairs 2000] [--concurrency 1,32] [--processes 2]

For each engine (SQLite with ``synchronous`` normal and full, a local ``redis-server`` started here) and
each concurrency: pairs per second, the latency of an admission (what a call waits for before its
upstream request), the event loop's worst lag (a 1 ms ticker runs beside the pairs: how long the loop
was kept from it), and for SQLite the longest a transaction held the file. As in the server, a pair's
settlement follows its answer: each caller starts its next admission while its last settlement is
still on its way (one at a time per caller, as on a kept-alive connection). Then ``--processes``
processes on one SQLite file at once (the pairs per second of them all, against one process). Loopback
and temporary files only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

RECORD: dict[str, str | int] = {
    "request_id": "0" * 32, "requested_model": "gpt-4o-mini", "model": "gpt-4o-mini", "prompt_tokens": 12,
    "completion_tokens": 30, "cached_tokens": 0, "cost_micros": 25, "outcome": "completed",
}


async def pairs(url: str, count: int, concurrency: int, synchronous: str) -> dict[str, float]:
    from guardproxy.budget.decision import Thresholds
    from guardproxy.budget.periods import periods_at
    from guardproxy.budget.records import AlertArgs
    from guardproxy.config.settings import StoreConfig
    from guardproxy.store.redis import BudgetStore
    from guardproxy.store.sqlite import SqliteClient

    if url.startswith("sqlite:"):
        store = BudgetStore(SqliteClient(url.removeprefix("sqlite://"), synchronous=synchronous), "bench")
    else:
        store = BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix="bench"))
    limits = Thresholds(soft_day=10**12, hard_day=10**12, soft_month=10**13, hard_month=10**13)
    alerts = AlertArgs(10**12, 10**13, (500_000, 800_000, 1_000_000), True)
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    latencies: list[float] = []

    async def pair(i: int) -> asyncio.Future[Any]:
        """The admission, awaited; the settlement, started (the answer has gone when it runs)."""
        started = time.perf_counter()
        admission = await store.admit(f"t{i % 8}", periods, limits, [2_000, 500], os.urandom(16).hex(), 60_000,
                                      call_tokens=200, alerts=alerts)
        latencies.append(time.perf_counter() - started)
        assert admission.reservation is not None
        await asyncio.sleep(0)  # the upstream's answer, which a request awaits between the two
        return asyncio.ensure_future(store.settle(admission.reservation, 25, RECORD, alerts))

    lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal lag
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - before - 0.001)

    async def run(n: int) -> None:
        queue = iter(range(n))

        async def worker() -> None:
            settling: asyncio.Future[Any] | None = None
            for i in queue:
                settled = await pair(i)
                if settling is not None:
                    await settling
                settling = settled
                await asyncio.sleep(0)  # the next request's bytes
            if settling is not None:
                await settling

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await store.ping()
    await run(min(200, count))
    latencies.clear()
    tick = asyncio.create_task(ticker())
    wall, cpu = time.perf_counter(), time.process_time()
    await run(count)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = True
    await tick
    longest = getattr(store.client, "longest_tx_ms", float("nan"))
    await store.aclose()
    latencies.sort()
    return {"pairs_per_s": count / wall, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "loop_lag_ms": lag * 1000,
            "longest_tx_ms": longest, "cpu_ms_per_pair": cpu * 1000 / count}


def worker_main(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(pairs(args.url, args.pairs, args.one_concurrency, args.synchronous))))
    return 0


def in_worker(url: str, count: int, concurrency: int, synchronous: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--worker", "--url", url, "--pairs", str(count),
                             "--one-concurrency", str(concurrency), "--synchronous", synchronous],
                            stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=900)
    loaded: dict[str, float] = json.loads(out)
    return loaded


def start_redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", folder], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--url", default="")
    parser.add_argument("--one-concurrency", type=int, default=1)
    parser.add_argument("--synchronous", default="normal")
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    folder = tempfile.mkdtemp(prefix="gp-bench-sqlite-")
    redis_proc, redis_url = start_redis(folder)
    try:
        print(f"{'engine':16} {'conc':>4} {'pairs/s':>8} {'admit p50':>9} {'p99 ms':>7} {'loop lag ms':>11} "
              f"{'longest tx ms':>13} {'CPU ms/pair':>11}")
        for concurrency in map(int, args.concurrency.split(",")):
            for name, url, sync in (("sqlite normal", f"sqlite://{folder}/n{concurrency}.db", "normal"),
                                    ("sqlite full", f"sqlite://{folder}/f{concurrency}.db", "full"),
                                    ("redis", redis_url, "normal")):
                r = result(in_worker(url, args.pairs, concurrency, sync))
                print(f"{name:16} {concurrency:>4} {r['pairs_per_s']:>8.0f} {r['p50_ms']:>9.2f} {r['p99_ms']:>7.2f} "
                      f"{r['loop_lag_ms']:>11.2f} {r['longest_tx_ms']:>13.2f} {r['cpu_ms_per_pair']:>11.3f}")
        if args.processes > 1:
            for sync in ("normal", "full"):
                url = f"sqlite://{folder}/shared-{sync}.db"
                procs = [in_worker(url, args.pairs, 32, sync) for _ in range(args.processes)]
                rs = [result(p) for p in procs]
                print(f"{args.processes} processes on one file ({sync}): "
                      f"{sum(r['pairs_per_s'] for r in rs):.0f} pairs/s in all, "
                      f"p99 {max(r['p99_ms'] for r in rs):.2f} ms, "
                      f"longest tx {max(r['longest_tx_ms'] for r in rs):.2f} ms")
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
