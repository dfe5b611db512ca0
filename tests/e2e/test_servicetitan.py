"""A dispatch agent sends the ServiceTitan job it works on; the job's budget tenant is charged."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import redis

from guardproxy.testing.fake_servicetitan import FakeServiceTitan
from tests.helpers import HI, SERVICE_KEY, TENANT_KEY, all_settled, keys, make_config, redis_int
from tests.servers import serve_in_thread

ST_TENANT = 1234567
JOB = 987654321


@pytest.fixture
def servicetitan() -> Iterator[tuple[FakeServiceTitan, str]]:
    fake = FakeServiceTitan(app_key="st-app-key-secret")
    fake.add_client(ST_TENANT, "st-client", "st-client-secret")
    fake.add_job(ST_TENANT, {"id": JOB, "businessUnitId": 10, "customerId": 1001,
                             "externalData": [{"key": "budget_tenant", "value": "acme-hvac"}]})
    with serve_in_thread(fake.app) as url:
        yield fake, url


@pytest.fixture
def proxy(servicetitan: tuple[FakeServiceTitan, str], upstream_url: str, redis_url: str,
          serve_proxy: Callable[..., str]) -> str:
    fake, st_url = servicetitan
    section = fake.config_section(st_url, tenant_from="externalData:budget_tenant")
    return serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}, servicetitan=section))


def test_job_header_charges_the_jobs_tenant_and_is_cached(
    proxy: str, servicetitan: tuple[FakeServiceTitan, str], redis_url: str
) -> None:
    fake, _ = servicetitan
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=SERVICE_KEY,
                           default_headers={"X-ServiceTitan-Job-Id": str(JOB)})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-guardproxy-tenant"] == "acme-hvac"
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    all_settled(redis_url, "acme-hvac")
    assert redis_int(redis_url, keys("acme-hvac")[0]) > 0
    assert fake.calls["jobs"] == 1  # the second call was answered from the shared cache
    metrics = httpx.get(proxy + "/metrics").text
    assert 'guardproxy_servicetitan_lookups_total{result="fetched"} 1.0' in metrics
    assert 'guardproxy_servicetitan_lookups_total{result="cache_hit"} 1.0' in metrics


def test_concurrent_requests_for_one_job_cause_one_lookup(
    proxy: str, servicetitan: tuple[FakeServiceTitan, str]
) -> None:
    fake, _ = servicetitan
    fake.jobs_delay_s = 0.3
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=SERVICE_KEY)

    def call() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, extra_headers={"X-ServiceTitan-Job-Id": str(JOB)}
        )
        return raw.headers["x-guardproxy-tenant"]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        tenants = list(pool.map(lambda _: call(), range(20)))
    assert tenants == ["acme-hvac"] * 20
    assert fake.calls["jobs"] == 1 and fake.tokens_issued == 1


def test_job_errors_reach_the_sdk_as_openai_errors(
    proxy: str, servicetitan: tuple[FakeServiceTitan, str], redis_url: str
) -> None:
    fake, _ = servicetitan
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=SERVICE_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI,
                                       extra_headers={"X-ServiceTitan-Job-Id": "12ab"})
    assert caught.value.code == "invalid_job_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI,
                                       extra_headers={"X-ServiceTitan-Job-Id": "555"})
    assert caught.value.code == "servicetitan_job_not_found"
    fake.fail_next("jobs", 429, times=5, retry_after_s=7)
    with pytest.raises(openai.APIStatusError) as unavailable:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI,
                                       extra_headers={"X-ServiceTitan-Job-Id": "556"})
    assert unavailable.value.status_code == 503 and unavailable.value.code == "servicetitan_unavailable"
    assert unavailable.value.response.headers["retry-after"] == "7"
    spend_keys = [k for k in redis.Redis.from_url(redis_url).keys("*") if b":spend:" in k]
    assert spend_keys == []


def test_a_tenant_key_never_triggers_a_lookup(proxy: str, servicetitan: tuple[FakeServiceTitan, str]) -> None:
    fake, _ = servicetitan
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=TENANT_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"X-ServiceTitan-Job-Id": str(JOB)}
    )
    assert raw.headers["x-guardproxy-tenant"] == "acme"
    assert fake.calls["jobs"] == 0
