"""The SQLite store shared by real ``guardproxy serve`` processes on one file: caps hold, spend survives.

Two separate processes (and ``--workers 2``) admit and settle through the same file under concurrent
load without passing the hard cap; a restart keeps every tenant's spend; ``kill -9`` under load loses no
committed charge (the file's spend equals its call log, every logged call was billed once) and the dead
process's reservations free within one lease while the other process keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import billed_micros, load
from tests.helpers import CALL, TENANT_KEY, burst, config_dict, guardproxy, sqlite_read, sqlite_spent, wait_for
from tests.servers import ProxyProcess, running_proxy

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}
CAP_MICROS = 10_000  # daily_usd 0.01


def sqlite_config(upstream_url: str, path: Path, **store: Any) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"url": f"sqlite://{path}", **store})
    raw["tenants"]["acme"].update(daily_usd=0.01, monthly_usd=1)
    return raw






def call_log(path: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = sqlite_read(path, lambda store: store.recent_calls("acme", 100_000))
    return entries


def assert_cap_held(path: Path, costs: list[int], rejected: int) -> None:
    wait_for(lambda: sqlite_spent(path)[2:] == (0, 0), timeout_s=15)  # every admitted call settled
    day, month, _, _ = sqlite_spent(path)
    assert day == month == sum(costs) <= CAP_MICROS, (day, sum(costs))
    assert costs and rejected


@pytest.mark.slow
@pytest.mark.counts_only
def test_two_serve_processes_on_one_file_hold_the_cap_under_400_concurrent_calls(
    upstream_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "spend.db"
    raw = sqlite_config(upstream_url, path)
    with running_proxy(raw, tmp_path, "--log-level", "warning") as first, \
            running_proxy(raw, tmp_path, "--log-level", "warning") as second:
        costs, rejected = asyncio.run(burst([first.url, second.url], 400))
    assert len(costs) + rejected == 400
    assert_cap_held(path, costs, rejected)
    print(f"two processes, one file: {len(costs)} admitted, {rejected} refused, spent {sum(costs)} of {CAP_MICROS}")


@pytest.mark.slow
@pytest.mark.counts_only
def test_serve_with_two_workers_shares_the_file(upstream_url: str, tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    with running_proxy(sqlite_config(upstream_url, path), tmp_path, "--log-level", "warning", "--workers", "2") as p:
        costs, rejected = asyncio.run(burst([p.url], 100))
    assert_cap_held(path, costs, rejected)


def test_spend_survives_a_restart(upstream_url: str, tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    raw = sqlite_config(upstream_url, path)
    with running_proxy(raw, tmp_path) as proxy:
        costs, _ = asyncio.run(burst([proxy.url], 1))
    with running_proxy(raw, tmp_path) as proxy:
        answer = httpx.post(proxy.url + "/v1/chat/completions", json=CALL, headers=AUTH)
        assert answer.status_code == 200
        remaining = float(answer.headers["x-guardproxy-budget-remaining-usd"])
    assert remaining == pytest.approx((CAP_MICROS - costs[0]) / 1e6)


def test_status_reads_what_a_running_proxy_spent(upstream_url: str, tmp_path: Path) -> None:
    """``guardproxy status`` is another process on the same file: it sees the serving proxy's spend."""
    path = tmp_path / "spend.db"
    raw = sqlite_config(upstream_url, path)
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    with running_proxy(config_path, tmp_path) as proxy:
        costs, _ = asyncio.run(burst([proxy.url], 1))
        wait_for(lambda: sqlite_spent(path)[0] == costs[0])
        shown = guardproxy("status", "acme", "--config", str(config_path))
    assert shown.returncode == 0, shown.stderr
    assert f"{costs[0] / CAP_MICROS * 100:5.1f}%" in shown.stdout, shown.stdout  # spent / the day's cap


