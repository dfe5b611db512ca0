"""Shared fixtures: a real redis-server started by the suite, the fake upstream, proxy factories."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from guardproxy.config.settings import Config
from guardproxy.store.redis import BudgetStore
from guardproxy.testing.fake_upstream import FakeUpstreamState, create_fake_upstream
from tests.helpers import OTHER_TENANT_KEY as OTHER_TENANT_KEY
from tests.helpers import SERVICE_KEY as SERVICE_KEY
from tests.helpers import TENANT_KEY as TENANT_KEY
from tests.helpers import config_dict as config_dict
from tests.helpers import make_config as make_config
from tests.helpers import redis_int as redis_int
from tests.redis_procs import RedisCluster3, RedisServer, SentinelSet
from tests.servers import no_proxy_env as no_proxy_env
from tests.servers import serve_in_thread
from tests.stores import BACKENDS, Backend


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``slow`` tests (load, soak and fault tests: failovers, SIGSTOP, kill -9, leases, with bounds on
    time) form one ``xdist_group``: under ``make test``'s ``-n 3 --dist loadgroup`` they run one after
    the other in one worker, so no two of them compete for the 2 cores; the other workers run the rest."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def journal_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own default journal directory (``$XDG_STATE_HOME/guardproxy/journal``), also for the
    proxies it starts as subprocesses: no test adopts the unwritten charges another left behind."""
    home = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home / "guardproxy" / "journal"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A real Redis, emptied for each test."""
    if redis_server.process is None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
async def budget_store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    """An empty budget store on each backend of ``tests/stores.py`` in turn (for ``@pytest.mark.anyio`` tests)."""
    backend: Backend = request.param
    store = backend.open(request)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    """A primary, a replica and three redis-sentinel processes, started once for the session."""
    topology = SentinelSet()
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def sentinel_url(sentinel_set: SentinelSet) -> str:
    """``redis+sentinel://`` for the session's Sentinel set, its data emptied for each test."""
    sentinel_set.wait_healthy()
    sentinel_set.flush()
    return sentinel_set.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster3]:
    """A 3-shard Redis Cluster of cluster-mode redis-server processes, started once for the session."""
    cluster = RedisCluster3()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster3) -> str:
    """``redis+cluster://`` for the session's cluster, emptied for each test."""
    redis_cluster.wait_ok()
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def fake_state() -> FakeUpstreamState:
    return FakeUpstreamState()


@pytest.fixture
def upstream_url(fake_state: FakeUpstreamState) -> Iterator[str]:
    with serve_in_thread(create_fake_upstream(fake_state)) as url:
        yield url


@pytest.fixture
def serve_proxy() -> Iterator[Callable[..., str]]:
    """Start ``create_app(config, **kw)`` on loopback; returns its base URL. Stopped after the test."""
    from guardproxy.app import create_app

    with contextlib.ExitStack() as stack:

        def start(config: Config, **kw: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(config, **kw)))

        yield start


