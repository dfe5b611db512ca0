"""Redis memory the ledger keeps per call: admit + settle pairs through ``BudgetStore``, then what stays.

    python bench/ledger_memory.py [--calls 1000000] [--tenants 1000] [--concurrency 64] [--jobs-every 10]
                                  [--ids epoch|uuid]

Starts a ``redis-server`` on a free loopback port (no persistence), pushes ``--calls`` budgeted calls of one
day through ``--tenants`` tenants (every ``--jobs-every``-th call names a job of its own), as a serving
process does (``BudgetStore.from_config`` on uvloop, ``--concurrency`` at a time), then reports Redis's
``used_memory`` growth per call and per tenant-day, and ``MEMORY USAGE`` summed by kind of key: the
settled markers (``settled:<day>``), the call logs (capped at ``store.call_log_size`` per tenant), the
job hashes, and the rest. Everything listens on 127.0.0.1.

``--ids epoch`` (the default) gives the calls ids ``<epoch>.<seq>`` and each settlement the floor, as the
``Ledger`` does (``store/markers.py``): the markers are the epoch sets (``done:<epoch>``). ``--ids uuid``
gives them random ids, as calls settled later by another process have (background responses, batches):
every one of them stays marked in ``settled:<day>`` for 40 days.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RECORD: dict[str, str | int] = {
    "request_id": "0" * 32, "requested_model": "gpt-4o-mini", "model": "gpt-4o-mini", "prompt_tokens": 12,
    "completion_tokens": 30, "cached_tokens": 0, "cost_micros": 25, "outcome": "completed",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kind_of(key: bytes) -> str:
    name = key.decode(errors="replace")
    for marker, kind in ((":settled:", "settled markers"), (":done:", "epoch markers"), (":calls", "call logs"),
                         (":job:", "job hashes"),
                         (":jobs", "job indexes"), (":booked:", "booking days")):
        if marker in name:
            return kind
    return "other"


async def push(url: str, calls: int, tenants: int, concurrency: int, jobs_every: int, epoch_ids: bool) -> float:
    from guardproxy.budget.decision import RateLimits, Thresholds
    from guardproxy.budget.periods import periods_at
    from guardproxy.budget.records import AlertArgs, JobArgs
    from guardproxy.config.settings import StoreConfig
    from guardproxy.store.markers import Seqs
    from guardproxy.store.redis import BudgetStore

    store = BudgetStore.from_config(StoreConfig(redis_url=url))
    limits = Thresholds(soft_day=10**15, hard_day=10**15, soft_month=10**16, hard_month=10**16)
    alerts = AlertArgs(10**15, 10**16, (500_000, 800_000, 1_000_000), True)
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    rate = RateLimits(0, 0)
    queue = iter(range(calls))
    seqs = Seqs(await store.new_epoch(), time.monotonic()) if epoch_ids else None

    async def worker() -> None:
        for i in queue:
            job = JobArgs(f"job{i}", None, 90 * 86400) if jobs_every and i % jobs_every == 0 else JobArgs()
            rid = seqs.take() if seqs is not None else os.urandom(16).hex()
            admission = await store.admit(f"t{i % tenants}", periods, limits, [2_000, 500], rid,
                                          60_000, rate=rate, call_tokens=42, alerts=alerts, job=job)
            assert admission.reservation is not None
            floor = seqs.floor(time.monotonic(), rid) if seqs is not None else 0
            await store.settle(admission.reservation, 25, RECORD, alerts, 90 * 86400, floor=floor)
            if seqs is not None:
                seqs.release(rid)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await store.aclose()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--jobs-every", type=int, default=10, help="every n-th call names a new job (0: none)")
    parser.add_argument("--ids", choices=("epoch", "uuid"), default="epoch",
                        help="the calls' ids: <epoch>.<seq> as the ledger gives (default), or uuids")
    args = parser.parse_args(argv)

    import redis
    import uvloop

    port = free_port()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gp-ledger-memory-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(workdir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        for _ in range(100):  # 5 s at most
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        before = int(client.info("memory")["used_memory"])
        wall = uvloop.run(push(f"redis://127.0.0.1:{port}/0", args.calls, args.tenants, args.concurrency,
                               args.jobs_every, args.ids == "epoch"))
        after = int(client.info("memory")["used_memory"])
        by_kind: Counter[str] = Counter()
        keys_by_kind: Counter[str] = Counter()
        for key in client.scan_iter(count=1000):
            size = client.memory_usage(key, samples=0) or 0
            by_kind[kind_of(key)] += int(size)
            keys_by_kind[kind_of(key)] += 1
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    grown = after - before
    print(f"{args.calls} calls through {args.tenants} tenants in {wall:.0f} s "
          f"({args.calls / wall:.0f} calls/s), jobs every {args.jobs_every or '-'} calls, {args.ids} ids")
    print(f"used_memory grew {grown / 1e6:.1f} MB: {grown / args.calls:.0f} B per call, "
          f"{grown / args.tenants / 1e3:.1f} KB per tenant-day")
    print(f"{'kind of key':<18}{'keys':>10}{'MB':>10}{'B/call':>10}{'KB/tenant':>11}")
    for kind, size in by_kind.most_common():
        print(f"{kind:<18}{keys_by_kind[kind]:>10}{size / 1e6:>10.1f}{size / args.calls:>10.0f}"
              f"{size / args.tenants / 1e3:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
