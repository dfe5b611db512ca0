"""Budget alerts end to end: two ``guardproxy serve`` replicas on one redis-server race over the
thresholds, a real webhook receiver on loopback is down at first, the proxies restart, and every
event still arrives exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    ADMIN,
    HI,
    OTHER_TENANT_KEY,
    TENANT_KEY,
    Receiver,
    alert_config,
    all_settled,
    proxy_process,
)

EVENT_FIELDS = {"event", "tenant", "period", "period_id", "threshold", "spent_usd", "limit_usd", "utilization",
                "at", "resets_at"}






async def spend(urls: list[str], key: str, count: int) -> list[int]:
    """``count`` concurrent calls of 50 output tokens spread over ``urls``; their statuses."""
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"model": "gpt-4o", "messages": HI, "max_tokens": 50}
        answers = await asyncio.gather(*(
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {key}", "x-fake-completion-tokens": "1000"})
            for i in range(count)
        ))
    return [a.status_code for a in answers]


def identity(event: dict[str, Any]) -> tuple[Any, ...]:
    return event["event"], event["tenant"], event["period"], event["period_id"], event["threshold"]


def queued(url: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(url + "/admin/alerts?limit=100", headers=ADMIN).json()["data"]
    return data


def wait_until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield Receiver()


@pytest.mark.slow
def test_each_alert_arrives_exactly_once_across_replicas_a_down_receiver_and_a_restart(
    upstream_url: str, redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    raw = alert_config(upstream_url, redis_url, receiver)
    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        # The receiver is down: both replicas cross every threshold, downgrade, and refuse.
        statuses = asyncio.run(spend([first, second], TENANT_KEY, 80))
        assert 200 in statuses and 429 in statuses
        all_settled(redis_url)
        events = queued(first)
        kinds = Counter(e["event"] for e in events)
        assert kinds == {"threshold": 3, "downgrading": 1, "blocked": 1}, events
        # delivery is being retried while the receiver is down
        wait_until(lambda: all(e["delivery"]["attempts"] >= 2 for e in queued(first)), 10)
        assert {e["delivery"]["state"] for e in queued(first)} == {"retrying"}
        with receiver.serving():
            wait_until(lambda: len(receiver.bodies("/json")) >= 5 and len(receiver.bodies("/slack")) >= 4, 15)
            time.sleep(2.5)  # room for a duplicate to show up, were there one
            delivered = queued(second)
        scrapes = httpx.get(first + "/metrics").text + httpx.get(second + "/metrics").text
    bodies = receiver.bodies("/json")
    assert sorted(Counter(identity(b) for b in bodies).values()) == [1] * 5, bodies
    assert {identity(b) for b in bodies} == {identity(e) for e in events}
    assert len(receiver.bodies("/slack")) == 4  # it did not ask for downgrading
    assert {e["delivery"]["state"] for e in delivered} == {"delivered"}
    assert all(e["delivery"]["attempts"] >= 3 for e in delivered)
    thresholds = sorted(b["threshold"] for b in bodies if b["event"] == "threshold")
    assert thresholds == [0.25, 0.5, 0.75]
    for body in bodies:
        assert set(body) == EVENT_FIELDS and body["tenant"] == "acme" and body["period"] == "day"
        assert body["limit_usd"] == 0.01
        if body["event"] == "threshold":
            assert body["utilization"] >= body["threshold"] and body["spent_usd"] >= body["threshold"] * 0.01
    posted_headers = [h for p, h, _ in receiver.posts if p == "/json"]
    assert all(h["authorization"] == "Bearer hook-secret" for h in posted_headers)
    for body in receiver.bodies("/slack"):
        assert set(body) == {"text"} and "acme" in body["text"] and "\n" not in body["text"]
    failed = sum(float(line.rsplit(" ", 1)[1]) for line in scrapes.splitlines()
                 if line.startswith("guardproxy_alerts_total{") and 'result="failed"' in line)
    ok = sum(float(line.rsplit(" ", 1)[1]) for line in scrapes.splitlines()
             if line.startswith("guardproxy_alerts_total{") and 'result="delivered"' in line)
    assert failed >= 5 and ok == 5

    # Events queued while the receiver is down survive the proxies' restart.
    receiver.posts.clear()
    with proxy_process(raw, tmp_path) as url:
        put = httpx.put(url + "/admin/tenants/globex/budget", json={"daily_usd": 0.01, "soft_cap": 1.0},
                         headers=ADMIN)
        assert put.status_code == 200
        asyncio.run(spend([url], OTHER_TENANT_KEY, 80))
        all_settled(redis_url, "globex")
        waiting = [e for e in queued(url) if e["tenant"] == "globex"]
        assert len(waiting) == 5
    # Each failed try doubles the wait before the next (0.5 s, 1 s, 2 s, ...): on a busy machine the
    # phase above lasts longer and the next try is further away. 15 s from when it is due.
    due_in_s = max((datetime.fromisoformat(e["delivery"]["next_attempt_at"]).timestamp() - time.time()
                    for e in waiting if "next_attempt_at" in e["delivery"]), default=0.0)
    with receiver.serving(), proxy_process(raw, tmp_path) as url:
        wait_until(lambda: len(receiver.bodies("/json")) >= 5, 15 + max(0.0, due_in_s))
        time.sleep(1.5)
    bodies = receiver.bodies("/json")
    assert len(bodies) == 5 and {b["tenant"] for b in bodies} == {"globex"}
    assert len({identity(b) for b in bodies}) == 5


def test_webhooks_and_rate_limits_added_by_a_reload_apply_at_once(
    upstream_url: str, redis_url: str, serve_proxy: Any, tmp_path: Path, receiver: Receiver
) -> None:
    import yaml

    from guardproxy.config.settings import load_config

    raw = alert_config(upstream_url, redis_url, receiver)
    alerts_section = raw.pop("alerts")
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    url = serve_proxy(load_config(path), config_path=path)
    with receiver.serving():
        assert set(asyncio.run(spend([url], TENANT_KEY, 3))) == {200}
        assert queued(url) == []  # no webhook: nothing queued
        raw["alerts"] = alerts_section
        raw["tenants"]["acme"]["rpm"] = 12
        path.write_text(yaml.safe_dump(raw))
        assert httpx.post(url + "/admin/reload", headers=ADMIN).status_code == 200
        statuses = asyncio.run(spend([url], TENANT_KEY, 20))
        # the reloaded rpm holds at once (the window counts from when the tenant has a limit)
        assert statuses.count(200) == 12 and statuses.count(429) == 8
        wait_until(lambda: len(receiver.bodies("/json")) >= 1, 10)
    assert {b["tenant"] for b in receiver.bodies("/json")} == {"acme"}
