"""A Sentinel failover with two replicas loses no acknowledged settlement.

With one replica, a former primary cannot take writes once its only replica is promoted
(``min-replicas-to-write 1``); with two it keeps one, and keeps acknowledging settlements that the
new primary never sees until Sentinel makes it a replica. guardproxy keeps every settlement the
primary took for ``store.replay_window_s`` and writes them again to the new primary; the settled
markers make the ones it has harmless. Real processes: three redis-servers (appendonly, min-replicas-
to-write 1), three Sentinels, two ``guardproxy serve`` with journals, clients for 16 s, and
``SENTINEL FAILOVER`` at 3 s.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import httpx
import pytest

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import AUTH, CALL, billed_micros, pending
from tests.helpers import config_dict, keys, wait_for
from tests.redis_procs import SentinelSet
from tests.servers import running_proxy

LOAD_S = 16.0
FAILOVER_AT_S = 3.0
WORKERS = 6


async def load(urls: list[str], topology: SentinelSet) -> dict[int, int]:
    """``WORKERS`` clients spread over ``urls`` for ``LOAD_S``, a failover at ``FAILOVER_AT_S``; status counts."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + LOAD_S
    targets = itertools.cycle(urls)

    async def worker(client: httpx.AsyncClient, url: str) -> None:
        for _ in range(20_000):  # bounded: the deadline ends it long before
            if time.monotonic() > deadline:
                return
            try:
                r = await client.post(url + "/v1/chat/completions", json=CALL, headers=AUTH)
                status = r.status_code
            except httpx.TransportError:
                status = -1
            statuses[status] = statuses.get(status, 0) + 1

    async def failover() -> None:
        await asyncio.sleep(FAILOVER_AT_S)
        await asyncio.to_thread(topology.failover)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.wait_for(asyncio.gather(failover(), *(worker(client, next(targets)) for _ in range(WORKERS))),
                               LOAD_S + 60)
    return statuses


def spend_and_held(topology: SentinelSet) -> tuple[int, int]:
    with topology.master_client() as primary:
        held = int(primary.get("gp:{acme}:reserved") or 0) + int(primary.zcard("gp:{acme}:resv"))
        return int(primary.get(keys()[0]) or 0), held


@pytest.mark.slow
def test_a_failover_with_two_replicas_loses_no_acknowledged_settlement(
    upstream_url: str, fake_state: FakeUpstreamState, tmp_path: Path
) -> None:
    topology = SentinelSet(replicas=2, server_args=("--appendonly", "yes", "--min-replicas-to-write", "1"))
    window = float(os.environ.get("GP_REPLAY_WINDOW_S", "30"))  # 0 shows what is lost without the replay
    try:
        topology.start()
        old_primary = topology.master_port()
        raw = config_dict(upstream_url, store={"redis_url": topology.url, "call_log_size": 100_000,
                                               "replay_window_s": window})
        raw["tenants"]["acme"].update(daily_usd=10_000, monthly_usd=100_000)
        with running_proxy(raw, tmp_path, "--log-level", "warning") as first, \
                running_proxy(raw, tmp_path, "--log-level", "warning") as second:
            statuses = asyncio.run(load([first.url, second.url], topology))
            assert topology.master_port() != old_primary
            topology.wait_healthy(timeout_s=60)  # the former primary is a replica of the new one
            wait_for(lambda: pending(first.url) == 0 and pending(second.url) == 0, timeout_s=30)
            wait_for(lambda: spend_and_held(topology)[1] == 0, timeout_s=30)
            settled, _ = spend_and_held(topology)
            replays = sum(p.log_path.read_text().count("the primary moved from") for p in (first, second))
        billed = billed_micros(fake_state)
        served = statuses.get(200, 0)
        print(f"\nfailover, 2 replicas: statuses {statuses}; billed={billed} settled={settled} "
              f"lost={billed - settled} ({(billed - settled) / max(billed, 1):.1%}); replays logged={replays}")
        assert served == len(fake_state.billed) and served > 100
        assert settled == billed
    finally:
        topology.stop()
