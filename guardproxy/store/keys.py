"""Tenant API keys created at runtime: made, listed and revoked through the admin API or the CLI.

A key is ``gp-`` and 32 random bytes in base64url; only its sha256 is stored (``KeyStore``).
Every replica finds a key it has not seen with one HGET and remembers the answer, known or unknown,
for at most ``CACHE_TTL_S``, so a new key works everywhere and a revoked one stops everywhere
within a second. ``last_used`` is written at most once a minute per key and process.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from guardproxy.budget.periods import iso_utc
from guardproxy.config.settings import hash_key
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.store.redis import BudgetStore, text, translated

KEY_PREFIX = "gp-"
KEY_BYTES = 32
#: How long a replica trusts what it last read about a key (found or not).
CACHE_TTL_S = 1.0
#: ``last_used`` is written at most this often per key and process.
TOUCH_EVERY_S = 60.0
#: Cache entries kept; beyond this the cache starts afresh (a flood of made-up keys cannot grow it).
CACHE_MAX = 10_000
NAME_MAX = 128


def new_key() -> str:
    """A fresh tenant key: ``gp-`` + base64url of 32 random bytes (43 characters, no padding)."""
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")


def parse_expiry(value: Any, now: datetime) -> datetime | None:
    """``expires_at`` as given to the API or CLI: ``None``, or an ISO 8601 time in the future (UTC if naive)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expires_at must be an ISO 8601 time such as 2027-01-31T00:00:00Z")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expires_at is not an ISO 8601 time: {value[:64]!r}") from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at <= now:
        raise ValueError(f"expires_at must be in the future, got {iso_utc(at)}")
    return at.astimezone(UTC)


@dataclass(frozen=True)
class KeyInfo:
    """What is kept about a key; never the key itself."""

    key_id: str
    tenant: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    digest: str
    last_used_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id, "tenant": self.tenant, "name": self.name, "prefix": self.prefix,
            "created_at": iso_utc(self.created_at),
            "expires_at": iso_utc(self.expires_at) if self.expires_at else None,
            "last_used_at": iso_utc(self.last_used_at) if self.last_used_at else None,
        }

    def _meta(self) -> str:
        return orjson.dumps({
            "name": self.name, "prefix": self.prefix, "digest": self.digest,
            "created_ms": _ms(self.created_at), "expires_ms": _ms(self.expires_at) if self.expires_at else None,
        }).decode()

    def _owner(self) -> str:
        return orjson.dumps({
            "tenant": self.tenant, "key_id": self.key_id,
            "expires_ms": _ms(self.expires_at) if self.expires_at else None,
        }).decode()


@dataclass(frozen=True)
class _Cached:
    until_s: float
    tenant: str | None
    key_id: str = ""
    expires_ms: int | None = None


