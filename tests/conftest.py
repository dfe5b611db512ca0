"""Shared fixtures: a real redis-server started by the suite, the fake upstream, proxy factories."""

from __future__ import annotations

import contextlib
import fcntl
import os
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


def timed(item: pytest.Item) -> bool:
    """A test whose faults or assertions hang on wall-clock time: a ``slow`` test (soak, failover, SIGSTOP,
    kill -9, leases, deadlines) unless it asserts only counts (``counts_only``: a cap under a burst)."""
    return item.get_closest_marker("slow") is not None and item.get_closest_marker("counts_only") is None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``-n 3 --dist worksteal``), the timed tests first: the first
    worker's share begins with all of them (work is stolen from the end of a share), so they run one
    after the other from the start while the other workers run the rest. Every worker sorts alike."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not timed(item))  # stable: the suite's order otherwise


@pytest.fixture(autouse=True)
def one_timed_test_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist, a timed test holds a lock shared by the run's workers, from before its fixtures
    start a process until after they stopped it: no two of them compete for the 2 cores."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and timed(request.node)):
        yield
        return
    lock = tmp_path_factory.getbasetemp().parent / "timed-tests.lock"  # each worker's basetemp is in the run's
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


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


