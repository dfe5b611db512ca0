"""The ServiceTitan client against the fake over loopback: tokens, retries, error translation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from guardproxy.config.servicetitan import ServiceTitanConfig
from guardproxy.servicetitan.client import (
    JobNotFound,
    ServiceTitanAuthFailed,
    ServiceTitanClient,
    ServiceTitanUnavailable,
)
from guardproxy.testing.fake_servicetitan import FakeServiceTitan
from tests.servers import free_port
from tests.servicetitan.helpers import SECRETS, TID1, TID2, ManualClock, config, job

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def open_client(cfg: ServiceTitanConfig, clock: ManualClock | None = None) -> AsyncIterator[
    ServiceTitanClient
]:
    client = ServiceTitanClient(cfg, clock=clock or ManualClock())
    try:
        yield client
    finally:
        await client.aclose()


async def test_fetches_a_job(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    async with open_client(cfg) as client:
        assert await client.get_job(cfg.connections[0], 42) == job(42)


async def test_token_is_cached_and_reused(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    async with open_client(cfg) as client:
        for _ in range(3):
            await client.get_job(cfg.connections[0], 42)
    assert (fake.tokens_issued, fake.calls["token"], fake.calls["jobs"]) == (1, 1, 3)


async def test_each_connection_has_its_own_token(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(1))
    fake.add_job(TID2, job(2))
    cfg = config(base_url)
    async with open_client(cfg) as client:
        assert (await client.get_job(cfg.connections[0], 1))["id"] == 1
        assert (await client.get_job(cfg.connections[1], 2))["id"] == 2
    assert fake.tokens_issued == 2


async def test_token_is_refreshed_60_s_before_it_expires(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    clock = ManualClock()
    async with open_client(cfg, clock) as client:
        await client.get_job(cfg.connections[0], 42)
        clock.now += fake.expires_in_s - 60 - 1
        await client.get_job(cfg.connections[0], 42)
        assert fake.tokens_issued == 1
        clock.now += 2
        await client.get_job(cfg.connections[0], 42)
        assert fake.tokens_issued == 2


async def test_concurrent_refreshes_become_one_request(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    async with open_client(cfg) as client, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(client.get_job, cfg.connections[0], 42)
    assert (fake.tokens_issued, fake.calls["jobs"]) == (1, 20)


async def test_a_401_refreshes_the_token_and_retries_once(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    async with open_client(cfg) as client:
        await client.get_job(cfg.connections[0], 42)
        fake.expire_tokens()  # the server forgot it early; the client still thinks it is valid
        assert (await client.get_job(cfg.connections[0], 42))["id"] == 42
    assert (fake.tokens_issued, fake.calls["jobs"]) == (2, 3)


async def test_a_second_401_is_an_error(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    fake.fail_next("jobs", 401, times=2)
    cfg = config(base_url)
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanAuthFailed, match="rejected"):
            await client.get_job(cfg.connections[0], 42)
    assert (fake.tokens_issued, fake.calls["jobs"]) == (2, 2)


async def test_refused_credentials_are_an_auth_failure(fake: FakeServiceTitan, base_url: str) -> None:
    cfg = config(base_url, connections=[{"st_tenant_id": TID1, "client_id": "cid-SECRET-client-1",
                                         "client_secret": "cs-SECRET-wrong"}])
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanAuthFailed, match="refused \\(400\\)") as caught:
            await client.get_job(cfg.connections[0], 42)
    assert "SECRET" not in str(caught.value) and "SECRET" not in repr(caught.value)


async def test_wrong_app_key_is_unavailable(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url, app_key="ak-SECRET-wrong")
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanUnavailable, match="unexpected status 403") as caught:
            await client.get_job(cfg.connections[0], 42)
    assert "SECRET" not in str(caught.value)


async def test_unknown_job_is_not_found(fake: FakeServiceTitan, base_url: str) -> None:
    cfg = config(base_url)
    async with open_client(cfg) as client:
        with pytest.raises(JobNotFound, match="not found \\(404\\)"):
            await client.get_job(cfg.connections[0], 42)


@pytest.mark.parametrize(
    ("endpoint", "status", "retry_after_s"),
    [("jobs", 429, 7), ("jobs", 429, None), ("jobs", 500, None), ("jobs", 503, 3), ("token", 502, None),
     ("token", 429, 11)],
)
async def test_throttling_and_server_errors_are_unavailable(
    fake: FakeServiceTitan, base_url: str, endpoint: Any, status: int, retry_after_s: int | None
) -> None:
    fake.add_job(TID1, job(42))
    fake.fail_next(endpoint, status, retry_after_s=retry_after_s)
    cfg = config(base_url)
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanUnavailable, match=str(status)) as caught:
            await client.get_job(cfg.connections[0], 42)
        assert caught.value.retry_after_s == retry_after_s
        assert (await client.get_job(cfg.connections[0], 42))["id"] == 42  # only one call failed


async def test_connection_refused_is_unavailable() -> None:
    cfg = config(f"http://127.0.0.1:{free_port()}")
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanUnavailable, match="could not reach ServiceTitan \\(ConnectError\\)"):
            await client.get_job(cfg.connections[0], 42)


async def test_timeout_is_unavailable(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    fake.jobs_delay_s = 1.0
    cfg = config(base_url, timeout_s=0.2)
    async with open_client(cfg) as client:
        with pytest.raises(ServiceTitanUnavailable, match=r"no answer within 0\.2 s") as caught:
            await client.get_job(cfg.connections[0], 42)
    # httpx's error holds the request and its Authorization header: it must not ride along.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_errors_never_show_secrets_or_tokens(fake: FakeServiceTitan, base_url: str) -> None:
    fake.add_job(TID1, job(42))
    cfg = config(base_url)
    errors: list[BaseException] = []
    async with open_client(cfg) as client:
        await client.get_job(cfg.connections[0], 42)
        for status in (401, 500, 429):
            fake.fail_next("jobs", status, times=2)
            try:
                await client.get_job(cfg.connections[0], 42)
            except ServiceTitanUnavailable as exc:
                errors.append(exc)
    assert len(errors) == 3
    leaks = [*SECRETS, *fake.issued_tokens()]
    for error in errors:
        text = f"{error!s} {error!r} {error.__cause__!r}"
        assert not [s for s in leaks if s in text], text
