"""Talking to an upstream over httpx: any OpenAI-compatible API, or Azure OpenAI.

Which headers cross the proxy in each direction and where each endpoint lives on the upstream
(Azure's ``api-key`` header and deployment paths) are decided here; each upstream's circuit
breaker sees every call; httpx's errors become ``GuardError``s (502 unreachable, 504 timed out) in
one place, ``translated``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from urllib.parse import quote

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from guardproxy.breaker import BreakerState, CircuitBreaker
from guardproxy.config import UpstreamConfig
from guardproxy.errors import ErrorKind, GuardError

# RFC 9110 §7.6.1 hop-by-hop headers, plus those httpx recomputes for the bytes it really sends.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
# Never sent upstream: the caller's proxy credentials and the proxy's own routing headers.
_CALLER_ONLY = frozenset({"authorization", "api-key", "accept-encoding", "cookie", "x-servicetitan-tenant-id"})
# Not passed back: httpx has already decoded the body the client receives.
_RESPONSE_DROP = HOP_BY_HOP | {"content-encoding"}


@contextlib.contextmanager
def translated(upstream: str) -> Iterator[None]:
    """Transport errors as the proxy's own: a timeout is 504, anything else on the wire 502."""
    try:
        yield
    except (httpx.TransportError, aiohttp.ClientError) as exc:
        # httpx-aiohttp reports every aiohttp connection error (a reset, a server hanging up) as
        # ConnectTimeout: only a real timeout underneath is one.
        cause = exc.__cause__
        if isinstance(exc, httpx.TimeoutException) and (cause is None or isinstance(cause, TimeoutError)):
            raise GuardError(ErrorKind.UPSTREAM_TIMEOUT, f"upstream {upstream!r} timed out") from None
        name = type(cause if isinstance(cause, aiohttp.ClientError) else exc).__name__
        raise GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, f"upstream {upstream!r} is unreachable ({name})") from None


class Upstream:
    """One configured upstream with its pooled connections and its circuit breaker."""

    def __init__(
        self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.breaker = CircuitBreaker(config.breaker, on_change=on_breaker_change)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30)
        self.client = httpx.AsyncClient(
            base_url=config.base_url,
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            limits=limits,
            # aiohttp's pool under httpx's API: several times httpx's own throughput under concurrency
            # (bench/: bare vs bare-aiohttp).
            transport=transport or AiohttpTransport(limits=limits),
            follow_redirects=False,
        )

    def request_headers(
        self, incoming: Iterable[tuple[str, str]], drop: frozenset[str], tenant: str | None = None
    ) -> list[tuple[str, str]]:
        """The caller's headers, minus hop-by-hop and proxy-only ones, with the upstream's credentials."""
        tenant_header = self.config.tenant_header.lower()
        headers = [
            (name, value) for name, value in incoming
            if name not in HOP_BY_HOP and name not in _CALLER_ONLY and name not in drop and name != tenant_header
        ]
        if self.config.api_key:
            headers.append(("api-key", self.config.api_key) if self.config.azure
                           else ("authorization", f"Bearer {self.config.api_key}"))
        else:
            # No key of its own: the caller's key is a real provider key (bring your own key).
            headers.extend((name, value) for name, value in incoming if name in ("authorization", "api-key"))
        headers.extend((name.lower(), value) for name, value in self.config.headers.items())
        if tenant_header and tenant is not None:
            headers.append((tenant_header, tenant))
        return headers

    def endpoint_path(self, endpoint: str, model: str) -> str:
        """Where ``endpoint`` (``chat/completions``, ``responses``…) is for ``model`` on this upstream."""
        if not self.config.azure:
            return endpoint
        if not self.config.api_version:
            return f"openai/v1/{endpoint}"  # Azure's OpenAI-shaped surface: the deployment is the body's model
        query = f"?api-version={quote(self.config.api_version, safe='')}"
        if endpoint == "responses":  # Azure serves it per resource, not per deployment
            return f"openai/responses{query}"
        return f"openai/deployments/{quote(model, safe='')}/{endpoint}{query}"

    def passthrough_path(self, path: str, query: str) -> str:
        """Where an unbudgeted ``/v1/<path>`` goes (Azure: its ``/openai/v1/`` surface)."""
        target = f"openai/v1/{path}" if self.config.azure else path
        return f"{target}?{query}" if query else target

    async def send(
        self, path: str, body: bytes, headers: list[tuple[str, str]], *, method: str = "POST"
    ) -> httpx.Response:
        """Send ``body`` and return as soon as the response head arrives (the body streams after).

        Refused at once (502) while the circuit breaker is open. A transport error or a 5xx counts
        as a failure for the breaker; any other answer shows the upstream is alive.
        """
        if not self.breaker.allow():
            raise GuardError(
                ErrorKind.UPSTREAM_UNAVAILABLE,
                f"upstream {self.name!r} is failing: its circuit breaker is open "
                f"(next probe in {self.breaker.retry_in_s():.0f} s)",
            )
        request = self.client.build_request(method, path.lstrip("/"), content=body, headers=headers)
        try:
            with translated(self.name):
                response = await self.client.send(request, stream=True)
        except GuardError:
            self.breaker.failure()
            raise
        if response.status_code >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        return response

    async def read(self, response: httpx.Response) -> bytes:
        try:
            with translated(self.name):
                return await response.aread()
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def response_headers(upstream: httpx.Headers) -> dict[str, str]:
    """The upstream's own response headers that pass to the client (x-request-id, x-ratelimit-*, …)."""
    return {name: value for name, value in upstream.items() if name.lower() not in _RESPONSE_DROP}


async def aiter_translated(upstream: str, response: httpx.Response) -> AsyncIterator[bytes]:
    with translated(upstream):
        async for chunk in response.aiter_bytes():
            yield chunk


def build_upstreams(
    configs: Mapping[str, UpstreamConfig], transport: httpx.AsyncBaseTransport | None = None,
    on_breaker_change: Callable[[str, BreakerState], None] | None = None,
) -> dict[str, Upstream]:
    """One ``Upstream`` per config; ``on_breaker_change(name, state)`` hears every breaker transition."""

    def listener(name: str) -> Callable[[BreakerState], None] | None:
        if on_breaker_change is None:
            return None
        return lambda state: on_breaker_change(name, state)

    return {name: Upstream(config, transport, listener(name)) for name, config in configs.items()}
