"""Reservation leases: a dead process's reservation frees within one lease; a running call keeps its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.config.settings import parse_config
from tests.e2e.books import AUTH, CALL, LEASE_S, STREAM, ProxyProcess, assert_books_balance, leased
from tests.helpers import GPT4O, HI_PROMPT_TOKENS, keys, redis_int, reserved, wait_for
from tests.redis_procs import RedisServer

# What admission reserves for CALL: its prompt plus max_tokens (50), at gpt-4o's price.
WORST_CASE = cost_micros(Usage(HI_PROMPT_TOKENS, 50), GPT4O)


def held_micros(url: str, redis_url: str) -> int:
    """What the next admission sees reserved of acme's day (1 USD): its remaining, less settled spend."""
    spent = redis_int(redis_url, keys()[0])
    answer = httpx.post(url + "/v1/chat/completions", json={**CALL, "max_tokens": 1}, headers=AUTH)
    assert answer.status_code == 200
    wait_for(lambda: redis_int(redis_url, keys()[0]) > spent)  # the probe settles just after its answer
    return 1_000_000 - spent - round(float(answer.headers["x-guardproxy-budget-remaining-usd"]) * 1_000_000)




@pytest.mark.slow
def test_a_killed_process_reservation_frees_within_one_lease(
    upstream_url: str, redis_url: str, redis_server: RedisServer, serve_proxy: Callable[..., str],
    proxies: Callable[[dict[str, Any]], ProxyProcess], tmp_path: Path,
) -> None:
    doomed = proxies(leased(upstream_url, redis_url))
    with httpx.stream("POST", doomed.url + "/v1/chat/completions", json=STREAM, timeout=30,
                      headers={**AUTH, "x-fake-chunk-delay-ms": "200", "x-fake-completion-tokens": "50"}) as stream:
        chunks = stream.iter_bytes()  # kept: a dropped iterator closes the response
        next(chunks)  # admitted and streaming
        assert reserved(redis_url) > 0
        doomed.kill()
        killed = time.monotonic()
    # The survivor has its own journal directory: adopting the dead process's files would settle the
    # stream at once (what it relayed, ``test_stream_crash``); here no one adopts them, and the lease frees it.
    elsewhere = leased(upstream_url, redis_url)
    elsewhere["store"]["journal_dir"] = str(tmp_path / "another-host")
    survivor = serve_proxy(parse_config(elsewhere, {}))
    held = held_micros(survivor, redis_url)
    assert held == WORST_CASE or time.monotonic() - killed > LEASE_S  # still held, unless a lease passed already
    wait_for(lambda: held_micros(survivor, redis_url) == 0, timeout_s=LEASE_S + 2)
    freed_s = time.monotonic() - killed
    assert freed_s < LEASE_S + 1.0  # one lease (plus polling on a busy machine), not minutes
    print(f"lease: the killed process's reservation freed {freed_s:.2f} s after kill -9 (lease {LEASE_S} s)")


@pytest.mark.slow
def test_a_stream_longer_than_the_lease_keeps_its_reservation(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: Any,
) -> None:
    url = serve_proxy(parse_config(leased(upstream_url, redis_url), {}))
    probes: list[tuple[float, int]] = []

    def stream() -> None:  # 30 tokens 100 ms apart: 3 leases long
        with httpx.stream("POST", url + "/v1/chat/completions", json=STREAM, timeout=30,
                          headers={**AUTH, "x-fake-chunk-delay-ms": "100", "x-fake-completion-tokens": "30"}) as r:
            r.read()

    runner = threading.Thread(target=stream)
    runner.start()
    started = time.monotonic()
    for at_s in (0.5, 1.5, 2.5):
        time.sleep(max(0.0, started + at_s - time.monotonic()))
        probes.append((at_s, held_micros(url, redis_url)))
    runner.join(timeout=30)
    # Each probe saw the stream's reservation still held, two and three leases after it was made.
    assert [held for _, held in probes] == [WORST_CASE] * 3, probes
    assert_books_balance(redis_url, fake_state)
