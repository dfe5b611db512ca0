"""How long a ``/metrics`` scrape takes with many tenants in the store.

Starts a redis-server on a free loopback port (or uses ``--redis-url``, which it FLUSHES), writes
``--tenants`` tenants into guardproxy's tenant index with a day's and a month's spend and
``--calls`` logged calls each, serves the proxy in this process and times ``--scrapes`` scrapes over
loopback. Prints the median and worst scrape, the CPU it took in this process, and its size.

    .venv/bin/python bench/metrics_scrape.py --tenants 10000
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import httpx
import redis
import uvicorn

from guardproxy.app import create_app
from guardproxy.budget.periods import periods_at
from guardproxy.config.settings import parse_config
from guardproxy.store.layout import Keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def populate(url: str, tenants: int, calls: int) -> None:
    client = redis.Redis.from_url(url)
    client.flushall()
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(tenants):
        tenant = f"t{i:05d}"
        k = Keys("gp", tenant)
        pipe.zadd("gp:tenant-index", {tenant: now_ms - i})
        pipe.set(k.spend_day(periods.day), 1000 + i)
        pipe.set(k.spend_month(periods.month), 5000 + i)
        for c in range(calls):
            pipe.xadd(k.calls, {"cost_micros": 100 + c, "outcome": "completed", "model": "gpt-4o-mini"})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=20, help="logged calls per tenant")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--max-tenants", type=int, default=None, help="server.metrics_max_tenants")
    parser.add_argument("--redis-url", default="", help="a Redis to use (it is flushed!)")
    args = parser.parse_args()

    server = None
    url = args.redis_url
    if not url:
        port = free_port()
        server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tempfile.mkdtemp()],
                                  stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    try:
        populate(url, args.tenants, args.calls)
        raw = {
            "store": {"redis_url": url, "journal_dir": tempfile.mkdtemp()},
            "upstreams": {"openai": {"base_url": "http://127.0.0.1:9/v1"}},
            "models": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
            "server": {} if args.max_tenants is None else {"metrics_max_tenants": args.max_tenants},
        }
        app = create_app(parse_config(raw, {}))
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        times, cpu, size = [], [], 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            http.get("/metrics")  # warm-up
            for _ in range(args.scrapes):
                started, started_cpu = time.perf_counter(), time.process_time()
                body = http.get("/metrics").content
                times.append((time.perf_counter() - started) * 1000)
                # CPU of this process (server and client): what a loaded machine does not inflate
                cpu.append((time.process_time() - started_cpu) * 1000)
                size = len(body)
        uv.should_exit = True
        thread.join(timeout=10)
        series = body.count(b"guardproxy_budget_spent_usd{")
        print(f"{args.tenants} tenants in the store, {series // 2} in the scrape: "
              f"median {statistics.median(times):.1f} ms, worst {max(times):.1f} ms "
              f"(CPU median {statistics.median(cpu):.1f} ms), {size / 1024:.0f} KiB")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
