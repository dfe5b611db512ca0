"""The Redis client's CPU per budgeted call: admit + settle pairs through ``BudgetStore``, nothing else.

    python bench/store_calls.py [--compare /work/main] [--rounds 5] [--pairs 3000] [--concurrency 32]
                                [--url redis+sentinel://... | redis+cluster://...]

Starts a ``redis-server`` on a free loopback port, then in each round runs one worker process per
tree (this checkout, and ``--compare``'s if given, in alternating order) that makes ``--pairs`` admit +
settle pairs, ``--concurrency`` at a time, through ``BudgetStore.from_config`` on uvloop, as a serving
process does. A worker reports its process CPU (``time.process_time``) and wall time per pair; the
table shows each tree's median over the rounds. Only the client's CPU is counted: redis-server's is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
RECORD: dict[str, str | int] = {
    "request_id": "0" * 32, "requested_model": "gpt-4o-mini", "model": "gpt-4o-mini", "prompt_tokens": 12,
    "completion_tokens": 30, "cached_tokens": 0, "cost_micros": 25, "outcome": "completed",
}


async def pairs(url: str, count: int, concurrency: int, warmup: int) -> dict[str, float]:
    from guardproxy.budget.decision import RateLimits, Thresholds
    from guardproxy.budget.periods import periods_at
    from guardproxy.budget.records import AlertArgs
    from guardproxy.config.settings import StoreConfig
    from guardproxy.store.redis import BudgetStore
    # As `guardproxy serve` runs behind Sentinel by default: each settlement waits for one replica.
    acks = 1 if url.startswith(("redis+sentinel", "rediss+sentinel")) else 0
    store = BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix="bench", min_replica_acks=acks))
    limits = Thresholds(soft_day=10**12, hard_day=10**12, soft_month=10**13, hard_month=10**13)
    alerts = AlertArgs(10**12, 10**13, (500_000, 800_000, 1_000_000), True)
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    rate = RateLimits(0, 0)

    async def pair(i: int) -> None:
        admission = await store.admit(f"t{i % 8}", periods, limits, [2_000, 500], os.urandom(16).hex(), 60_000,
                                      rate=rate, call_tokens=200, alerts=alerts)
        assert admission.reservation is not None
        await store.settle(admission.reservation, 25, RECORD, alerts)

    async def run(n: int) -> None:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await pair(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await store.ping()  # as serve's start-up does: a cluster client learns the cluster's shards
    await run(warmup)
    cpu, wall = time.process_time(), time.perf_counter()
    await run(count)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.aclose()
    return {"cpu_ms": cpu * 1000 / count, "wall_ms": wall * 1000 / count}


def worker_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(pairs(args.url, args.pairs, args.concurrency, args.warmup))
    print(json.dumps(result))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(tree: Path, url: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(HERE / "store_calls.py"), "--worker", "--url", url, "--pairs", str(args.pairs),
         "--concurrency", str(args.concurrency), "--warmup", str(args.warmup)],
        env=env, check=True, capture_output=True, text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, help="another checkout to measure in the same rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--url", help="a Redis to use instead of starting one (worker: the Redis to call)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    trees = {"this": HERE.parent, **({"compare": args.compare.resolve()} if args.compare else {})}
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.url
        if url is None:
            port = free_port()
            server = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", tmp], stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.3)
        try:
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
                for name, tree in order:
                    results[name].append(measure(tree, url, args))
                print(f"round {r + 1}: " + "  ".join(
                    f"{name} {results[name][-1]['cpu_ms']:.3f} ms CPU" for name in trees), file=sys.stderr)
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    print(f"admit+settle pairs, concurrency {args.concurrency}, {args.pairs} pairs x {args.rounds} rounds, medians:")
    for name, tree in trees.items():
        cpu = [m["cpu_ms"] for m in results[name]]
        wall = statistics.median(m["wall_ms"] for m in results[name])
        print(f"  {name:8} {tree}: {statistics.median(cpu):.3f} ms CPU per pair "
              f"(min {min(cpu):.3f}, max {max(cpu):.3f}), {wall:.3f} ms wall")
    if args.compare:
        # Each round measures both trees back to back: the ratio within a round shrugs off the load
        # that other processes put on the machine better than the ratio of medians.
        ratios = sorted(a["cpu_ms"] / b["cpu_ms"] for a, b in zip(results["this"], results["compare"], strict=True))
        print(f"  this / compare, per round: median {statistics.median(ratios):.3f} "
              f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
