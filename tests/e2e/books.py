"""Shared checks of the fault tests: what the fake upstream billed against what the ledger settled,
the audit log, and guardproxy as a subprocess that can be killed for real."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import redis

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import GPT4O, HI, MINI, TENANT_KEY, config_dict, keys, metric, redis_int, reserved, wait_for
from tests.redis_procs import RedisServer
from tests.servers import ProxyProcess as ProxyProcess

PRICES = {"gpt-4o": GPT4O, "gpt-4o-mini": MINI}
AUTH = {"authorization": f"Bearer {TENANT_KEY}"}
CALL = {"model": "gpt-4o", "messages": HI, "max_tokens": 50}


def billed_micros(state: FakeUpstreamState) -> int:
    """What the fake upstream billed, priced as guardproxy prices it."""
    total = 0
    for model, usage in state.billed:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        total += cost_micros(Usage(usage["prompt_tokens"], usage["completion_tokens"], cached), PRICES[model])
    return total


def audit_log(url: str, tenant: str = "acme") -> list[dict[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries: Any = client.xrange(f"gp:{{{tenant}}}:calls")
        return [fields for _, fields in entries]
    finally:
        client.close()


def pending(proxy_url: str) -> float:
    return metric(httpx.get(proxy_url + "/metrics").text, "guardproxy_journal_pending")


def assert_books_balance(redis_url: str, state: FakeUpstreamState, proxy_url: str | None = None) -> int:
    """Settled spend == billed, exactly; one audit entry per billed call, none twice; nothing held."""
    billed = billed_micros(state)
    day, month = keys()
    wait_for(lambda: redis_int(redis_url, day) == billed and reserved(redis_url) == 0, timeout_s=10)
    assert redis_int(redis_url, month) == billed
    entries = audit_log(redis_url)
    ids = [e["request_id"] for e in entries]
    assert len(ids) == len(set(ids)) == len(state.billed)
    assert sum(int(e["cost_micros"]) for e in entries) == billed
    if proxy_url is not None:
        wait_for(lambda: pending(proxy_url) == 0)
    return billed


# --- faults: a paused Redis, a steady load ---

@contextlib.contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


async def load(url: str, duration_s: float, workers: int, max_calls: int) -> dict[int, int]:
    """``workers`` clients calling back to back for ``duration_s`` (at most ``max_calls``); status counts."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + duration_s
    calls = 0
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=workers)) as client:

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < deadline and calls < max_calls:
                calls += 1
                r = await client.post(url + "/v1/chat/completions", json=CALL,
                                      headers={**AUTH, "x-fake-delay-ms": "20"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return statuses



# --- leases ---

LEASE_S = 1.0


STREAM = {**CALL, "stream": True}


def leased(upstream_url: str, redis_url: str) -> dict[str, Any]:
    return config_dict(upstream_url, store={"redis_url": redis_url, "lease_s": LEASE_S})

