"""Runtime API keys (``admin/keys.py``): the index of key digests and each tenant's keys."""

from __future__ import annotations

from guardproxy.budget.records import KeyListing
from guardproxy.store.redis.base import StoreBase, text, translated


class ApiKeys(StoreBase):
    """Keys made at runtime, looked up by digest."""

    # ``{prefix}:keys`` maps a key's sha256 digest to its owner, so an unknown key costs one HGET on any
    # replica; ``{prefix}:{tenant}:keys`` holds each key's metadata by id and ``…:keys:used`` its last
    # use. Every command touches one key, so no two keys of different slots meet in one (Redis Cluster).

    def _key_index(self) -> str:
        return f"{self.prefix}:keys"

    async def key_owner(self, digest: str) -> str | None:
        """The index entry (JSON) of the key with this sha256 hex digest, or ``None``."""
        async with translated():
            value = await self.client.hget(self._key_index(), digest)
        return None if value is None else text(value)

    async def add_key(self, tenant: str, key_id: str, digest: str, owner: str, meta: str) -> None:
        # Metadata first: a key is usable only once it is listed, never the other way round.
        async with translated():
            await self.client.hset(self.keys(tenant).api_keys, key_id, meta)
            await self.client.hset(self._key_index(), digest, owner)

    async def listed_keys(self, tenant: str) -> KeyListing:
        """The tenant's keys' metadata (JSON by key id) and their last use (epoch ms by key id)."""
        k = self.keys(tenant)
        async with translated():
            meta = await self.client.hgetall(k.api_keys)
            used = await self.client.hgetall(k.api_keys_used)
        return KeyListing({text(a): text(b) for a, b in meta.items()}, {text(a): text(b) for a, b in used.items()})

    async def remove_key(self, tenant: str, key_id: str, digest: str) -> None:
        # Index first: the key stops working before its listing goes.
        k = self.keys(tenant)
        async with translated():
            await self.client.hdel(self._key_index(), digest)
            await self.client.hdel(k.api_keys, key_id)
            await self.client.hdel(k.api_keys_used, key_id)

    async def touch_key(self, tenant: str, key_id: str, at_ms: int) -> None:
        async with translated():
            await self.client.hset(self.keys(tenant).api_keys_used, key_id, str(at_ms))
