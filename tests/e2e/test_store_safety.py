"""A Redis that cannot be trusted with budgets, over real processes: an evicting ``maxmemory-policy``,
a restart that lost the data (no persistence), a restart that kept it (AOF), and a full Redis (OOM).

Each starts its own redis-server configured that way and ``guardproxy serve`` subprocesses on it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import AUTH, CALL, assert_books_balance, billed_micros
from tests.helpers import config_dict, keys, metric, wait_for
from tests.redis_procs import RedisProc
from tests.servers import ProxyProcess, no_proxy_env

ADMIN_KEY = "adm-store-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
Proxies = Callable[[dict[str, Any]], ProxyProcess]


@pytest.fixture
def redis_procs() -> Iterator[Callable[..., RedisProc]]:
    started: list[RedisProc] = []

    def start(*args: str) -> RedisProc:
        started.append(RedisProc(*args))
        started[-1].start()
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def url_of(proc: RedisProc) -> str:
    return f"redis://127.0.0.1:{proc.port}/0"


def config(upstream_url: str, proc: RedisProc, **store: Any) -> dict[str, Any]:
    return config_dict(upstream_url, store={"redis_url": url_of(proc), **store}, admin={"api_key": ADMIN_KEY})


def chat(proxy: ProxyProcess) -> httpx.Response:
    return httpx.post(proxy.url + "/v1/chat/completions", json=CALL, headers=AUTH, timeout=30)


def problem(proxy: ProxyProcess, name: str) -> float:
    return metric(httpx.get(proxy.url + "/metrics", timeout=30).text, "guardproxy_store_problem", problem=name)


def store_events(proc: RedisProc) -> list[dict[bytes, bytes]]:
    client = proc.client()
    try:
        entries: Any = client.xrange("gp:{_store}:alerts")
        return [fields for _, fields in entries]
    finally:
        client.close()


def test_an_evicting_policy_refuses_admissions_with_the_fix_or_warns_when_told(
    upstream_url: str, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--maxmemory", "20mb", "--maxmemory-policy", "allkeys-lru")
    strict = proxies(config(upstream_url, server))
    refused = chat(strict)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "budget_store_unavailable"
    assert "allkeys-lru" in refused.json()["error"]["message"]
    assert "CONFIG SET maxmemory-policy noeviction" in refused.json()["error"]["message"]
    ready = httpx.get(strict.url + "/readyz")
    assert ready.status_code == 503 and "allkeys-lru" in ready.json()["store_safety"]
    assert problem(strict, "evicting_policy") == 1
    events = store_events(server)
    assert [e[b"problem"] for e in events] == [b"evicting_policy"]

    lenient = proxies(config(upstream_url, server, on_evicting_policy="warn"))
    assert chat(lenient).status_code == 200
    ready = httpx.get(lenient.url + "/readyz")
    assert ready.status_code == 200 and "allkeys-lru" in ready.json()["warnings"]["evicting_policy"]
    assert problem(lenient, "evicting_policy") == 1
    assert len(store_events(server)) == 1  # once per policy for the store, not per process

    # The fix, applied on the running server, is seen within the next INFO read.
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.close()
    wait_for(lambda: chat(strict).status_code == 200, timeout_s=15)
    assert httpx.get(strict.url + "/readyz").status_code == 200
    assert problem(strict, "evicting_policy") == 0


def test_a_redis_restarted_without_persistence_is_refused_until_acknowledged(
    upstream_url: str, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--appendonly", "no")
    first = proxies(config(upstream_url, server))
    first.wait_until("/readyz")
    assert chat(first).status_code == 200
    assert problem(first, "no_persistence") == 1
    server.kill()
    server.start()  # same port and directory, nothing saved: an empty Redis
    wait_for(lambda: chat(first).status_code == 503, timeout_s=10)
    refused = chat(first)
    assert "lost its data" in refused.json()["error"]["message"]
    assert "acknowledge" in refused.json()["error"]["message"]
    ready = httpx.get(first.url + "/readyz")
    assert ready.status_code == 503 and "marker" in ready.json()["store_safety"]
    assert problem(first, "reset") == 1
    assert [e[b"problem"] for e in store_events(server)] == [b"reset"]

    # A process started now refuses too: the reset is recorded in the store.
    second = proxies(config(upstream_url, server))
    assert chat(second).status_code == 503
    state = httpx.get(second.url + "/admin/store", headers=ADMIN).json()
    assert state["admitting"] is False and state["reset"]

    ack = httpx.post(first.url + "/admin/store/acknowledge-reset", json={}, headers=ADMIN)
    assert ack.status_code == 200 and ack.json()["admitting"] is True
    assert chat(first).status_code == 200
    wait_for(lambda: chat(second).status_code == 200, timeout_s=5)
    assert problem(second, "reset") == 0


def test_a_proxy_restarted_with_an_empty_redis_still_notices(
    upstream_url: str, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--appendonly", "no")
    first = proxies(config(upstream_url, server))
    first.wait_until("/readyz")
    first.stop()
    server.kill()
    server.start()
    # The marker the proxy saw is kept in its journal directory: a new process knows there was one.
    again = proxies(config(upstream_url, server))
    assert chat(again).status_code == 503
    assert httpx.get(again.url + "/readyz").status_code == 503


def test_a_restart_with_persistence_keeps_admitting_and_the_spend(
    upstream_url: str, fake_state: FakeUpstreamState, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--appendonly", "yes", "--appendfsync", "always")
    proxy = proxies(config(upstream_url, server))
    proxy.wait_until("/readyz")
    assert chat(proxy).status_code == 200
    day, _ = keys()
    wait_for(lambda: _int(server, day) == billed_micros(fake_state) > 0)
    server.stop()  # SIGTERM: the AOF is complete
    server.start()
    time.sleep(2.5)  # more than a marker check and a reconnection
    assert chat(proxy).status_code == 200
    assert httpx.get(proxy.url + "/readyz").status_code == 200
    assert problem(proxy, "reset") == 0 and problem(proxy, "no_persistence") == 0
    assert_books_balance(url_of(server), fake_state, proxy.url)


def _int(proc: RedisProc, key: str) -> int:
    client = proc.client()
    try:
        return int(client.get(key) or 0)
    finally:
        client.close()


def fill(proc: RedisProc) -> int:
    """Write junk until Redis answers OOM, then lower maxmemory under what is used, so that it stays full
    (memory used hovers around the limit: a freed client buffer would let small writes in again)."""
    client = proc.client()
    try:
        for i in range(2000):
            try:
                client.set(f"junk:{i}", b"x" * 65536)
            except redis.exceptions.OutOfMemoryError:
                used = int(client.info("memory")["used_memory"])
                client.config_set("maxmemory", str(used // 2))
                return i
        raise AssertionError("Redis never reached maxmemory")
    finally:
        client.close()


def test_a_full_redis_is_503_never_500_and_loses_no_charge(
    upstream_url: str, fake_state: FakeUpstreamState, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    proxy = proxies(config(upstream_url, server))
    proxy.wait_until("/readyz")
    statuses: list[int] = []

    async def slow_calls(n: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(*(client.post(
                proxy.url + "/v1/chat/completions", json=CALL, headers={**AUTH, "x-fake-delay-ms": "1500"})
                for _ in range(n)))
        statuses.extend(a.status_code for a in answers)

    async def admitted_then_full() -> None:
        calls = asyncio.create_task(slow_calls(6))
        await asyncio.sleep(0.7)  # admitted and waiting on the upstream
        await asyncio.to_thread(fill, server)
        await calls

    asyncio.run(admitted_then_full())
    assert statuses == [200] * 6  # answered; their settlements met OOM and went to the journal
    for _ in range(10):
        statuses.append(chat(proxy).status_code)
    ready = httpx.get(proxy.url + "/readyz")
    statuses.append(ready.status_code)
    assert ready.status_code == 503
    assert [s for s in statuses if s >= 500 and s != 503] == []
    assert statuses[6:] == [503] * 11

    client = server.client()
    client.config_set("maxmemory", "4mb")
    client.delete(*[f"junk:{i}" for i in range(2000)])
    client.close()
    billed = assert_books_balance(url_of(server), fake_state, proxy.url)
    assert billed > 0 and len(fake_state.billed) == 6
    wait_for(lambda: chat(proxy).status_code == 200)
    print(f"full Redis: 5xx other than 503 = 0, {statuses.count(503)} x 503, billed={billed} settled={billed}")


def store_command(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    config = proxy.log_path.with_suffix(".yaml")  # where ProxyProcess wrote the proxy's config
    return subprocess.run([sys.executable, "-m", "guardproxy", "store", *args, "--config", str(config)],
                          env=no_proxy_env(), capture_output=True, text=True, timeout=60)


def test_the_lost_spend_is_rebuilt_from_the_json_call_log_once_then_the_reset_acknowledged(
    upstream_url: str, fake_state: FakeUpstreamState, redis_procs: Callable[..., RedisProc], proxies: Proxies
) -> None:
    server = redis_procs("--appendonly", "no")
    raw = config(upstream_url, server)
    raw["server"] = {"log_format": "json"}
    proxy = proxies(raw)
    proxy.wait_until("/readyz")
    assert [chat(proxy).status_code for _ in range(3)] == [200] * 3
    billed = billed_micros(fake_state)
    day, month = keys()
    wait_for(lambda: _int(server, day) == billed > 0)
    server.kill()
    server.start()
    wait_for(lambda: chat(proxy).status_code == 503, timeout_s=10)
    status = store_command(proxy, "status")
    assert status.returncode == 1 and "marker" in status.stdout and "reset: its marker" in status.stdout

    rebuilt = store_command(proxy, "rebuild", "--calls-log", str(proxy.log_path))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"acme: booked {billed} micro-USD" in rebuilt.stdout
    # Calls admitted in the second before the reset was noticed are in the new counters already (and
    # skipped by the rebuild: their ids are in the store's call log): together, everything billed.
    everything = billed_micros(fake_state)
    assert _int(server, day) == _int(server, month) == everything
    again = store_command(proxy, "rebuild", "--calls-log", str(proxy.log_path))
    assert "booked 0 micro-USD" in again.stdout and _int(server, day) == everything  # once, whatever the reruns

    assert chat(proxy).status_code == 503  # rebuilt, not yet acknowledged
    acknowledged = store_command(proxy, "acknowledge-reset")
    assert acknowledged.returncode == 0, acknowledged.stderr
    wait_for(lambda: chat(proxy).status_code == 200, timeout_s=5)
    assert store_command(proxy, "status").returncode == 0
