"""The response cache stays within its per-tenant and total bounds, oldest answers out first, counted
in the store; over a real redis-server and ``guardproxy serve``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis

from tests.helpers import OTHER_TENANT_KEY, TENANT_KEY, config_dict
from tests.servers import ProxyProcess

Proxies = Callable[[dict[str, Any]], ProxyProcess]


def ask(proxy: ProxyProcess, n: int, key: str = TENANT_KEY) -> str:
    """A temperature-0 chat call, different for each ``n``; its x-guardproxy-cache (hit or miss)."""
    answer = httpx.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                        json={"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 20,
                              "messages": [{"role": "user", "content": f"question {n}"}]})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-guardproxy-cache"]


def entry_bytes(redis_url: str) -> dict[str, int]:
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return {member: int(size) for member, size in client.hgetall("gp:rc:sizes").items()}
    finally:
        client.close()


def held(redis_url: str) -> dict[str, int]:
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return {name: int(v) for name, v in client.hgetall("gp:rc:bytes").items()}
    finally:
        client.close()


def test_a_tenant_keeps_its_newest_answers_within_its_bound(
    upstream_url: str, redis_url: str, proxies: Proxies
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["tenants"]["acme"]["cache"] = True
    probe = proxies(raw)
    probe.wait_until("/readyz")
    assert ask(probe, 0) == "miss"
    (size,) = entry_bytes(redis_url).values()
    probe.stop()
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys("gp:rc:*"), *client.keys("gp:{acme}:rc*"))  # the cache only (not the marker)
    client.close()

    # room for three answers of this size per tenant
    raw["cache"] = {"max_tenant_bytes": 3 * size + size // 2, "max_total_bytes": 100 * size}
    proxy = proxies(raw)
    proxy.wait_until("/readyz")
    for n in range(8):
        assert ask(proxy, n) == "miss"
    assert held(redis_url)["acme"] <= 3 * size + size // 2
    assert len(entry_bytes(redis_url)) == 3
    assert [ask(proxy, n) for n in (7, 6, 5)] == ["hit"] * 3  # the newest stay
    assert ask(proxy, 0) == "miss"  # the oldest went first
    client = redis.Redis.from_url(redis_url)
    assert len(list(client.scan_iter("gp:{acme}:rc:*"))) == 3  # the entries themselves, not only the counts
    client.close()


def test_all_tenants_together_stay_within_the_total(upstream_url: str, redis_url: str, proxies: Proxies) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["tenants"]["acme"]["cache"] = True
    raw["tenants"]["globex"]["cache"] = True
    raw["cache"] = {"max_tenant_bytes": 10_000_000, "max_total_bytes": 4000}
    proxy = proxies(raw)
    proxy.wait_until("/readyz")
    for n in range(6):
        ask(proxy, n)
        ask(proxy, n, OTHER_TENANT_KEY)
    counted = held(redis_url)
    assert 0 < counted["total"] <= 4000
    assert counted["total"] == sum(entry_bytes(redis_url).values()) == counted["acme"] + counted["globex"]
    assert ask(proxy, 5, OTHER_TENANT_KEY) == "hit"  # the newest of all stays
    assert ask(proxy, 0) == "miss"
