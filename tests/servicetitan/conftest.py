"""Fixtures: one fake ServiceTitan on a real loopback port for the session, fresh state per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guardproxy.testing.fake_servicetitan import FakeServiceTitan
from tests.servers import serve_in_thread
from tests.servicetitan.helpers import APP_KEY, CLIENTS


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Switch:
    """An ASGI app that forwards to ``target``, so each test gets a fresh fake on the same server."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.target(scope, receive, send)


@pytest.fixture(scope="session")
def server() -> Iterator[tuple[Switch, str]]:
    switch = Switch(FakeServiceTitan().app)
    with serve_in_thread(switch) as base_url:
        yield switch, base_url


@pytest.fixture
def base_url(server: tuple[Switch, str]) -> str:
    return server[1]


@pytest.fixture
def fake(server: tuple[Switch, str]) -> FakeServiceTitan:
    """A fake that knows both test connections and no jobs yet."""
    fake = FakeServiceTitan(app_key=APP_KEY)
    for st_tenant_id, client_id, client_secret in CLIENTS:
        fake.add_client(st_tenant_id, client_id, client_secret)
    server[0].target = fake.app
    return fake
