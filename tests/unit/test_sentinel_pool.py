"""The Sentinel pool's wiring: its connections report failures to it, over TLS too (no server needed).

What it does with real Sentinels (one discovery for a burst of connections, failovers followed) is in
tests/e2e/test_sentinel_discovery.py.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import MasterNotFoundError

from guardproxy.store import client as store_client
from guardproxy.store.client import DeadlineRedis, StoreConnection, connect


def sentinel_pool(connection: StoreConnection) -> store_client._SentinelPool:
    assert isinstance(connection.client, DeadlineRedis)
    pool = connection.client.connection_pool
    assert isinstance(pool, store_client._SentinelPool)
    return pool


@pytest.mark.parametrize(("url", "tls"), [("redis+sentinel://127.0.0.1:1/m", False),
                                          ("rediss+sentinel://127.0.0.1:1/m", True)])
def test_the_sentinel_pool_opens_connections_that_report_failures_to_it_over_tls_too(url: str, tls: bool) -> None:
    pool = sentinel_pool(connect(url))
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    assert isinstance(connection, store_client._SentinelConnection)
    assert isinstance(connection, SSLConnection) == tls


@pytest.mark.anyio
async def test_concurrent_connects_share_one_failed_discovery_and_the_next_asks_again() -> None:
    """No Sentinel answers (port 1): every waiter gets the one discovery's MasterNotFoundError, and a
    failed discovery is not kept."""
    connection = connect("redis+sentinel://127.0.0.1:1/m")
    pool = sentinel_pool(connection)
    try:
        results = await asyncio.gather(*(pool.get_master_address() for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, MasterNotFoundError) for r in results)
        assert len({id(r) for r in results}) == 1  # one discovery's error, not 20
        first = pool._lookup
        with pytest.raises(MasterNotFoundError):
            await pool.get_master_address()
        assert pool._lookup is not first
    finally:
        await connection.aclose()
