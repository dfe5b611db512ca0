"""Budget tenant for a ServiceTitan job id: validate, look in the shared cache, ask ServiceTitan once.

The core calls ``tenant_for_job`` with the job header and the optional tenant header and gets a
tenant id or a ``GuardError``:

- job id not a positive int64: ``INVALID_JOB_ID`` (400);
- tenant header not a positive integer, or not a configured connection: ``INVALID_FIELD`` (400);
- unknown on every connection tried: ``JOB_NOT_FOUND`` (400), cached for ``negative_cache_ttl_s``;
- job found but it names no valid tenant (see ``mapping``): ``INVALID_TENANT`` (400), cached for
  ``negative_cache_ttl_s`` too, so a misconfigured job does not hammer ServiceTitan;
- ServiceTitan unreachable, timing out, 5xx, 429 or refusing our credentials:
  ``SERVICETITAN_UNAVAILABLE`` (503) with ``retry-after`` (ServiceTitan's, else
  ``DEFAULT_RETRY_AFTER_S``). Never cached.

``on_lookup`` gets one result per call: ``cache_hit`` (answered from the cache, found or not),
``fetched`` (answered by a ServiceTitan lookup, including one shared with a concurrent call),
``not_found`` (ServiceTitan does not know the job) or ``error`` (anything else).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from guardproxy.config.servicetitan import INT64_MAX, TENANT_ID, Connection, ServiceTitanConfig
from guardproxy.config.validation import describe
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.servicetitan.client import (
    Clock,
    JobNotFound,
    ServiceTitanClient,
    ServiceTitanUnavailable,
)
from guardproxy.servicetitan.mapping import UnmappableJob, tenant_for

logger = logging.getLogger("guardproxy.servicetitan")

LookupResult = Literal["cache_hit", "fetched", "not_found", "error"]

DEFAULT_RETRY_AFTER_S = 5
#: Cached answers that are not a tenant id start with "!", which a tenant id never does.
NOT_FOUND = "!not_found"
INVALID_PREFIX = "!invalid:"
_DIGITS = re.compile(r"[0-9]{1,19}")


class SharedCache(Protocol):
    """The slice of the budget store the resolver uses (it adds its own key prefix)."""

    async def cache_get(self, key: str) -> str | None: ...
    async def cache_set(self, key: str, value: str, ttl_s: int) -> None: ...


@dataclass(frozen=True)
class Answer:
    """What one lookup found, shared by every caller waiting on it; each raises its own error."""

    result: LookupResult
    tenant: str | None = None
    kind: ErrorKind | None = None
    message: str = ""
    retry_after_s: int | None = None

    def tenant_or_raise(self) -> str:
        if self.tenant is not None:
            return self.tenant
        assert self.kind is not None
        headers = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else None
        raise GuardError(self.kind, self.message, headers=headers)


class ServiceTitanResolver:
    """Job id -> budget tenant, through the shared cache and ServiceTitan; ``aclose()`` when done."""

    def __init__(
        self,
        config: ServiceTitanConfig,
        cache: SharedCache,
        on_lookup: Callable[[str], None],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._config = config
        self._cache = cache
        self._on_lookup = on_lookup
        self._client = ServiceTitanClient(config, transport=transport, clock=clock)
        self._inflight: dict[str, asyncio.Task[Answer]] = {}

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._client.aclose()

    async def tenant_for_job(self, job_id: str, st_tenant_id: str | None) -> str:
        """The budget tenant of job ``job_id``, or a ``GuardError`` (see the module docstring)."""
        try:
            job = parse_job_id(job_id)
            connections = self.connections_for(st_tenant_id)
            scope = "any" if st_tenant_id is None else str(connections[0].st_tenant_id)
            answer = await self.answer(f"st:job:{scope}:{job}", job, connections)
        except Exception:
            self._on_lookup("error")
            raise
        self._on_lookup(answer.result)
        return answer.tenant_or_raise()

    async def answer(self, key: str, job: int, connections: tuple[Connection, ...]) -> Answer:
        """From the cache, else from the lookup of ``key`` already under way, else from a new one."""
        cached = await self.cached_answer(key, job)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self.look_up(key, job, connections))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        # shield: a caller that gives up must not cancel the lookup others wait for.
        return await asyncio.shield(task)

    def connections_for(self, st_tenant_id: str | None) -> tuple[Connection, ...]:
        if st_tenant_id is None:
            return self._config.connections
        text = st_tenant_id.strip(" \t")  # HTTP whitespace only: "1\n" is not a number
        if not _DIGITS.fullmatch(text) or not 0 < int(text) <= INT64_MAX:
            raise GuardError(
                ErrorKind.INVALID_FIELD,
                f"the ServiceTitan tenant id must be a positive whole number, got {describe(st_tenant_id)}",
            )
        connection = self._config.connection(int(text))
        if connection is None:
            raise GuardError(
                ErrorKind.INVALID_FIELD, f"ServiceTitan tenant {int(text)} is not configured on this proxy"
            )
        return (connection,)

    async def cached_answer(self, key: str, job: int) -> Answer | None:
        try:
            value = await self._cache.cache_get(key)
        except StoreUnavailable:
            logger.warning("store unavailable; looking ServiceTitan job %s up without the cache", job)
            return None
        if value is None:
            return None
        if value == NOT_FOUND:
            return Answer("cache_hit", kind=ErrorKind.JOB_NOT_FOUND, message=not_found_message(job))
        if value.startswith(INVALID_PREFIX):
            return Answer("cache_hit", kind=ErrorKind.INVALID_TENANT, message=value[len(INVALID_PREFIX) :])
        if TENANT_ID.fullmatch(value):
            return Answer("cache_hit", tenant=value)
        return None  # not written by us: ask again, and the answer overwrites it

    async def look_up(self, key: str, job: int, connections: tuple[Connection, ...]) -> Answer:
        """Ask each connection in order until one knows the job; cache what is worth caching."""
        unavailable: list[ServiceTitanUnavailable] = []
        for connection in connections:
            try:
                body = await self._client.get_job(connection, job)
            except JobNotFound:
                continue
            except ServiceTitanUnavailable as exc:
                # Another connection may still know the job; only "not found anywhere" needs them all.
                logger.warning("ServiceTitan lookup of job %s failed: %s", job, exc)
                unavailable.append(exc)
                continue
            try:
                tenant = tenant_for(body, connection.st_tenant_id, self._config)
            except UnmappableJob as exc:
                await self.remember(key, INVALID_PREFIX + str(exc), self._config.negative_cache_ttl_s)
                return Answer("error", kind=ErrorKind.INVALID_TENANT, message=str(exc))
            await self.remember(key, tenant, self._config.cache_ttl_s)
            return Answer("fetched", tenant=tenant)
        if unavailable:
            hints = [e.retry_after_s for e in unavailable if e.retry_after_s is not None]
            return Answer(
                "error", kind=ErrorKind.SERVICETITAN_UNAVAILABLE,
                message="ServiceTitan is unavailable; the job's tenant could not be looked up",
                retry_after_s=max(hints, default=DEFAULT_RETRY_AFTER_S),
            )
        await self.remember(key, NOT_FOUND, self._config.negative_cache_ttl_s)
        return Answer("not_found", kind=ErrorKind.JOB_NOT_FOUND, message=not_found_message(job))

    async def remember(self, key: str, value: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        try:
            await self._cache.cache_set(key, value, ttl_s)
        except StoreUnavailable:
            logger.warning("store unavailable; ServiceTitan answer for %s not cached", key)

    def _forget(self, key: str, task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # Mark a failure as seen even when every waiter gave up, so asyncio does not log it as lost.
        if not task.cancelled():
            task.exception()


def parse_job_id(raw: str) -> int:
    """A ServiceTitan job id (a positive int64) from a header value, or an ``INVALID_JOB_ID`` error."""
    text = raw.strip(" \t")  # HTTP whitespace only: "1\n" is not a job id
    if _DIGITS.fullmatch(text) and 0 < int(text) <= INT64_MAX:
        return int(text)
    raise GuardError(
        ErrorKind.INVALID_JOB_ID,
        f"the ServiceTitan job id must be a positive whole number (64-bit), got {describe(raw)}",
    )


def not_found_message(job: int) -> str:
    return f"ServiceTitan job {job} was not found on any configured ServiceTitan tenant"
