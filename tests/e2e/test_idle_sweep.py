"""A tenant that never calls again does not keep a dead process's reservation (nor ``{t}:reserved``)
for ever: the sweeper frees it, without any call of that tenant; alert records older than 40 days go.
Real processes, real kill -9."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.books import AUTH, STREAM, ProxyProcess, leased
from tests.helpers import reserved, wait_for


@pytest.mark.slow
def test_an_idle_tenants_dead_reservation_is_swept(
    upstream_url: str, redis_url: str, proxies: Callable[[dict[str, Any]], ProxyProcess], tmp_path: Path,
) -> None:
    doomed = proxies(leased(upstream_url, redis_url))
    with httpx.stream("POST", doomed.url + "/v1/chat/completions", json=STREAM, timeout=30,
                      headers={**AUTH, "x-fake-chunk-delay-ms": "200", "x-fake-completion-tokens": "50"}) as stream:
        chunks = stream.iter_bytes()  # kept: a dropped iterator closes the response
        next(chunks)  # admitted and streaming
        assert reserved(redis_url) > 0
        doomed.kill()
    time.sleep(1.5)  # the lease (1 s) has run out; acme never calls again
    client = redis.Redis.from_url(redis_url)
    assert client.exists("gp:{acme}:reserved") == 1 and client.zcard("gp:{acme}:resv") == 1
    # acme's last activity two hours ago: idle, as the sweeper sees it
    now_ms = int(time.time() * 1000)
    client.zadd("gp:tenant-index", {"acme": now_ms - 2 * 3600 * 1000, "globex": now_ms})
    # globex (active) has an alert event 41 days old and one of today, each with its delivery record
    old_id, new_id = f"{now_ms - 41 * 86_400_000}-0", f"{now_ms - 1000}-0"
    for entry in (old_id, new_id):
        client.xadd("gp:{globex}:alerts", {"event": "threshold"}, id=entry)
        client.hset("gp:{globex}:alerts:delivery", f"{entry}:state", "delivered")
    # Sweeps once at start-up. Its own journal directory: adopting the dead process's stream progress
    # would settle the stream at once (test_stream_crash); here it is left to the lease and the sweeper.
    elsewhere = leased(upstream_url, redis_url)
    elsewhere["store"]["journal_dir"] = str(tmp_path / "another-host")
    sweeper = proxies(elsewhere)
    sweeper.wait_until("/readyz")
    wait_for(lambda: client.exists("gp:{acme}:reserved", "gp:{acme}:resv", "gp:{acme}:resv:amount") == 0,
             timeout_s=10)
    assert reserved(redis_url) == 0
    wait_for(lambda: client.hkeys("gp:{globex}:alerts:delivery") == [f"{new_id}:state".encode()], timeout_s=10)
    assert [entry for entry, _ in client.xrange("gp:{globex}:alerts")] == [new_id.encode()]  # type: ignore[union-attr]
    client.close()
