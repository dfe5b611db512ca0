"""The response cache (keys and values from ``http/cache.py``), bounded per tenant and in all, and a
small shared cache (e.g. ServiceTitan job -> tenant)."""

from __future__ import annotations

import time

from guardproxy.store.redis.base import StoreBase, text, translated


class Caches(StoreBase):
    """Cached answers and the shared key-value cache."""

    async def cached_response(self, tenant: str, digest: str) -> bytes | None:
        """The answer cached under ``digest`` for ``tenant``, if it has not expired."""
        async with translated():
            value = await self.client.get(self.keys(tenant).response(digest))
        return None if value is None else (value if isinstance(value, bytes) else value.encode())

    @property
    def cache_index(self) -> str:
        """Every cached answer by when it was stored (zset ``<tenant>/<digest>`` -> ms), oldest out first."""
        return f"{self.prefix}:rc:all"

    @property
    def cache_sizes(self) -> str:
        """Bytes of each cached answer (hash ``<tenant>/<digest>`` -> bytes)."""
        return f"{self.prefix}:rc:sizes"

    @property
    def cache_bytes(self) -> str:
        """Cached bytes held (hash ``total`` and each tenant -> bytes)."""
        return f"{self.prefix}:rc:bytes"

    async def cache_response(
        self, tenant: str, digest: str, value: bytes, ttl_s: int, *, max_tenant_bytes: int = 16 << 20,
        max_total_bytes: int = 256 << 20,
    ) -> bool:
        """Cache ``value`` for ``ttl_s`` within the bounds: the tenant's oldest answers go first to keep its
        cached bytes within ``max_tenant_bytes``, then everyone's oldest for ``max_total_bytes``. The
        bookkeeping (``cache_index``, ``cache_sizes``, ``cache_bytes``, the tenant's ``responses``) is
        not one transaction: concurrent stores may pass a bound by an entry or two for a moment.
        Returns whether it was stored (an answer larger than a bound is not)."""
        size = len(value)
        if size > max_tenant_bytes or size > max_total_bytes:
            return False
        k = self.keys(tenant)
        now_ms = int(time.time() * 1000)
        async with translated():
            expired: list[bytes] = await self.client.zrangebyscore(  # type: ignore[assignment]
                self.cache_index, "-inf", now_ms - ttl_s * 1000, start=0, num=1000)
            for member in expired:
                await self._forget_cached(text(member))  # expired: their bytes are free again
            await self._forget_cached(f"{tenant}/{digest}")  # stored again: counted once
            held = await self.client.hmget(self.cache_bytes, ["total", tenant])
            total, mine = int(held[0] or 0), int(held[1] or 0)
            while mine + size > max_tenant_bytes:
                oldest: list[bytes] = await self.client.zrange(k.responses, 0, 0)  # type: ignore[assignment]
                if not oldest:
                    break
                freed = await self._forget_cached(f"{tenant}/{text(oldest[0])}")
                mine, total = mine - freed, total - freed
            while total + size > max_total_bytes:
                oldest = await self.client.zrange(self.cache_index, 0, 0)  # type: ignore[assignment]
                if not oldest:
                    break
                owner = text(oldest[0]).partition("/")[0]
                freed = await self._forget_cached(text(oldest[0]))
                total -= freed
                mine -= freed if owner == tenant else 0
            await self.client.set(k.response(digest), value, ex=max(1, ttl_s))
            tenant_keys = self.client.pipeline(transaction=False)
            tenant_keys.zadd(k.responses, {digest: now_ms})
            tenant_keys.expire(k.responses, max(1, ttl_s))
            await tenant_keys.execute()
            shared = self.client.pipeline(transaction=False)
            shared.zadd(self.cache_index, {f"{tenant}/{digest}": now_ms})
            shared.hset(self.cache_sizes, f"{tenant}/{digest}", size)
            shared.hincrby(self.cache_bytes, "total", size)
            shared.hincrby(self.cache_bytes, tenant, size)
            await shared.execute()
        return True

    async def _forget_cached(self, member: str) -> int:
        """Drop one cached answer and its bookkeeping; returns the bytes it held (0: it was not counted)."""
        tenant, _, digest = member.partition("/")
        k = self.keys(tenant)
        size = int(await self.client.hget(self.cache_sizes, member) or 0)
        await self.client.delete(k.response(digest))
        await self.client.zrem(k.responses, digest)
        shared = self.client.pipeline(transaction=False)
        shared.zrem(self.cache_index, member)
        shared.hdel(self.cache_sizes, member)
        if size:
            shared.hincrby(self.cache_bytes, "total", -size)
            shared.hincrby(self.cache_bytes, tenant, -size)
        await shared.execute()
        return size

    async def cache_get(self, key: str) -> str | None:
        """Shared (cross-replica) cache, e.g. ServiceTitan job -> tenant."""
        async with translated():
            value = await self.client.get(f"{self.prefix}:cache:{key}")
        return None if value is None else text(value)

    async def cache_set(self, key: str, value: str, ttl_s: int) -> None:
        async with translated():
            await self.client.set(f"{self.prefix}:cache:{key}", value, ex=max(1, ttl_s))
