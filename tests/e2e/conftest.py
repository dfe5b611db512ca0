"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.books import ProxyProcess
from tests.helpers import TENANT_KEY, Sdk
from tests.redis_procs import RedisServer


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """openai clients for a proxy URL, as acme, without retries; closed after the test, so that no
    pooled socket is left for the garbage collector to warn about in a later test."""
    clients: list[openai.OpenAI] = []

    def make(url: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, so that it can be paused or stopped."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ProxyProcess]]:
    """Start ``guardproxy serve`` subprocesses for a config dict; stopped after the test unless killed."""
    started: list[ProxyProcess] = []

    def start(config: dict[str, Any]) -> ProxyProcess:
        started.append(ProxyProcess(config, tmp_path))
        started[-1].wait_serving()
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
