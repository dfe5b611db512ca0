"""Which spend fires which alert: external spend crosses thresholds like a call's; a call downgraded by
its job's cap alone is not the tenant's period "downgrading". Real webhook receiver, real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from guardproxy.config.settings import parse_config
from tests.helpers import ADMIN, HI, TENANT_KEY, Receiver, alert_config, all_settled, wait_for


def queued_events(redis_url: str, tenant: str = "acme") -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = client.xrange(f"gp:{{{tenant}}}:alerts")
        return [fields for _, fields in entries]
    finally:
        client.close()


def test_external_spend_fires_the_thresholds_it_crosses(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    receiver = Receiver()
    with receiver.serving():
        url = serve_proxy(parse_config(alert_config(upstream_url, redis_url, receiver), {}))
        # acme: $0.01 a day, thresholds 25 / 50 / 75 %: $0.006 booked is 60 %
        booked = httpx.post(f"{url}/admin/tenants/acme/spend", headers=ADMIN,
                            json={"cost_usd": 0.006, "description": "batch", "idempotency_key": "b-1"})
        assert booked.status_code == 201
        wait_for(lambda: len([b for b in receiver.bodies("/json") if b["event"] == "threshold"]) >= 2, timeout_s=10)
        fired = sorted((b["period"], b["threshold"]) for b in receiver.bodies("/json") if b["event"] == "threshold")
        assert fired == [("day", 0.25), ("day", 0.5)]


def test_a_downgrade_by_the_job_cap_fires_no_period_downgrading(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    receiver = Receiver()
    raw = alert_config(upstream_url, redis_url, receiver)
    raw["tenants"]["acme"].update(daily_usd=1, monthly_usd=20, soft_cap=0.8, job_usd=0.0001)
    with receiver.serving():
        url = serve_proxy(parse_config(raw, {}))
        answer = httpx.post(url + "/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": HI, "max_tokens": 50},
                            headers={"authorization": f"Bearer {TENANT_KEY}", "x-guardproxy-job": "wo-1"})
        assert answer.status_code == 200
        # gpt-4o's worst case (~533 micro-USD) does not fit the job's $0.0001; gpt-4o-mini's does
        assert answer.headers["x-guardproxy-model"] == "gpt-4o-mini"
        all_settled(redis_url)
        assert [e["event"] for e in queued_events(redis_url)] == []
        time.sleep(1.5)  # more than the sender's poll
        assert receiver.bodies("/json") == []