@pytest.fixture
def started() -> Iterator[list[ProxyProcess]]:
    procs: list[ProxyProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def roomy_config(upstream_url: str, path: Path) -> dict[str, Any]:
    raw = sqlite_config(upstream_url, path, lease_s=2, call_log_size=100_000)
    raw["tenants"]["acme"].update(daily_usd=1000, monthly_usd=1000)
    return raw


def assert_file_consistent(path: Path, state: FakeUpstreamState) -> tuple[int, int, int]:
    """Spend == the call log's costs, each logged call once, and no more logged than billed; returns
    (settled, billed, calls billed but not settled)."""
    entries = call_log(path)
    ids = [e["request_id"] for e in entries]
    assert len(ids) == len(set(ids)), "a call was settled twice"
    day, month, _, _ = sqlite_spent(path)
    assert day == month == sum(int(e["cost_micros"]) for e in entries)
    billed = billed_micros(state)
    assert day <= billed and len(entries) <= len(state.billed)
    return day, billed, len(state.billed) - len(entries)


@pytest.mark.slow
def test_kill_9_under_load_loses_no_committed_charge_and_a_restart_serves_on(
    upstream_url: str, fake_state: FakeUpstreamState, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    path = tmp_path / "spend.db"
    raw = roomy_config(upstream_url, path)
    first = ProxyProcess(raw, tmp_path, "--log-level", "warning")
    started.append(first)
    first.wait_until()

    async def killed_under_load() -> None:
        task = asyncio.create_task(load(first.url, duration_s=4.0, workers=12, max_calls=2000))
        await asyncio.sleep(2.0)
        first.process.kill()  # SIGKILL mid-load
        with pytest.raises(httpx.TransportError):  # the clients' calls in flight break
            await task

    asyncio.run(killed_under_load())
    first.process.wait(timeout=10)
    settled, billed, in_flight = assert_file_consistent(path, fake_state)
    assert settled > 0 and in_flight <= 12  # at most the calls in flight when it died were billed, not settled
    second = ProxyProcess(raw, tmp_path, "--log-level", "warning")
    started.append(second)
    second.wait_until()
    time.sleep(2 * 2)  # past the dead one's leases (lease_s 2)
    # the next admission sweeps the expired reservations; its own settles
    assert httpx.post(second.url + "/v1/chat/completions", json=CALL, headers=AUTH).status_code == 200
    wait_for(lambda: sqlite_spent(path)[2:] == (0, 0), timeout_s=5)
    after, billed_after, lost = assert_file_consistent(path, fake_state)
    assert after - settled == billed_after - billed and lost == in_flight
    print(f"kill -9 under load: {len(fake_state.billed)} calls billed, {billed} micros; {settled} settled; "
          f"calls billed but never settled: {in_flight}")


@pytest.mark.slow
def test_one_of_two_processes_killed_the_other_serves_and_the_leases_free(
    upstream_url: str, fake_state: FakeUpstreamState, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    path = tmp_path / "spend.db"
    raw = roomy_config(upstream_url, path)
    doomed, survivor = (ProxyProcess(raw, tmp_path, "--log-level", "warning") for _ in range(2))
    started.extend([doomed, survivor])
    doomed.wait_until()
    survivor.wait_until()

    async def slow_calls() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            calls = [client.post(doomed.url + "/v1/chat/completions", json=CALL,
                                 headers={**AUTH, "x-fake-delay-ms": "3000"}) for _ in range(5)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            # all five admitted (their reservations in the file), still waiting for the upstream
            await asyncio.to_thread(wait_for, lambda: sqlite_spent(path)[3] == 5, 10.0)
            doomed.process.kill()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(slow_calls())
    assert sqlite_spent(path)[3] == 5  # the dead process's five reservations are still held
    killed_at = time.monotonic()
    # The survivor serves on; its admissions sweep the expired leases (as admit.v4 does on Redis).
    statuses = asyncio.run(load(survivor.url, duration_s=1.0, workers=4, max_calls=600))
    assert set(statuses) == {200}, statuses
    time.sleep(max(0.0, killed_at + 2.2 - time.monotonic()))  # one lease (2 s) after the kill
    assert httpx.post(survivor.url + "/v1/chat/completions", json=CALL, headers=AUTH).status_code == 200
    wait_for(lambda: sqlite_spent(path)[2:] == (0, 0), timeout_s=5)
    freed_s = time.monotonic() - killed_at
    assert_file_consistent(path, fake_state)
    print(f"one of two killed: the survivor served {statuses}; reservations freed within {freed_s:.1f} s")


