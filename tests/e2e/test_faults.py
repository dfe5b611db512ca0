"""Spend survives faults provoked for real: Redis paused (SIGSTOP) or gone, guardproxy killed with -9.

Each test runs its own redis-server, so pausing it disturbs no other test; guardproxy is served over
real sockets (in a thread, or as a ``guardproxy serve`` subprocess) and calls the fake upstream,
which records what it billed. "Billed" below is that usage priced with guardproxy's own pricing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.config.settings import parse_config
from guardproxy.errors import StoreUnavailable
from guardproxy.store import client as store_client
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import reply_lost
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import (
    AUTH,
    CALL,
    ProxyProcess,
    assert_books_balance,
    audit_log,
    billed_micros,
    load,
    paused,
    pending,
)
from tests.helpers import all_settled, config_dict, keys, metric, redis_int, wait_for
from tests.redis_procs import RedisServer

PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
LIMITS = Thresholds(soft_day=10**9, hard_day=10**9, soft_month=10**10, hard_month=10**10)




def pause_later(server: RedisServer, after_s: float, for_s: float) -> threading.Thread:
    def run() -> None:
        time.sleep(after_s)
        with paused(server):
            time.sleep(for_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- exactly once under a paused Redis ---------------------------------------------------------


def test_a_settle_reply_arriving_after_the_timeout_charges_once(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer, serve_proxy: Callable[..., str]
) -> None:
    """Redis takes the settle while paused past the client's 2 s timeout; the ledger journals it, and
    the replay after SIGCONT finds it already settled."""
    url = serve_proxy(parse_config(config_dict(upstream_url, store={"redis_url": own_redis.url}), {}))
    # A first call loads the scripts into Redis, as in any running deployment (else the paused
    # EVALSHA would fail with NOSCRIPT instead of running late).
    assert httpx.post(url + "/v1/chat/completions", json=CALL, headers=AUTH).status_code == 200
    # The upstream answers after 1 s: Redis is paused (at 0.5 s) when the settle is sent, for 3 s.
    pauser = pause_later(own_redis, 0.5, 3.0)
    answer = httpx.post(url + "/v1/chat/completions", json=CALL, headers={**AUTH, "x-fake-delay-ms": "1000"},
                        timeout=30)
    pauser.join()
    assert answer.status_code == 200
    billed = assert_books_balance(own_redis.url, fake_state, url)
    entry = audit_log(own_redis.url)[-1]
    assert entry["request_id"] == answer.headers["x-request-id"] and entry["outcome"] == "completed"
    # Redis ran the paused settle when it woke, or the replay ran first: either way one was ignored.
    duplicates = metric(httpx.get(url + "/metrics").text, "guardproxy_duplicate_settlements_total")
    print(f"late settle: billed={billed} settled={redis_int(own_redis.url, keys()[0])} "
          f"replays ignored={duplicates:.0f}")


@pytest.mark.anyio
async def test_a_command_past_its_deadline_leaves_no_reply_behind(own_redis: RedisServer) -> None:
    """The redis:// client bounds each command by one deadline instead of socket timeouts: a command
    (or pipeline, or script) that Redis takes while paused fails as a lost reply, and its late reply
    never reaches a later command, though the pool has a single connection to reuse. (Behind Sentinel,
    the primary's client is the same kind.)"""
    connection = store_client.connect(own_redis.url, pool_size=1, timeout_s=0.3)
    client = connection.client
    store = BudgetStore(client, connection=connection)
    try:
        assert await client.echo("warm") == b"warm"
        await store.admit("acme", PERIODS, LIMITS, [5], "r0", 60_000)  # loads the script, as in service
        with paused(own_redis):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.echo("late")
            pipe = client.pipeline(transaction=False)
            pipe.echo("late too")
            with pytest.raises(TimeoutError):
                await pipe.execute()
            with pytest.raises(StoreUnavailable) as lost:
                await store.admit("acme", PERIODS, LIMITS, [7], "r1", 60_000)
            assert reply_lost(lost.value)
            assert time.monotonic() - started < 3 * 0.3 + 1.0
        assert await client.echo("next") == b"next"
        pipe = client.pipeline(transaction=False)
        pipe.echo("a")
        pipe.echo("b")
        assert await pipe.execute() == [b"a", b"b"]
        # More commands at once than connections: they wait their turn for the one connection.
        assert await asyncio.gather(*(client.echo(str(i)) for i in range(20))) == [str(i).encode() for i in range(20)]
        # Whether Redis ran the paused admit when it woke (r1's 7 next to r0's 5) or dropped it with its
        # closed connection, nothing else was reserved.
        assert int(await client.get(store.keys("acme").reserved) or 0) in (5, 12)
    finally:
        await store.aclose()




MAX_CALLS = 3000


@pytest.mark.slow
def test_redis_paused_under_load_settles_exactly_what_was_billed(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer, serve_proxy: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The audit log keeps every call of the run (its default keeps the last 1,000, fewer than a fast proxy serves).
    store = {"redis_url": own_redis.url, "call_log_size": MAX_CALLS}
    url = serve_proxy(parse_config(config_dict(upstream_url, store=store), {}))
    pauser = pause_later(own_redis, 1.0, 4.0)
    statuses = asyncio.run(load(url, duration_s=7.0, workers=12, max_calls=MAX_CALLS))
    pauser.join()
    # Admits during the pause time out (503, fail_closed) unless Redis wakes first; settles are journaled.
    assert set(statuses) <= {200, 503} and statuses.get(200), statuses
    assert any("journal: the store is unavailable" in r.message for r in caplog.records)
    billed = assert_books_balance(own_redis.url, fake_state, url)
    assert statuses[200] == len(fake_state.billed)
    print(f"paused under load: {statuses} billed={billed} settled={redis_int(own_redis.url, keys()[0])}")


# --- a crash while Redis is down -----------------------------------------------------------------


@pytest.mark.slow
def test_guardproxy_killed_while_redis_is_down_loses_no_charge(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer,
    proxies: Callable[[dict[str, Any]], ProxyProcess], journal_home: Path,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": own_redis.url, "on_unavailable": "fail_open", "lease_s": 2})
    first = proxies(raw)
    assert httpx.post(first.url + "/v1/chat/completions", json=CALL, headers=AUTH).status_code == 200
    all_settled(own_redis.url)  # settled just after its answer: into Redis before it is paused

    async def served_while_down() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(*(
                client.post(first.url + "/v1/chat/completions", json=CALL, headers=AUTH) for _ in range(6)
            ))
        return [a.status_code for a in answers]

    with paused(own_redis):
        assert asyncio.run(served_while_down()) == [200] * 6  # fail_open: served, charges journaled
        first.kill()
        left = [p for p in journal_home.glob("journal2-*.jsonl") if p.stat().st_size]
        assert len(left) == 1 and len(left[0].read_bytes().splitlines()) == 6
    assert len(fake_state.billed) == 7
    second = proxies(raw)  # adopts the dead process's journal at start-up and replays it
    billed = assert_books_balance(own_redis.url, fake_state, second.url)
    assert not [p for p in journal_home.glob("journal2-*.jsonl") if p.stat().st_size]
    # served unbudgeted while the store could not be asked (fail_open), and recorded as such
    assert sorted(e["outcome"] for e in audit_log(own_redis.url)) == ["completed"] + ["store_unavailable"] * 6
    print(f"kill -9 while Redis down: billed={billed} settled={redis_int(own_redis.url, keys()[0])}")


def test_a_quiet_proxy_drains_its_journal_in_the_background(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(parse_config(
        config_dict(upstream_url, store={"redis_url": own_redis.url, "on_unavailable": "fail_open"}), {}
    ))
    own_redis.stop()
    assert httpx.post(url + "/v1/chat/completions", json=CALL, headers=AUTH, timeout=30).status_code == 200
    assert pending(url) == 1
    own_redis.start()  # same port, no traffic from here on
    back = time.monotonic()
    wait_for(lambda: redis_int(own_redis.url, keys()[0]) == billed_micros(fake_state) > 0)
    drained_s = time.monotonic() - back
    assert drained_s < 3 and pending(url) == 0
    print(f"quiet drain: written {drained_s:.2f} s after Redis came back")
