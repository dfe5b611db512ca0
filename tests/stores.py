"""Every budget-store backend the contract suite (``tests/contract``) runs on, in one list.

A backend is a name and a factory that returns an empty ``BudgetStore`` for one test; the factory
gets the pytest request, so it can start (or reuse) the real server processes it needs through
fixtures. To run the whole contract suite on another deployment (Redis Cluster, Sentinel), append
one ``Backend`` to ``BACKENDS``; the ``budget_store`` fixture (tests/conftest.py) is parametrised
over this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis

from guardproxy.config.settings import StoreConfig
from guardproxy.store.embedded import EmbeddedRedis
from guardproxy.store.redis import BudgetStore

PREFIX = "gp"


@dataclass(frozen=True)
class Backend:
    name: str
    #: An empty store for one test (closed by the fixture).
    open: Callable[[pytest.FixtureRequest], BudgetStore]


def embedded(request: pytest.FixtureRequest) -> BudgetStore:
    """The in-process store guardproxy runs without ``store.redis_url`` (fakeredis, the scripts' Python twins)."""
    return BudgetStore(EmbeddedRedis(), PREFIX, embedded=True)


def real_redis(request: pytest.FixtureRequest) -> BudgetStore:
    """A real ``redis-server`` process, the suite's own (the session's ``redis_server`` fixture), through
    the client guardproxy builds for a ``redis://`` URL."""
    url: str = request.getfixturevalue("redis_server").url
    with redis.Redis.from_url(url) as sync:
        sync.flushall()
    return BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix=PREFIX))


def _from_url(request: pytest.FixtureRequest, fixture: str) -> BudgetStore:
    url: str = request.getfixturevalue(fixture)  # emptied by the fixture
    return BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix=PREFIX))


def sentinel(request: pytest.FixtureRequest) -> BudgetStore:
    """A primary and a replica behind three real ``redis-sentinel`` processes (``tests/redis_procs.py``)."""
    return _from_url(request, "sentinel_url")


def cluster(request: pytest.FixtureRequest) -> BudgetStore:
    """A 3-shard Redis Cluster of real cluster-mode ``redis-server`` processes (``tests/redis_procs.py``)."""
    return _from_url(request, "cluster_url")


BACKENDS: list[Backend] = [
    Backend("embedded", embedded), Backend("redis", real_redis), Backend("sentinel", sentinel),
    Backend("cluster", cluster),
]
