"""Cost and caps per job (work order), over real processes sharing one real redis-server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy.admin.status import main as status_main
from guardproxy.budget.pricing import format_usd
from guardproxy.config.settings import parse_config
from tests.helpers import (
    FULL_LENGTH,
    GPT4O,
    HI,
    MINI,
    SERVICE_KEY,
    TENANT_KEY,
    all_settled,
    config_dict,
    keys,
    proxy_process,
    redis_int,
    reserved,
    sdk_calls,
)

PRICES = {"gpt-4o": GPT4O, "gpt-4o-mini": MINI}
ADMIN_KEY = "admin-secret-for-tests"
JOB = "WO-4711"
JOB_CAP_MICROS = 3_000


def job_config(upstream_url: str, redis_url: str, job_usd: float | None = None) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    if job_usd is not None:
        raw["budgets"] = {"defaults": {"job_usd": job_usd}}
    return raw


async def job_burst(urls: list[str], count: int, job: str) -> tuple[list[int], list[str]]:
    """``count`` concurrent calls for ``job`` spread over ``urls``: each admitted call's cost, and the
    error codes of the refused ones."""
    results = await sdk_calls(urls, count, {**FULL_LENGTH, "x-guardproxy-job": job})
    refused = [r for r in results if not isinstance(r, int)]
    for exc in refused:
        assert exc.response.headers["x-should-retry"] == "false"
    return [r for r in results if isinstance(r, int)], [str(r.code) for r in refused]


def admin_get(url: str, path: str) -> Any:
    response = httpx.get(url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
@pytest.mark.counts_only
def test_20_concurrent_calls_of_one_job_over_two_processes_sum_exactly(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    raw = job_config(upstream_url, redis_url)
    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        costs, refused = asyncio.run(job_burst([first, second], 20, JOB))
        all_settled(redis_url)
        assert len(costs) == 20 and not refused
        report = admin_get(first, f"/admin/tenants/acme/jobs/{JOB}")
        calls = admin_get(second, "/admin/tenants/acme/calls?limit=100")["data"]
        listed = admin_get(second, "/admin/tenants/acme/jobs?limit=5")["data"]
    assert report["calls"] == 20
    assert round(report["cost_usd"] * 1e6) == report["cost_micros"] == sum(costs) == redis_int(redis_url, keys()[0])
    # the report is the sum of its call-log entries
    mine = [c for c in calls if c["job"] == JOB]
    assert len(mine) == 20
    assert sum(c["cost_micros"] for c in mine) == report["cost_micros"]
    assert sum(c["prompt_tokens"] for c in mine) == report["prompt_tokens"]
    assert sum(c["completion_tokens"] for c in mine) == report["completion_tokens"]
    assert report["by_model"]["gpt-4o"]["calls"] == 20
    assert report["first_at"] <= report["last_at"] and report["job_usd"] is None and report["tenant"] == "acme"
    assert [j["job"] for j in listed] == [JOB]
    assert reserved(redis_url) == 0


@pytest.mark.slow
@pytest.mark.counts_only
def test_the_job_cap_holds_over_two_processes(upstream_url: str, redis_url: str, tmp_path: Path) -> None:
    raw = job_config(upstream_url, redis_url, job_usd=JOB_CAP_MICROS / 1e6)
    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        costs, refused = asyncio.run(job_burst([first, second], 40, JOB))
        all_settled(redis_url)
        report = admin_get(first, f"/admin/tenants/acme/jobs/{JOB}")
        # another job, and the tenant without a job, are not held back
        other, _ = asyncio.run(job_burst([second], 1, "WO-other"))
        all_settled(redis_url)
        plain = httpx.post(first + "/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                           json={"model": "gpt-4o", "messages": HI, "max_tokens": 50})
        state = admin_get(first, "/admin/tenants/acme")
    assert costs and refused, "the cap should admit some calls and refuse others"
    assert set(refused) == {"job_budget_exceeded"}
    assert report["cost_micros"] == sum(costs) <= JOB_CAP_MICROS
    assert report["job_usd"] == pytest.approx(JOB_CAP_MICROS / 1e6)
    assert other and plain.status_code == 200
    assert state["state"] != "blocked"
    assert reserved(redis_url) == 0


def test_job_ids_are_checked_and_the_servicetitan_header_names_the_job(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(parse_config(job_config(upstream_url, redis_url), {}))
    call = {"model": "gpt-4o", "messages": HI, "max_tokens": 5}
    bad = httpx.post(url + "/v1/chat/completions", json=call,
                     headers={"authorization": f"Bearer {TENANT_KEY}", "x-guardproxy-job": "no/slashes"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_job_id"
    assert redis_int(redis_url, keys()[0]) == 0
    ok = httpx.post(url + "/v1/chat/completions", json=call,
                    headers={"authorization": f"Bearer {TENANT_KEY}", "x-servicetitan-job-id": "123456"})
    assert ok.status_code == 200
    all_settled(redis_url)
    report = admin_get(url, "/admin/tenants/acme/jobs/123456")
    assert report["calls"] == 1 and report["cost_micros"] == redis_int(redis_url, keys()[0])
    out = io.StringIO()
    assert status_main(parse_config(job_config(upstream_url, redis_url), {}), "acme", out, jobs=5) == 0
    line = next(x for x in out.getvalue().splitlines() if "123456" in x)
    assert line.split()[1] == "1" and line.split()[3] == format_usd(report["cost_micros"])
    missing = httpx.get(url + "/admin/tenants/acme/jobs/nope", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert missing.status_code == 404
    # an admin override sets a job cap at run time
    put = httpx.put(url + "/admin/tenants/acme/budget", json={"job_usd": 0.000001},
                    headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert put.status_code == 200 and put.json()["job_usd"] == pytest.approx(0.000001)
    capped = httpx.post(url + "/v1/chat/completions", json=call,
                        headers={"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": "acme",
                                 "x-guardproxy-job": "123456"})
    assert capped.status_code == 429 and capped.json()["error"]["code"] == "job_budget_exceeded"
    assert "123456" in capped.json()["error"]["message"]
