"""An async client for the two ServiceTitan calls guardproxy makes: a token, and a job.

Tokens (OAuth2 client credentials) are kept per connection until ``refresh_margin_s`` before they
expire; concurrent refreshes of one connection become one request. A 401 on an API call refreshes
the token once and retries once. httpx errors and unwanted statuses become this module's
exceptions in ``exchange`` only. No message, log line or repr made here holds
a secret or a token: they travel only in request bodies and headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from guardproxy.config.servicetitan import Connection, ServiceTitanConfig

logger = logging.getLogger("guardproxy.servicetitan")

Clock = Callable[[], float]


class ServiceTitanError(Exception):
    """Base of the errors of this client."""


class JobNotFound(ServiceTitanError):
    """The connection's ServiceTitan tenant does not know the job (404, or 400 for an id it rejects)."""


class ServiceTitanUnavailable(ServiceTitanError):
    """No usable answer: unreachable, timed out, 5xx, 429 or an unexpected status or body.

    ``retry_after_s`` is ServiceTitan's ``Retry-After`` when it sent one.
    """

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceTitanAuthFailed(ServiceTitanUnavailable):
    """ServiceTitan refused the credentials (token endpoint 4xx, or 401 again with a fresh token)."""


class TokenRejected(ServiceTitanAuthFailed):
    """An API call answered 401; ``get_job`` refreshes the token and retries once."""


@dataclass
class Token:
    value: str = field(repr=False)
    refresh_at: float  # on the client's clock


class ServiceTitanClient:
    """Jobs by id over one pooled httpx client; ``aclose()`` when done.

    ``clock`` (monotonic seconds) is injectable so tests can expire tokens without waiting.
    """

    def __init__(
        self,
        config: ServiceTitanConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        refresh_margin_s: float = 60.0,
    ) -> None:
        self._config = config
        self._clock = clock
        self._refresh_margin_s = refresh_margin_s
        self._http = httpx.AsyncClient(timeout=config.timeout_s, transport=transport)
        self._tokens: dict[int, Token] = {}
        self._token_locks = {c.st_tenant_id: asyncio.Lock() for c in config.connections}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_job(self, connection: Connection, job_id: int) -> dict[str, Any]:
        """The job as ServiceTitan returns it; raises ``JobNotFound`` or ``ServiceTitanUnavailable``."""
        tid = connection.st_tenant_id
        url = f"{self._config.api_url}/jpm/v2/tenant/{tid}/jobs/{job_id}"
        what = f"job lookup on ServiceTitan tenant {tid}"
        token = await self.token(connection)
        try:
            response = await self.exchange("GET", url, what, headers=self.api_headers(token))
        except TokenRejected:
            # The token expired early or was revoked: one fresh token, one more try (a second
            # TokenRejected propagates; it is a ServiceTitanAuthFailed).
            token = await self.token(connection, rejected=token)
            response = await self.exchange("GET", url, what, headers=self.api_headers(token))
        job = parse_json(response, what)
        if not isinstance(job, dict):
            raise ServiceTitanUnavailable(f"{what}: the job is not a JSON object")
        return job

    async def token(self, connection: Connection, *, rejected: str | None = None) -> str:
        """A valid access token for ``connection``; a new one when none is cached or it was ``rejected``."""
        tid = connection.st_tenant_id
        async with self._token_locks[tid]:
            # Waiters for the lock find the token the first one fetched.
            cached = self._tokens.get(tid)
            if cached is not None and cached.value != rejected and self._clock() < cached.refresh_at:
                return cached.value
            self._tokens.pop(tid, None)
            token = await self.fetch_token(connection)
            self._tokens[tid] = token
            return token.value

    async def fetch_token(self, connection: Connection) -> Token:
        tid = connection.st_tenant_id
        form = {
            "grant_type": "client_credentials",
            "client_id": connection.client_id,
            "client_secret": connection.client_secret,
        }
        what = f"token request for ServiceTitan tenant {tid}"
        response = await self.exchange("POST", self._config.auth_url, what, token_request=True, data=form)
        body = parse_json(response, what)
        value = body.get("access_token") if isinstance(body, dict) else None
        expires_in = body.get("expires_in") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise ServiceTitanUnavailable(f"{what} answered without an access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            raise ServiceTitanUnavailable(f"{what} answered without a valid expires_in")
        logger.debug("new ServiceTitan token for tenant %s, expires in %s s", tid, expires_in)
        return Token(value=value, refresh_at=self._clock() + expires_in - self._refresh_margin_s)

    def api_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "ST-App-Key": self._config.app_key}

    async def exchange(
        self, method: str, url: str, what: str, *, token_request: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """Send one request and return a 2xx response.

        The one place where httpx's errors and ServiceTitan's statuses become this module's errors.
        """
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            # ``from None``: httpx errors carry the request, whose headers hold the token.
            raise ServiceTitanUnavailable(f"{what}: no answer within {self._config.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
            raise ServiceTitanUnavailable(f"{what}: could not reach ServiceTitan ({reason})") from None
        status = response.status_code
        if 200 <= status < 300:
            return response
        if token_request and status in (400, 401, 403):
            raise ServiceTitanAuthFailed(f"{what}: refused ({status}); check client_id and client_secret")
        if status == 401:
            raise TokenRejected(f"{what}: the token was rejected (401)")
        if status in (400, 404):
            raise JobNotFound(f"{what}: not found ({status})")
        if status == 429:
            raise ServiceTitanUnavailable(f"{what}: throttled by ServiceTitan (429)", retry_after(response))
        if status >= 500:
            raise ServiceTitanUnavailable(f"{what}: ServiceTitan answered {status}", retry_after(response))
        raise ServiceTitanUnavailable(f"{what}: unexpected status {status}")


def retry_after(response: httpx.Response) -> int | None:
    """``Retry-After`` in whole seconds; the HTTP-date form is ignored (ServiceTitan sends seconds)."""
    text = response.headers.get("retry-after", "").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def parse_json(response: httpx.Response, what: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise ServiceTitanUnavailable(f"{what}: answer is not JSON") from None
