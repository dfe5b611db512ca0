"""What the Redis client costs guardproxy per call: admit + settle through ``BudgetStore`` on one
redis-server, with the client built in different ways, in one process on uvloop.

    python bench/store_client.py [--calls 20000] [--concurrency 32]

Prints, per client variant, the client process's CPU per admit+settle pair (``time.process_time``)
and the pairs per second; the redis-server's own CPU is not counted. Variants:

- ``blocking``: ``BlockingConnectionPool`` with per-socket read/write timeouts (guardproxy before), under
  ``BudgetStore._call`` as it is now (so this row slightly overstates the old cost: see the third);
- ``plain+deadline``: a plain ``ConnectionPool``, no socket timeouts, ``BudgetStore._call``'s one deadline and
  slot per call (guardproxy after);
- ``plain, no deadline``: the same with ``_call`` reduced to translating errors: what the deadline costs;
- ``raw RESP (prototype)``: not redis-py: one connection, commands pipelined in order, replies parsed by
  hand (``RawRedis`` below), under ``_call``: the least client work possible, the ceiling of this lever.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import uvloop

from guardproxy.budget import Thresholds
from guardproxy.errors import StoreUnavailable
from guardproxy.periods import Periods
from guardproxy.store import BudgetStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Thresholds(soft_day=10**15, hard_day=10**15, soft_month=10**16, hard_month=10**16)


class _Incomplete(Exception):
    pass


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from ``buf[pos:]``: (value, next position); raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b":":
        return int(line), pos
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return RuntimeError(line.decode()), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return buf[pos:pos + n], pos + n + 2
    if kind == b"*":
        items = []
        for _ in range(int(line)):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"unexpected RESP type {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        pos = 0
        while self.waiting:
            try:
                value, pos = _parse(self.buffer, pos)
            except _Incomplete:
                break
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(value)
        self.buffer = self.buffer[pos:]


class RawRedis:
    """The least client work for EVALSHA: a prototype to price redis-py, not a client to ship (no
    reconnection, no Cluster or Sentinel, no cancellation safety)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.protocol: _Protocol | None = None

    async def execute(self, *args: str | int | bytes) -> Any:
        if self.protocol is None:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(_Protocol, self.host, self.port)
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.protocol.waiting.append(future)
        assert self.protocol.transport is not None
        self.protocol.transport.write(b"".join(parts))
        value = await future
        if isinstance(value, RuntimeError):
            raise value
        return value

    def register_script(self, source: str) -> Callable[..., Any]:
        sha = hashlib.sha1(source.encode()).hexdigest()
        loaded = False

        async def call(keys: list[str], args: list[str | int]) -> Any:
            nonlocal loaded
            if not loaded:
                await self.execute("SCRIPT", "LOAD", source)
                loaded = True
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

        return call

    async def aclose(self, close_connection_pool: bool = True) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


def _variants(url: str) -> dict[str, Callable[[], aioredis.Redis]]:
    def blocking() -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=256, timeout=2.0, socket_timeout=2.0,
                                                        socket_connect_timeout=2.0, health_check_interval=30)
        return aioredis.Redis(connection_pool=pool)

    def plain() -> aioredis.Redis:
        pool = aioredis.ConnectionPool.from_url(url, max_connections=256, socket_connect_timeout=2.0,
                                                health_check_interval=30)
        return aioredis.Redis(connection_pool=pool)

    def raw() -> aioredis.Redis:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        return RawRedis("127.0.0.1", port)  # type: ignore[return-value]

    return {"blocking": blocking, "plain+deadline": plain, "plain, no deadline": plain,
            "raw RESP (prototype)": raw}


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
