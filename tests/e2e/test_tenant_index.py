"""The tenant index stays bounded whatever tenant ids a service key sends, and a scrape reads a bounded
number of tenants however many the store has seen. Real redis-server, ``guardproxy serve``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from tests.helpers import HI, SERVICE_KEY, config_dict
from tests.servers import ProxyProcess

Proxies = Callable[[dict[str, Any]], ProxyProcess]
INDEX = "gp:tenant-index"


def scraped_tenants(scrape: str) -> set[str]:
    return {line.split('tenant="')[1].split('"')[0] for line in scrape.splitlines()
            if line.startswith("guardproxy_budget_spent_usd{")}


def test_service_key_tenants_cannot_grow_the_index_without_bound(
    upstream_url: str, redis_url: str, proxies: Proxies
) -> None:
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    client.sadd("gp:tenants", "old-1", "old-2")  # the unbounded set of earlier versions
    proxy = proxies(config_dict(upstream_url, store={"redis_url": redis_url, "tenant_index_max": 5},
                                server={"metrics_max_tenants": 4}))
    proxy.wait_until("/readyz")
    assert client.exists("gp:tenants") == 0 and {"old-1", "old-2"} <= set(client.zrange(INDEX, 0, -1))
    for i in range(12):
        answer = httpx.post(proxy.url + "/v1/chat/completions",
                            json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5},
                            headers={"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": f"svc-{i}"})
        assert answer.status_code == 200
    members = client.zrevrange(INDEX, 0, -1)
    assert members == [f"svc-{i}" for i in range(11, 6, -1)]  # the 5 most recent, newest first
    # the configured tenants first, then the most recently active, 4 in all
    assert scraped_tenants(httpx.get(proxy.url + "/metrics").text) == {"acme", "globex", "svc-11", "svc-10"}
    # a tenant idle past the retention leaves the index at the next registration
    client.zadd(INDEX, {"svc-11": int(time.time() * 1000) - 63 * 86_400_000})
    httpx.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5},
               headers={"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": "svc-new"})
    assert "svc-11" not in client.zrange(INDEX, 0, -1)
    client.close()


def test_a_scrape_with_ten_thousand_tenants_reads_a_bounded_number(
    upstream_url: str, redis_url: str, proxies: Proxies
) -> None:
    client = redis.Redis.from_url(redis_url)
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(10_000):
        pipe.zadd(INDEX, {f"t{i:05d}": now_ms - i})
    pipe.execute()
    client.close()
    proxy = proxies(config_dict(upstream_url, store={"redis_url": redis_url}))
    proxy.wait_until("/readyz")
    httpx.get(proxy.url + "/metrics")
    started = time.perf_counter()
    scrape = httpx.get(proxy.url + "/metrics", timeout=30).text
    took_ms = (time.perf_counter() - started) * 1000
    tenants = scraped_tenants(scrape)
    assert len(tenants) == 250 and {"acme", "globex", "t00000", "t00247"} <= tenants
    print(f"scrape with 10,000 tenants in the index: {took_ms:.0f} ms, {len(tenants)} tenants, {len(scrape)} bytes")
