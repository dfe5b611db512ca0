"""The semantic cache's entries (values from ``http/semantic.py``; one MULTI per write, no script)."""

from __future__ import annotations

from collections.abc import Container, Sequence

from guardproxy.store.redis.base import StoreBase, text, translated
from guardproxy.types import Micros


class SemanticEntries(StoreBase):
    """Each tenant's semantic entries, their version counter and hit tally."""

    async def semantic_version(self, tenant: str) -> int:
        """The counter of changes to ``tenant``'s semantic entries (0: none yet)."""
        async with translated():
            value = await self.client.get(self.keys(tenant).semantic_version)
        return int(value or 0)

    async def semantic_entries(
        self, tenant: str, since_ms: int, known: Container[str]
    ) -> tuple[int, dict[str, bytes | None]]:
        """The version, and the index values of the entries created at or after ``since_ms`` that are
        not in ``known`` (``None``: dropped meanwhile): one round trip, plus one when there are new ones."""
        k = self.keys(tenant)
        async with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(k.semantic_version)
                pipe.zrangebyscore(k.semantic_ids, since_ms, "+inf")
                version, ids = await pipe.execute()
            new = sorted({text(i) for i in ids if text(i) not in known})
            values = await self.client.hmget(k.semantic_index, new) if new else []
        raw = [None if v is None else v if isinstance(v, bytes) else v.encode() for v in values]
        return int(version or 0), dict(zip(new, raw, strict=True))

    async def add_semantic_entry(
        self, tenant: str, entry_id: str, index_value: bytes, answer: bytes, *, created_ms: int, ttl_s: int,
        max_entries: int,
    ) -> int:
        """Add one entry and drop the expired ones and the oldest beyond ``max_entries``; the version
        after the addition (the drop raises it once more when it drops anything)."""
        k = self.keys(tenant)
        ttl_ms = ttl_s * 1000
        async with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(k.semantic_index, entry_id, index_value)
                pipe.set(k.semantic_answer(entry_id), answer, px=ttl_ms)
                pipe.zadd(k.semantic_ids, {entry_id: created_ms})
                pipe.incr(k.semantic_version)
                for key in (k.semantic_index, k.semantic_ids, k.semantic_version):
                    pipe.pexpire(key, ttl_ms)
                pipe.zrangebyscore(k.semantic_ids, "-inf", f"({created_ms - ttl_ms}")
                pipe.zrange(k.semantic_ids, 0, -(max_entries + 1))
                replies = await pipe.execute()
            version = int(replies[3])
            stale = {text(i) for i in (*replies[-2], *replies[-1])}
            if stale:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.hdel(k.semantic_index, *stale)
                    pipe.zrem(k.semantic_ids, *stale)
                    pipe.delete(*(k.semantic_answer(i) for i in stale))
                    pipe.incr(k.semantic_version)
                    await pipe.execute()
        return version

    async def semantic_answer(self, tenant: str, entry_id: str) -> bytes | None:
        """One entry's answer, if it has not expired."""
        async with translated():
            value = await self.client.get(self.keys(tenant).semantic_answer(entry_id))
        return None if value is None else (value if isinstance(value, bytes) else value.encode())

    async def count_semantic_hit(self, tenant: str, saved_micros: Micros) -> None:
        k = self.keys(tenant)
        async with translated(), self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(k.semantic_stats, "hits", 1)
            pipe.hincrby(k.semantic_stats, "saved_micros", saved_micros)
            await pipe.execute()

    async def semantic_stats(self, tenants: Sequence[str]) -> dict[str, tuple[int, Micros]]:
        """Each tenant's semantic hits and the micro-USD they saved, since the store began (one round trip)."""
        async with translated():
            pipe = self.client.pipeline(transaction=False)
            for tenant in tenants:
                pipe.hmget(self.keys(tenant).semantic_stats, ["hits", "saved_micros"])
            replies = await pipe.execute() if tenants else []
        return {t: (int(hits or 0), int(saved or 0)) for t, (hits, saved) in zip(tenants, replies, strict=True)}
