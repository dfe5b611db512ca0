"""The server behind the store: closing the client, ``/readyz``'s probes (ping, a write), and
Sentinel's current primary."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio.cluster import RedisCluster

from guardproxy.errors import StoreUnavailable
from guardproxy.store.redis.base import StoreBase, translated
from guardproxy.store.sqlite import SqliteClient

#: How long /readyz's probe key lives (it is rewritten at every probe).
READY_PROBE_TTL_MS = 60_000


class Server(StoreBase):
    """The store's connection to its server, and whether that server takes writes now."""

    @property
    def embedded(self) -> bool:
        """The SQLite store (one file on this machine), not Redis."""
        return isinstance(self.client, SqliteClient)

    async def aclose(self) -> None:
        if self.connection is not None:
            await self.connection.aclose()
        elif isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        async with translated():
            await self.client.ping()

    @property
    def follows_failovers(self) -> bool:
        """Behind Sentinel: the primary may change, and ``primary`` says when it did."""
        return self.connection is not None and self.connection.kind == "sentinel"

    async def primary(self) -> str | None:
        """Behind Sentinel, the primary's address now (a change is a failover); ``None`` elsewhere or
        when no Sentinel answers."""
        if self.connection is None or self.connection.kind != "sentinel":
            return None
        return await self.connection.rediscover()

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` (saying why) unless the store takes writes now, as settlements need.

        A write to a ``{readyz}`` probe key: fails on a replica (READONLY), a primary short of replicas
        (NOREPLICAS) or a cluster slot without a shard. With ``min_replica_acks`` the probe also waits for
        that many replicas, as settlements do. On a cluster, every primary must report ``cluster_state:ok``.
        """
        key = f"{self.prefix}:{{readyz}}:probe"
        async with translated():
            if isinstance(self.client, RedisCluster):
                states = await self.client.cluster_info(target_nodes=RedisCluster.PRIMARIES)
                failing = sorted(node for node, info in _per_node(states).items()
                                 if info.get("cluster_state") != "ok")
                if failing:
                    raise StoreUnavailable(f"cluster_state is not ok on {', '.join(failing)}")
                await self.client.set(key, str(time.time()), px=READY_PROBE_TTL_MS)
                return
            await self._replicated(lambda client: client.set(key, str(time.time()), px=READY_PROBE_TTL_MS))


def _per_node(states: Any) -> dict[str, dict[str, Any]]:
    """``CLUSTER INFO`` answers keyed by node (one node's answer comes back unkeyed)."""
    if isinstance(states, dict) and "cluster_state" in states:
        return {"node": states}
    return {str(node): info for node, info in dict(states).items()}
