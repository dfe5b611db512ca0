"""Shared test values: credentials with recognisable secrets, jobs, a config, an in-memory cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from guardproxy.config.servicetitan import ServiceTitanConfig, parse_servicetitan
from guardproxy.errors import StoreUnavailable

APP_KEY = "ak-SECRET-app-key-0001"
TID1, TID2 = 1234567, 7654321
SECRET1, SECRET2 = "cs-SECRET-client-secret-1", "cs-SECRET-client-secret-2"
CLIENTS = [(TID1, "cid-SECRET-client-1", SECRET1), (TID2, "cid-SECRET-client-2", SECRET2)]
SECRETS = [APP_KEY, SECRET1, SECRET2, CLIENTS[0][1], CLIENTS[1][1]]


def job(job_id: int = 987654321, **fields: Any) -> dict[str, Any]:
    """A job in ServiceTitan's shape (servicetitan.md), with ``fields`` overriding."""
    body: dict[str, Any] = {
        "id": job_id, "jobNumber": str(job_id), "customerId": 1001, "locationId": 1101,
        "jobStatus": "Scheduled", "businessUnitId": 10, "jobTypeId": 55, "campaignId": 7,
        "customFields": [{"typeId": 1, "name": "Budget Code", "value": "ACME-HVAC"}],
        "externalData": [{"key": "budget_tenant", "value": "acme"}],
    }
    body.update(fields)
    return body


def section(base_url: str, **overrides: Any) -> dict[str, Any]:
    """A raw ``servicetitan`` section for the fake at ``base_url`` with both connections."""
    raw: dict[str, Any] = {
        "environment": "integration",
        "auth_url": f"{base_url}/connect/token",
        "api_url": base_url,
        "app_key": APP_KEY,
        "connections": [{"st_tenant_id": t, "client_id": c, "client_secret": s} for t, c, s in CLIENTS],
    }
    raw.update(overrides)
    return raw


def config(base_url: str, **overrides: Any) -> ServiceTitanConfig:
    parsed = parse_servicetitan(section(base_url, **overrides), "servicetitan")
    assert parsed is not None
    return parsed


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryCache:
    """``SharedCache`` in a dict, honouring TTLs on an injectable clock; can play an unreachable store."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.entries: dict[str, tuple[str, float]] = {}
        self.ttls: dict[str, int] = {}
        self.unavailable = False

    async def cache_get(self, key: str) -> str | None:
        if self.unavailable:
            raise StoreUnavailable("redis down")
        entry = self.entries.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    async def cache_set(self, key: str, value: str, ttl_s: int) -> None:
        if self.unavailable:
            raise StoreUnavailable("redis down")
        self.entries[key] = (value, self.clock() + ttl_s)
        self.ttls[key] = ttl_s

    def value(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry[0] if entry else None
