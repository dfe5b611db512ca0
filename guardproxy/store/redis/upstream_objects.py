"""What the proxy remembers of work living upstream: the objects each tenant created through it
(``http/objects.py``), and calls settled when they end (batches, background responses)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from guardproxy.store.redis.base import StoreBase, text, translated


class UpstreamObjects(StoreBase):
    """Each tenant's objects and its open deferred calls."""

    # -- objects created through the proxy, per tenant (``objects.py``) ----------------------------

    async def record_objects(self, tenant: str, object_ids: Sequence[str], upstream: str, ttl_s: int | None) -> None:
        """Note that ``tenant`` created ``object_ids`` on ``upstream`` (kept ``ttl_s``, or until forgotten)."""
        if not object_ids:
            return
        keys = self.keys(tenant)
        async with translated(), self.client.pipeline(transaction=False) as pipe:
            for object_id in object_ids:
                pipe.set(keys.stored_object(object_id), upstream, ex=ttl_s)
            await pipe.execute()

    async def object_upstreams(self, tenant: str, object_ids: Sequence[str]) -> list[str | None]:
        """For each id, the upstream holding it if ``tenant`` created it through the proxy, else ``None``."""
        if not object_ids:
            return []
        keys = self.keys(tenant)
        async with translated():
            values = await self.client.mget([keys.stored_object(object_id) for object_id in object_ids])
        return [None if value is None else text(value) for value in values]

    async def forget_object(self, tenant: str, object_id: str) -> None:
        """The object was deleted: it is no longer the tenant's."""
        async with translated():
            await self.client.delete(self.keys(tenant).stored_object(object_id))

    # -- calls settled when they end: batches, background responses (``batches.py``) -------------

    async def open_deferred(self, tenant: str, object_id: str, fields: Mapping[str, str | int]) -> None:
        """Keep the reservation of a call that ends later (a batch, a background response) and put it
        on the tenant's list of open ones (one transaction)."""
        keys = self.keys(tenant)
        async with translated(), self.client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.deferred(object_id), mapping={name: str(value) for name, value in fields.items()})
            pipe.sadd(keys.deferred_open, object_id)
            await pipe.execute()

    async def deferred_record(self, tenant: str, object_id: str) -> dict[str, str] | None:
        """What ``open_deferred`` and ``close_deferred`` wrote for the call, or ``None``."""
        async with translated():
            fields = await self.client.hgetall(self.keys(tenant).deferred(object_id))
        return {text(k): text(v) for k, v in fields.items()} if fields else None

    async def open_deferred_ids(self, tenant: str) -> list[str]:
        async with translated():
            members = await self.client.smembers(self.keys(tenant).deferred_open)
        return sorted(text(m) for m in members)

    async def close_deferred(self, tenant: str, object_id: str, fields: Mapping[str, str | int], keep_s: int) -> None:
        """The call has settled: note how, keep the note ``keep_s``, and take it off the open list."""
        keys = self.keys(tenant)
        async with translated(), self.client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.deferred(object_id), mapping={name: str(value) for name, value in fields.items()})
            pipe.expire(keys.deferred(object_id), keep_s)
            pipe.srem(keys.deferred_open, object_id)
            await pipe.execute()
