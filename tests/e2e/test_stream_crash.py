"""A ``guardproxy serve`` killed with SIGKILL in the middle of 50 streams still charges all it had
relayed: each running stream's charge so far is written beside the journal before each batch of frames
it relays (and checkpointed durably every second), and the next process adopts the dead one's files
and settles them. At least every word a client received, never more than the provider billed (the
tokens it generated before the connection dropped), never twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import AUTH, PRICES, ProxyProcess, audit_log
from tests.helpers import HI, config_dict, keys, redis_int, reserved, wait_for
from tests.redis_procs import RedisServer

STREAMS = 50
WORDS = 100
CHUNK_DELAY_MS = 40  # a 4 s answer
KILL_AT_WORDS = 40  # killed once every stream has relayed 40 % of its answer


@dataclass
class Received:
    """What one client received: its request id, and (when, words so far) after each chunk."""

    request_id: str = ""
    words: list[tuple[float, int]] = field(default_factory=list)

    def words_by(self, moment: float) -> int:
        return max([n for t, n in self.words if t <= moment], default=0)


async def stream(client: httpx.AsyncClient, url: str, received: Received) -> None:
    body = {"model": "gpt-4o", "messages": HI, "stream": True, "max_tokens": 500}
    headers = {**AUTH, "x-fake-completion-tokens": str(WORDS), "x-fake-chunk-delay-ms": str(CHUNK_DELAY_MS)}
    count = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            received.request_id = response.headers["x-request-id"]
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    count += sum(1 for c in chunk["choices"] if c["delta"].get("content"))
                    received.words.append((time.monotonic(), count))
    except httpx.TransportError:
        pass  # the proxy died


@pytest.mark.slow
def test_a_proxy_killed_mid_stream_charges_what_it_relayed(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer,
    proxies: Callable[[dict[str, Any]], ProxyProcess], journal_home: Path,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": own_redis.url, "lease_s": 2})
    raw["tenants"]["acme"].update(daily_usd=100, monthly_usd=1000)
    first = proxies(raw)
    first.wait_until("/readyz")
    streams = [Received() for _ in range(STREAMS)]

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=STREAMS)) as client:
            tasks = [asyncio.create_task(stream(client, first.url, r)) for r in streams]
            for _ in range(200):  # 10 s at most
                if all(r.words_by(time.monotonic()) >= KILL_AT_WORDS for r in streams):
                    break
                await asyncio.sleep(0.05)
            first.process.kill()  # SIGKILL: no shutdown, no settlement
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

    asyncio.run(run())
    first.process.wait(timeout=10)
    wait_for(lambda: len(fake_state.unfinished) == STREAMS, timeout_s=10)  # the provider saw each one dropped
    assert not fake_state.billed
    checkpoints = list(journal_home.glob("journal2-*.checkpoint"))
    assert len(checkpoints) == 1
    assert len(checkpoints[0].read_bytes().splitlines()) == STREAMS
    assert list(journal_home.glob("journal2-*.progress.*"))  # what was relayed since the checkpoint

    second = proxies(raw)  # adopts the dead process's checkpoint at start-up and settles it
    second.wait_until("/readyz")
    wait_for(lambda: len(audit_log(own_redis.url)) == STREAMS and reserved(own_redis.url) == 0, timeout_s=15)
    entries = {e["request_id"]: e for e in audit_log(own_redis.url)}
    assert {e["outcome"] for e in entries.values()} == {"interrupted"}
    assert set(entries) == {r.request_id for r in streams}

    prompt = int(next(iter(entries.values()))["prompt_tokens"])
    price = PRICES["gpt-4o"]
    charged = redis_int(own_redis.url, keys()[0])
    billed = sum(cost_micros(Usage(u["prompt_tokens"], u["completion_tokens"]), PRICES[m])
                 for m, u in fake_state.unfinished)
    # Every word a client received, also those still on their way when the proxy died.
    relayed = sum(cost_micros(Usage(prompt, r.words_by(float("inf"))), price) for r in streams)
    assert charged == sum(int(e["cost_micros"]) for e in entries.values())
    for r in streams:  # each stream: at least what its client received, at most what was generated
        assert int(entries[r.request_id]["completion_tokens"]) >= r.words_by(float("inf")) >= KILL_AT_WORDS
    assert relayed <= charged <= billed
    words_relayed = sum(r.words_by(float("inf")) for r in streams)
    words_charged = sum(int(e["completion_tokens"]) for e in entries.values())
    words_generated = sum(u["completion_tokens"] for _, u in fake_state.unfinished)
    print(f"\nkilled mid-stream: {STREAMS} streams; words relayed {words_relayed}, charged {words_charged}, "
          f"generated {words_generated}; micro-USD relayed {relayed}, charged {charged}, billed {billed}")
