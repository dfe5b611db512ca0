"""Fixtures of the attack suite: a proxy with passthrough on, and a second server playing the attacker."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest

from guardproxy.config.settings import Config
from guardproxy.testing.fake_upstream import FakeUpstreamState, create_fake_upstream
from tests.helpers import make_config
from tests.security.wire import ADMIN_KEY
from tests.servers import serve_in_thread

CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello to the dispatcher."}]})


@pytest.fixture
def evil_state() -> FakeUpstreamState:
    return FakeUpstreamState()


@pytest.fixture
def evil_url(evil_state: FakeUpstreamState) -> Iterator[str]:
    """A server the attacker controls: nothing guardproxy does may ever reach it."""
    with serve_in_thread(create_fake_upstream(evil_state)) as url:
        yield url


@pytest.fixture
def passthrough_config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, unbudgeted_paths="passthrough",
                       admin={"api_key": ADMIN_KEY})


@pytest.fixture
def passthrough_url(passthrough_config: Config, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(passthrough_config)