class KeyRing:
    """Runtime tenant keys of one process: create, list, revoke, and find a presented key's tenant."""

    def __init__(self, store: BudgetStore, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.keys = KeyStore(store)
        self.clock = clock
        self._cache: dict[str, _Cached] = {}
        self._touched: dict[str, float] = {}

    async def create(self, tenant: str, name: str, expires_at: datetime | None = None) -> tuple[str, KeyInfo]:
        """A new key for ``tenant``: the key (shown once) and what is stored about it."""
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"name must be 1-{NAME_MAX} characters")
        key = new_key()
        info = KeyInfo(
            key_id="key_" + secrets.token_hex(8), tenant=tenant, name=name, prefix=key[:10],
            created_at=self.clock().replace(microsecond=0), expires_at=expires_at, digest=hash_key(key),
        )
        await self.keys.add(tenant, info.key_id, info.digest, info._owner(), info._meta())
        await self.keys.store.register_tenant(tenant)
        return key, info

    async def list(self, tenant: str) -> list[KeyInfo]:
        """The tenant's keys, oldest first."""
        metas, used = await self.keys.listed(tenant)
        out = []
        for key_id, raw in metas.items():
            meta = orjson.loads(raw)
            last = used.get(key_id)
            out.append(KeyInfo(
                key_id=key_id, tenant=tenant, name=meta["name"], prefix=meta["prefix"],
                created_at=_from_ms(meta["created_ms"]),
                expires_at=_from_ms(meta["expires_ms"]) if meta.get("expires_ms") else None,
                digest=meta["digest"], last_used_at=_from_ms(int(last)) if last else None,
            ))
        return sorted(out, key=lambda k: (k.created_at, k.key_id))

    async def revoke(self, tenant: str, key_id: str) -> KeyInfo | None:
        """Revoke one key; ``None`` if the tenant has no key with that id."""
        found = next((k for k in await self.list(tenant) if k.key_id == key_id), None)
        if found is not None:
            await self.keys.remove(tenant, key_id, found.digest)
            self._cache.pop(found.digest, None)
        return found

    async def tenant_for(self, digest: str) -> str | None:
        """The tenant of a runtime key (by ``hash_key`` digest), ``None`` if unknown, revoked or expired.

        Raises ``StoreUnavailable`` when the store cannot be asked and nothing fresh is cached.
        """
        now_s = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached.until_s <= now_s:
            raw = await self.keys.owner(digest)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            if raw is None:
                cached = _Cached(now_s + CACHE_TTL_S, None)
            else:
                owner = orjson.loads(raw)
                cached = _Cached(now_s + CACHE_TTL_S, owner["tenant"], owner["key_id"], owner.get("expires_ms"))
            self._cache[digest] = cached
        if cached.tenant is None:
            return None
        now_ms = _ms(self.clock())
        if cached.expires_ms is not None and now_ms >= cached.expires_ms:
            return None
        if now_s - self._touched.get(cached.key_id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[cached.key_id] = now_s
            # last_used is a hint: the call itself does not depend on writing it.
            with contextlib.suppress(StoreUnavailable):
                await self.keys.touch(cached.tenant, cached.key_id, now_ms)
        return cached.tenant


async def lookup_or_503(ring: KeyRing, digest: str) -> str | None:
    """``KeyRing.tenant_for`` with an unreachable store as 503: the key may be valid, so not 401."""
    try:
        return await ring.tenant_for(digest)
    except StoreUnavailable:
        raise GuardError(
            ErrorKind.STORE_UNAVAILABLE,
            "The budget store is unavailable, so this API key cannot be checked. Try again shortly.",
            headers={"retry-after": "1"},
        ) from None


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class KeyStore:
    """Tenant API keys created at runtime (``guardproxy.store.keys``), hashed, in the budget store's Redis.

    ``{prefix}:keys`` maps a key's sha256 digest to its owner, so an unknown key costs one HGET on
    any replica; ``{prefix}:{tenant}:keys`` holds each key's metadata by id and ``…:keys:used`` its
    last use. Every operation touches one key, so no two keys of different slots ever meet in one
    command (Redis Cluster).
    """

    def __init__(self, store: BudgetStore) -> None:
        self.client = store.client
        self.index = f"{store.prefix}:keys"
        self.store = store

    def _meta(self, tenant: str) -> str:
        return f"{self.store.keys(tenant).base}:keys"

    def _used(self, tenant: str) -> str:
        return f"{self.store.keys(tenant).base}:keys:used"

    async def owner(self, digest: str) -> str | None:
        """The index entry (JSON) of the key with this sha256 hex digest, or ``None``."""
        async with translated():
            value = await self.client.hget(self.index, digest)
        return None if value is None else text(value)

    async def add(self, tenant: str, key_id: str, digest: str, owner: str, meta: str) -> None:
        # Metadata first: a key is usable only once it is listed, never the other way round.
        async with translated():
            await self.client.hset(self._meta(tenant), key_id, meta)
            await self.client.hset(self.index, digest, owner)

    async def listed(self, tenant: str) -> tuple[dict[str, str], dict[str, str]]:
        """The tenant's keys' metadata (JSON by key id) and their last use (epoch ms by key id)."""
        async with translated():
            meta = await self.client.hgetall(self._meta(tenant))
            used = await self.client.hgetall(self._used(tenant))
        return ({text(a): text(b) for a, b in meta.items()}, {text(a): text(b) for a, b in used.items()})

    async def remove(self, tenant: str, key_id: str, digest: str) -> None:
        # Index first: the key stops working before its listing goes.
        async with translated():
            await self.client.hdel(self.index, digest)
            await self.client.hdel(self._meta(tenant), key_id)
            await self.client.hdel(self._used(tenant), key_id)

    async def touch(self, tenant: str, key_id: str, at_ms: int) -> None:
        async with translated():
            await self.client.hset(self._used(tenant), key_id, str(at_ms))
