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
from decimal import Decimal
from typing import Any

import orjson

from guardproxy.budget.levels import WINDOW_FIELDS, WINDOWS, KeyBudget, WindowCaps
from guardproxy.budget.periods import iso_utc
from guardproxy.budget.pricing import usd_to_micros
from guardproxy.budget.records import KeyListing
from guardproxy.config.settings import hash_key
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.store.protocol import Store

KEY_PREFIX = "gp-"
KEY_BYTES = 32
#: How long a replica trusts what it last read about a key (found or not).
CACHE_TTL_S = 1.0
#: ``last_used`` is written at most this often per key and process.
TOUCH_EVERY_S = 60.0
#: Cache entries kept; beyond this the cache starts afresh (a flood of made-up keys cannot grow it).
CACHE_MAX = 10_000
NAME_MAX = 128
#: The largest cap a key may be given through the API or CLI (USD).
MAX_KEY_USD = Decimal(10**9)


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
    #: The key's own budget (caps per window, allowed models); ``None``: none.
    budget: KeyBudget | None = None

    def as_json(self) -> dict[str, Any]:
        budget = self.budget or KeyBudget()
        return {
            "key_id": self.key_id, "tenant": self.tenant, "name": self.name, "prefix": self.prefix,
            "created_at": iso_utc(self.created_at),
            "expires_at": iso_utc(self.expires_at) if self.expires_at else None,
            "last_used_at": iso_utc(self.last_used_at) if self.last_used_at else None,
            **budget.caps.as_json(), "models": list(budget.models) or None,
        }

    def _meta(self) -> str:
        return orjson.dumps({
            "name": self.name, "prefix": self.prefix, "digest": self.digest,
            "created_ms": _ms(self.created_at), "expires_ms": _ms(self.expires_at) if self.expires_at else None,
            **_budget_fields(self.budget),
        }).decode()

    def _owner(self) -> str:
        return orjson.dumps({
            "tenant": self.tenant, "key_id": self.key_id,
            "expires_ms": _ms(self.expires_at) if self.expires_at else None, **_budget_fields(self.budget),
        }).decode()


def _budget_fields(budget: KeyBudget | None) -> dict[str, Any]:
    """A key budget as stored: ``budget: {hour: micros, ..., models: [...]}`` (nothing when none)."""
    if budget is None:
        return {}
    return {"budget": {**{w: c for w, c in budget.caps.items()}, "models": list(budget.models)}}


def _budget_of(stored: dict[str, Any]) -> KeyBudget | None:
    raw = stored.get("budget")
    if not raw:
        return None
    return KeyBudget(WindowCaps(**{w: raw.get(w) for w in WINDOWS}), tuple(raw.get("models") or ()))


def key_budget_from_json(body: dict[str, Any]) -> KeyBudget | None:
    """``hourly_usd``, ``daily_usd``, ``weekly_usd``, ``monthly_usd`` (decimal USD, or null) and ``models``
    (model ids) of an admin API or CLI request; ``None`` when none is given. Raises ``ValueError``
    naming the field at fault."""
    caps: dict[str, int | None] = {}
    for window in WINDOWS:
        value = body.get(WINDOW_FIELDS[window])
        if value is None:
            caps[window] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{WINDOW_FIELDS[window]} must be a number of USD, e.g. 5 or \"2.50\"")
        try:
            usd = Decimal(str(value))
        except ArithmeticError:
            raise ValueError(f"{WINDOW_FIELDS[window]} must be a number of USD, e.g. 5 or \"2.50\"") from None
        if not usd.is_finite() or usd < 0 or usd > MAX_KEY_USD:
            raise ValueError(f"{WINDOW_FIELDS[window]} must be between 0 and {MAX_KEY_USD} USD")
        caps[window] = usd_to_micros(usd)
    models = body.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
                               or len(models) > 100):
        raise ValueError("models must be a list of model ids, e.g. [\"gpt-4o-mini\"]")
    budget = KeyBudget(WindowCaps(**caps), tuple(models or ()))
    return budget if budget.caps or budget.models else None


@dataclass(frozen=True)
class _Cached:
    until_s: float
    tenant: str | None
    key_id: str = ""
    expires_ms: int | None = None
    budget: KeyBudget | None = None


class KeyRing:
    """Runtime tenant keys of one process: create, list, revoke, and find a presented key's tenant."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.keys = KeyStore(store)
        self.clock = clock
        self._cache: dict[str, _Cached] = {}
        self._touched: dict[str, float] = {}

    async def create(
        self, tenant: str, name: str, expires_at: datetime | None = None, budget: KeyBudget | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key for ``tenant``: the key (shown once) and what is stored about it (``budget``: its own
        caps and allowed models)."""
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"name must be 1-{NAME_MAX} characters")
        key = new_key()
        info = KeyInfo(
            key_id="key_" + secrets.token_hex(8), tenant=tenant, name=name, prefix=key[:10],
            created_at=self.clock().replace(microsecond=0), expires_at=expires_at, digest=hash_key(key),
            budget=budget,
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
                digest=meta["digest"], last_used_at=_from_ms(int(last)) if last else None, budget=_budget_of(meta),
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
                cached = _Cached(now_s + CACHE_TTL_S, owner["tenant"], owner["key_id"], owner.get("expires_ms"),
                                 _budget_of(owner))
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

    def budget_of(self, digest: str) -> KeyBudget | None:
        """The budget of a runtime key as ``tenant_for`` last read it (``None``: none, or not known)."""
        cached = self._cache.get(digest)
        return cached.budget if cached is not None else None


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
    """Tenant API keys created at runtime (``guardproxy.store.keys``), hashed, in the budget store (its
    ``*_key`` methods say how they are kept)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def owner(self, digest: str) -> str | None:
        """The index entry (JSON) of the key with this sha256 hex digest, or ``None``."""
        return await self.store.key_owner(digest)

    async def add(self, tenant: str, key_id: str, digest: str, owner: str, meta: str) -> None:
        await self.store.add_key(tenant, key_id, digest, owner, meta)

    async def listed(self, tenant: str) -> KeyListing:
        """The tenant's keys' metadata (JSON by key id) and their last use (epoch ms by key id)."""
        return await self.store.listed_keys(tenant)

    async def remove(self, tenant: str, key_id: str, digest: str) -> None:
        await self.store.remove_key(tenant, key_id, digest)

    async def touch(self, tenant: str, key_id: str, at_ms: int) -> None:
        await self.store.touch_key(tenant, key_id, at_ms)
