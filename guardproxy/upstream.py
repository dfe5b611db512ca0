"""Talking to an upstream over httpx: any OpenAI-compatible API, or Azure OpenAI.

Which headers cross the proxy in each direction and where each endpoint lives on the upstream
(Azure's ``api-key`` header and deployment paths) are decided here; each upstream's circuit
breaker sees every call; httpx's errors become ``GuardError``s (502 unreachable, 504 timed out) in
one place, ``translated``.
"""

from __future__ import annotations

import contextlib
import re
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
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
# Never sent upstream: the caller's proxy credentials (tenant, service or admin key, in any of the
# places the proxy reads one), where the caller is on the network, and what httpx negotiates itself.
_CALLER_ONLY = frozenset({
    "authorization", "api-key", "cookie", "accept-encoding", "x-servicetitan-tenant-id", "forwarded",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip",
})
# Not passed back: httpx has already decoded the body the client receives; the date and server are
# the proxy's own (uvicorn adds its ``date``: a second one would be a duplicate); the rest would tell
# the client who the upstream is or act on the proxy's origin (cookies, HSTS, alt-svc, redirects).
_RESPONSE_DROP = HOP_BY_HOP | {
    "content-encoding", "date", "server", "via", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version",
    "x-served-by", "x-backend-server", "alt-svc", "strict-transport-security", "set-cookie", "set-cookie2",
    "location", "content-location", "refresh", "openai-organization", "openai-project", "cf-ray",
    "cf-cache-status", "www-authenticate", "proxy-authenticate",
}
_RESPONSE_DROP_PREFIXES = ("x-envoy-", "cf-")
# What a passthrough path below ``/v1/`` may be: validated segments (``paths.path_problem``), never
# a scheme (no ':' in the first segment), an authority or a dot segment, whatever reached this function.
_RELATIVE_PATH = re.compile(r"(?:[A-Za-z0-9\-_~!$&'()*+,=%][A-Za-z0-9\-._~!$&'()*+,=%]*)"
                            r"(?:/[A-Za-z0-9\-._~:!$&'()*+,=%]+)*")
_QUERY = re.compile(r"[\x21-\x22\x24-\x7e]*")  # printable ASCII without '#'


def _named_by_connection(incoming: Iterable[tuple[str, str]]) -> set[str]:
    """Headers the sender marked hop-by-hop by naming them in ``Connection`` (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for name, value in incoming if name == "connection" for token in value.split(",")}


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
        """The caller's headers, minus hop-by-hop and proxy-only ones, with the upstream's credentials.

        No guardproxy credential ever leaves: ``Authorization``, ``api-key`` and cookies are dropped
        (any other header carrying a guardproxy key was removed on entry, ``paths.EntryGuard``). An
        upstream without an ``api_key`` (a keyless local server: vLLM, Ollama) gets no credential.
        """
        incoming = list(incoming)
        tenant_header = self.config.tenant_header.lower()
        skipped = HOP_BY_HOP | _CALLER_ONLY | drop | _named_by_connection(incoming)
        # Values outside ASCII (legal obs-text on the wire) are not forwarded: httpx sends ASCII only.
        headers = [(name, value) for name, value in incoming
                   if name not in skipped and name != tenant_header and value.isascii()]
        if self.config.api_key:
            headers.append(("api-key", self.config.api_key) if self.config.azure
                           else ("authorization", f"Bearer {self.config.api_key}"))
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
        """The absolute URL an unbudgeted ``/v1/<path>`` goes to (Azure: its ``/openai/v1/`` surface).

        Built from the configured base URL and ``path`` (as the client sent it, percent-escapes
        kept), so the client chooses only the path below the base, never the host: a path that
        could read as a scheme, an authority or a dot segment is refused (400 ``invalid_path``).
        """
        if not _RELATIVE_PATH.fullmatch(path) or not _QUERY.fullmatch(query) or \
                any(segment in (".", "..") for segment in path.split("/")):
            raise GuardError(ErrorKind.INVALID_PATH, "Invalid request path for passthrough.")
        base = self.client.base_url  # its raw_path ends with a slash: httpx sees to it
        below = f"{'openai/v1/' if self.config.azure else ''}{path}" + (f"?{query}" if query else "")
        target = base.copy_with(raw_path=base.raw_path + below.encode("ascii"))
        if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port) or \
                not target.raw_path.startswith(base.raw_path):
            raise GuardError(ErrorKind.INVALID_PATH, "Invalid request path for passthrough.")
        return str(target)

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
    """The upstream's own response headers that pass to the client (x-request-id, x-ratelimit-*, …).

    Each at most once, and none that is hop-by-hop (including those the upstream's ``Connection``
    names), identifies the upstream's server, sets state on the proxy's origin, or points at the
    upstream's address (``location``: redirects are never followed, and not relayed either).
    """
    named = _named_by_connection((name.lower(), value) for name, value in upstream.items())
    return {
        name: value for name, value in upstream.items()
        if (lower := name.lower()) not in _RESPONSE_DROP and lower not in named
        and not lower.startswith(_RESPONSE_DROP_PREFIXES)
    }


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
