"""Job id -> budget tenant end to end against the fake: validation, cache, connections, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from guardproxy.config.servicetitan import ServiceTitanConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.servicetitan.resolver import NOT_FOUND, ServiceTitanResolver
from guardproxy.testing.fake_servicetitan import FakeServiceTitan
from tests.servers import free_port
from tests.servicetitan.helpers import SECRETS, TID1, TID2, ManualClock, MemoryCache, config, job

pytestmark = pytest.mark.anyio
JOB = 987654321


class Harness:
    """A resolver with an in-memory cache and the on_lookup results it reported."""

    def __init__(self, cfg: ServiceTitanConfig) -> None:
        self.clock = ManualClock()
        self.cache = MemoryCache(self.clock)
        self.lookups: list[str] = []
        self.resolver = ServiceTitanResolver(cfg, self.cache, self.lookups.append)

    async def fails(self, job_id: str, st_tenant_id: str | None = None) -> GuardError:
        with pytest.raises(GuardError) as caught:
            await self.resolver.tenant_for_job(job_id, st_tenant_id)
        return caught.value


@contextlib.asynccontextmanager
async def harness(base_url: str, **overrides: Any) -> AsyncIterator[Harness]:
    h = Harness(config(base_url, **overrides))
    try:
        yield h
    finally:
        await h.resolver.aclose()


async def test_fetches_maps_and_caches(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url) as h:
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID1}"
    key = f"st:job:any:{JOB}"
    assert (h.cache.value(key), h.cache.ttls[key]) == (f"st-{TID1}", 86400)
    assert h.lookups == ["fetched"]


async def test_cache_hit_avoids_the_network(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url) as h:
        await h.resolver.tenant_for_job(str(JOB), None)
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID1}"
    assert (fake.calls["jobs"], fake.calls["token"]) == (1, 1)
    assert h.lookups == ["fetched", "cache_hit"]


async def test_answer_cached_by_another_replica_is_used(fake: FakeServiceTitan, base_url: str) -> None:
    async with harness(base_url) as h:
        await h.cache.cache_set(f"st:job:{TID2}:{JOB}", "acme", 60)
        assert await h.resolver.tenant_for_job(str(JOB), str(TID2)) == "acme"
    assert fake.calls == {}
    assert h.lookups == ["cache_hit"]


async def test_a_cached_value_that_is_not_a_tenant_is_ignored(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url) as h:
        await h.cache.cache_set(f"st:job:any:{JOB}", "not a tenant", 60)
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID1}"
    assert h.cache.value(f"st:job:any:{JOB}") == f"st-{TID1}"


async def test_connections_are_tried_in_order(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID2, job(JOB))
    fake.add_job(TID1, job(1))
    fake.add_job(TID2, job(1))
    async with harness(base_url) as h:
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID2}"
        assert fake.jobs_calls_by_tenant == {TID1: 1, TID2: 1}
        assert await h.resolver.tenant_for_job("1", None) == f"st-{TID1}"
        assert fake.jobs_calls_by_tenant == {TID1: 2, TID2: 1}


async def test_tenant_header_picks_the_connection(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    fake.add_job(TID2, job(JOB))
    async with harness(base_url) as h:
        assert await h.resolver.tenant_for_job(str(JOB), f"00{TID2}") == f"st-{TID2}"
    assert fake.jobs_calls_by_tenant == {TID2: 1}
    assert h.cache.value(f"st:job:{TID2}:{JOB}") == f"st-{TID2}"


@pytest.mark.parametrize("header", ["acme", "", "-1", "0", "1.5", str(2**63), "99"])
async def test_bad_or_unknown_tenant_header_is_invalid_field(
    fake: FakeServiceTitan, base_url: str, header: str
) -> None:
    async with harness(base_url) as h:
        error = await h.fails(str(JOB), header)
    assert (error.kind, error.status) == (ErrorKind.INVALID_FIELD, 400)
    assert "ServiceTitan tenant" in error.message
    assert fake.calls == {}
    assert h.lookups == ["error"]


@pytest.mark.parametrize("job_id", ["abc", "", " ", "-1", "0", "+5", "1.5", "1e3", "12 3", "٣", str(2**63)])
async def test_job_id_must_be_a_positive_int64(fake: FakeServiceTitan, base_url: str, job_id: str) -> None:
    async with harness(base_url) as h:
        error = await h.fails(job_id)
    assert (error.kind, error.code, error.param) == (ErrorKind.INVALID_JOB_ID, "invalid_job_id", None)
    assert fake.calls == {}
    assert h.lookups == ["error"]


async def test_largest_int64_is_a_valid_job_id(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID2, job(2**63 - 1))
    async with harness(base_url) as h:
        assert await h.resolver.tenant_for_job(str(2**63 - 1), None) == f"st-{TID2}"


async def test_unknown_job_is_not_found_and_negative_cached(fake: FakeServiceTitan, base_url: str) -> None:
    async with harness(base_url) as h:
        error = await h.fails(str(JOB))
        assert (error.kind, error.code) == (ErrorKind.JOB_NOT_FOUND, "servicetitan_job_not_found")
        assert fake.jobs_calls_by_tenant == {TID1: 1, TID2: 1}
        key = f"st:job:any:{JOB}"
        assert (h.cache.value(key), h.cache.ttls[key]) == (NOT_FOUND, 60)
        assert (await h.fails(str(JOB))).kind == ErrorKind.JOB_NOT_FOUND
        assert fake.calls["jobs"] == 2
        h.clock.now += 61  # the negative entry expires: ServiceTitan is asked again
        fake.add_job(TID1, job(JOB))
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID1}"
    assert h.lookups == ["not_found", "cache_hit", "fetched"]


async def test_unmappable_job_is_invalid_tenant_and_negative_cached(
    fake: FakeServiceTitan, base_url: str
) -> None:
    fake.add_job(TID1, job(JOB, externalData=[{"key": "budget_tenant", "value": "ACME Corp"}]))
    async with harness(base_url, tenant_from="externalData:budget_tenant", negative_cache_ttl_s=30) as h:
        first = await h.fails(str(JOB))
        second = await h.fails(str(JOB))
    assert (first.kind, first.status) == (ErrorKind.INVALID_TENANT, 400)
    assert "'ACME Corp'" in first.message and second.message == first.message
    assert h.cache.ttls[f"st:job:any:{JOB}"] == 30
    assert fake.calls["jobs"] == 1
    assert h.lookups == ["error", "cache_hit"]


async def test_tenant_map_and_rules_apply(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url, tenant_from="customField:Budget Code", tenant_map={"ACME-HVAC": "acme"}) as h:
        assert await h.resolver.tenant_for_job(str(JOB), None) == "acme"


@pytest.mark.parametrize(("status", "retry_after_s", "expected"), [(429, 7, "7"), (429, None, "5"), (500, None, "5")])
async def test_throttled_or_failing_servicetitan_is_unavailable(
    fake: FakeServiceTitan, base_url: str, status: int, retry_after_s: int | None, expected: str
) -> None:
    fake.add_job(TID1, job(JOB))
    fake.fail_next("jobs", status, retry_after_s=retry_after_s)
    async with harness(base_url) as h:
        error = await h.fails(str(JOB), str(TID1))
        assert (error.kind, error.status, error.headers) == (
            ErrorKind.SERVICETITAN_UNAVAILABLE, 503, {"retry-after": expected}
        )
        assert h.cache.entries == {}  # never cached: the next call asks again
        assert await h.resolver.tenant_for_job(str(JOB), str(TID1)) == f"st-{TID1}"
    assert h.lookups == ["error", "fetched"]


async def test_unreachable_servicetitan_is_unavailable() -> None:
    async with harness(f"http://127.0.0.1:{free_port()}") as h:
        error = await h.fails(str(JOB))
    assert (error.kind, error.headers) == (ErrorKind.SERVICETITAN_UNAVAILABLE, {"retry-after": "5"})


async def test_a_failing_connection_does_not_hide_a_job_on_another(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID2, job(JOB))
    fake.fail_next("jobs", 503)
    async with harness(base_url) as h:
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID2}"


async def test_not_found_anywhere_but_one_failing_is_unavailable(fake: FakeServiceTitan, base_url: str) -> None:
    fake.fail_next("jobs", 429, retry_after_s=2)
    async with harness(base_url) as h:
        error = await h.fails(str(JOB))
    assert (error.kind, error.headers) == (ErrorKind.SERVICETITAN_UNAVAILABLE, {"retry-after": "2"})
    assert h.cache.entries == {}


async def test_unreachable_store_is_a_miss(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url) as h:
        h.cache.unavailable = True
        for _ in range(2):
            assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID1}"
    assert fake.calls["jobs"] == 2
    assert h.lookups == ["fetched", "fetched"]


async def test_zero_ttl_means_no_caching(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    async with harness(base_url, cache_ttl_s=0) as h:
        await h.resolver.tenant_for_job(str(JOB), None)
    assert h.cache.entries == {}


async def test_concurrent_lookups_of_one_job_are_one_request(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    fake.jobs_delay_s = 0.2
    async with harness(base_url) as h:
        results = await asyncio.gather(*(h.resolver.tenant_for_job(str(JOB), None) for _ in range(50)))
    assert results == [f"st-{TID1}"] * 50
    assert (fake.calls["jobs"], fake.calls["token"]) == (1, 1)
    assert h.lookups == ["fetched"] * 50


async def test_a_shared_failure_reaches_every_waiter(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(JOB))
    fake.fail_next("jobs", 429, retry_after_s=9)
    fake.jobs_delay_s = 0.2
    async with harness(base_url) as h:
        calls = (h.resolver.tenant_for_job(str(JOB), str(TID1)) for _ in range(10))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, GuardError) and r.headers == {"retry-after": "9"} for r in results)
        assert len({id(r) for r in results}) == 10  # each caller raises its own error
        assert fake.calls["jobs"] == 1
        # The failed lookup is forgotten: the next call asks again.
        assert await h.resolver.tenant_for_job(str(JOB), str(TID1)) == f"st-{TID1}"
    assert h.lookups == ["error"] * 10 + ["fetched"]


async def test_different_jobs_are_not_merged(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(1, businessUnitId=1))
    fake.add_job(TID1, job(2, businessUnitId=2))
    async with harness(base_url, tenant_from="businessUnitId") as h:
        results = await asyncio.gather(*(h.resolver.tenant_for_job(str(n), str(TID1)) for n in (1, 2, 1)))
    assert results == ["businessUnitId-1", "businessUnitId-2", "businessUnitId-1"]
    assert fake.calls["jobs"] == 2


async def test_fake_config_section_is_a_valid_config(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID2, job(JOB))
    h = Harness(config(base_url, **fake.config_section(base_url)))
    try:
        assert await h.resolver.tenant_for_job(str(JOB), None) == f"st-{TID2}"
    finally:
        await h.resolver.aclose()


async def test_secrets_and_tokens_never_reach_logs_or_errors(
    fake: FakeServiceTitan, base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.add_job(TID1, job(JOB))
    errors: list[GuardError] = []
    async with harness(base_url) as h:
        await h.resolver.tenant_for_job(str(JOB), str(TID1))
        fake.fail_next("jobs", 401, times=2)
        errors.append(await h.fails("2", str(TID1)))
        fake.fail_next("jobs", 500)
        errors.append(await h.fails("3", str(TID1)))
        fake.fail_next("token", 400)
        fake.expire_tokens()
        errors.append(await h.fails("4", str(TID1)))
    bad_secret = config(base_url, connections=[{"st_tenant_id": TID1, "client_id": "c", "client_secret": "x"}])
    h2 = Harness(bad_secret)
    try:
        errors.append(await h2.fails("5"))
    finally:
        await h2.resolver.aclose()
    assert [e.kind for e in errors] == [ErrorKind.SERVICETITAN_UNAVAILABLE] * 4
    assert "ServiceTitan" in caplog.text  # the failures were logged...
    leaks = [*SECRETS, *fake.issued_tokens()]
    assert len(leaks) > len(SECRETS)
    texts = [caplog.text, *(f"{e!s} {e!r} {e.body()!r}" for e in errors)]
    assert not [s for s in leaks for text in texts if s in text]  # ...without a secret or a token
