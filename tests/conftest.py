"""Shared fixtures: a real redis-server started by the suite, the fake upstream, proxy factories."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from guardproxy.config import Config, hash_key, parse_config
from guardproxy.fake_upstream import FakeUpstreamState, create_fake_upstream
from guardproxy.store import BudgetStore
from tests.redis_procs import RedisCluster3, SentinelSet
from tests.servers import free_port, serve_in_thread
from tests.servers import no_proxy_env as no_proxy_env
from tests.stores import BACKENDS, Backend

TENANT_KEY = "tk-acme-secret"
OTHER_TENANT_KEY = "tk-globex-secret"
SERVICE_KEY = "sk-service-secret"


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


class RedisServer:
    """A throwaway redis-server process on a free loopback port; ``persistent``: with an AOF, so that a
    restart keeps the data (without, a restarted Redis is empty and guardproxy refuses until told)."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `apt-get install -y redis-server` (.ci/run does it)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gp-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "yes" if self.persistent else "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


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


def config_dict(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A test config as YAML would give it; ``overrides`` replace top-level sections."""
    raw: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": f"{upstream_url}/v1", "api_key": "sk-upstream-secret"}},
        "models": {
            "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00, "max_output_tokens": 1000,
                       "downgrade_to": "gpt-4o-mini"},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60, "max_output_tokens": 1000},
        },
        "tenants": {
            "acme": {"api_keys": [hash_key(TENANT_KEY)], "daily_usd": 1, "monthly_usd": 20},
            "globex": {"api_keys": [hash_key(OTHER_TENANT_KEY)], "timezone": "America/Chicago"},
        },
        "auth": {"service_keys": [hash_key(SERVICE_KEY)]},
    }
    raw.update(overrides)
    return raw


def make_config(upstream_url: str, **overrides: Any) -> Config:
    return parse_config(config_dict(upstream_url, **overrides), {})


@pytest.fixture
def serve_proxy() -> Iterator[Callable[..., str]]:
    """Start ``create_app(config, **kw)`` on loopback; returns its base URL. Stopped after the test."""
    from guardproxy.app import create_app

    with contextlib.ExitStack() as stack:

        def start(config: Config, **kw: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(config, **kw)))

        yield start


def redis_int(url: str, key: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        value = client.get(key)
    finally:
        client.close()
    return int(value or 0)

