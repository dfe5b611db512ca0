"""The fleet brakes and the chargeback export on the SQLite store (the default without Redis), end to end:
two ``guardproxy serve`` processes on one file let exactly ``max_repeats`` of a looping agent's calls
through and queue one alert; a spending spike fires one velocity alert; ``guardproxy export``, reading
the file while the proxy runs, gives the rows the admin API gives, summing to the day's counter."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guardproxy.cli import main as cli_main
from guardproxy.observe.export import COLUMNS
from guardproxy.store.layout import Keys
from guardproxy.store.redis import BudgetStore
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import (
    ADMIN,
    _day_of_calls,
    close_clients,
    fleet_burst,
    fleet_config,
    keys,
    loop_alerts,
    metric,
    proxy_process,
    sdk,
    start,
    wait_for,
)

__all__ = ["close_clients"]  # the fixture closes the SDK clients of these tests too
from tests.helpers import sqlite_read, sqlite_spent


def sqlite_fleet_config(upstream_url: str, path: Path, **acme: Any) -> dict[str, Any]:
    raw = fleet_config(upstream_url, "", **acme)
    raw["store"] = {"url": f"sqlite://{path}"}
    return raw


def settled(path: Path) -> None:
    wait_for(lambda: sqlite_spent(path)[2:] == (0, 0), timeout_s=15)  # no reservation left: every call settled


def rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == COLUMNS
    return list(reader)


@pytest.mark.slow
@pytest.mark.counts_only
def test_two_processes_on_one_file_pass_exactly_max_repeats_of_40_concurrent_repeats(
    upstream_url: str, tmp_path: Path, fake_state: FakeUpstreamState,
) -> None:
    raw = sqlite_fleet_config(upstream_url, tmp_path / "spend.db", loop={"max_repeats": 5, "window_s": 120})

    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        results = asyncio.run(fleet_burst([first, second], 40))
        events = loop_alerts(first)
    assert results.count(200) == 5 and results.count("loop_detected") == 35
    assert len(fake_state.requests) == 5
    # the first refusal of the window queued the one alert, whichever process refused it
    assert [(e["repeats"], e["max_repeats"], e["action"]) for e in events] == [(6, 5, "refuse")]


def test_a_spending_spike_fires_one_velocity_alert(
    upstream_url: str, serve_proxy: Callable[..., str], tmp_path: Path,
) -> None:
    path = tmp_path / "spend.db"
    raw = sqlite_fleet_config(upstream_url, path, velocity={"factor": 2, "baseline_hours": 3, "min_usd": 0})
    into_hour_s = time.time() % 3600
    if into_hour_s > 3590:  # stay within one UTC hour
        time.sleep(3600 - into_hour_s + 0.5)
    hour = int(time.time() // 3600)

    async def baseline(store: BudgetStore) -> None:  # 10 micro-USD in each of the 3 hours before the previous
        await store.client.hset(Keys("gp", "acme").spend_hours, mapping={str(h): 10 for h in range(hour - 4, hour - 1)})

    sqlite_read(path, baseline)
    url = start(raw, serve_proxy)
    for i in range(3):
        sdk(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"Spike {i}"}],
                                         max_tokens=20)
    settled(path)
    assert metric(httpx.get(url + "/metrics").text, "guardproxy_velocity_alerts_total", tenant="acme") == 1
    listed = httpx.get(url + "/admin/alerts", headers=ADMIN).json()["data"]
    (event,) = [a for a in listed if a["event"] == "velocity"]
    assert event["factor"] == 2 and event["hourly_average_usd"] == 0.00001 and event["last_hour_usd"] > 0.00002


def test_the_export_command_reads_the_running_proxys_file(
    upstream_url: str, serve_proxy: Callable[..., str], tmp_path: Path,
) -> None:
    path = tmp_path / "spend.db"
    raw = sqlite_fleet_config(upstream_url, path)
    url = start(raw, serve_proxy)
    _day_of_calls(url)
    settled(path)
    counter = sqlite_spent(path)[0]
    day = keys()[0].rsplit(":", 1)[1]
    today = datetime.now(UTC).date()
    since, until = str(today - timedelta(days=1)), str(today + timedelta(days=2))
    response = httpx.get(url + "/admin/export", headers=ADMIN, params={"from": since, "to": until, "tenant": "acme"})
    assert response.status_code == 200, response.text
    from_api = rows(response.text)
    assert sum(Decimal(r["BilledCost"]) for r in from_api if r["x_BudgetDay"] == day) * 1_000_000 == counter > 0
    assert {r["x_TokenClass"] for r in from_api} >= {"input", "cached_input", "output", "reasoning"}

    config_path, out = tmp_path / "proxy.yaml", tmp_path / "focus.csv"
    config_path.write_text(yaml.safe_dump(raw))
    assert cli_main(["export", "--config", str(config_path), "--from", since, "--to", until, "--tenant", "acme",
                     "--output", str(out)]) == 0
    assert rows(out.read_text()) == from_api
