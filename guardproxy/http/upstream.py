"""Talking to an upstream over aiohttp: any OpenAI-compatible API, or Azure OpenAI.

Which headers cross the proxy in each direction and where each endpoint lives on the upstream
(Azure's ``api-key`` header and deployment paths) are decided here; each upstream's circuit
breaker sees every call; aiohttp's errors become ``GuardError``s (502 unreachable, 504 timed out)
in one place, ``translated``. An answer is an ``UpstreamResponse``: its head, then its body as it
arrives.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, unquote

import aiohttp
import httpx
from yarl import URL

from guardproxy.config.settings import UpstreamConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.breaker import BreakerState, CircuitBreaker

# RFC 9110 §7.6.1 hop-by-hop headers, plus those aiohttp computes for the bytes it really sends.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
# Never sent upstream: the caller's proxy credentials (tenant, service or admin key, in any of the
# places the proxy reads one), where the caller is on the network, and what aiohttp negotiates itself.
_CALLER_ONLY = frozenset({
    "authorization", "api-key", "cookie", "accept-encoding", "x-servicetitan-tenant-id", "forwarded",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip",
})
# Not passed back: aiohttp has already decoded the body the client receives; the date and server are
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
#: Budgeted paths (an endpoint, an Azure deployment) per upstream: their URLs are parsed once.
_URLS_KEPT = 256


def _named_by_connection(incoming: Iterable[tuple[str, str]]) -> set[str]:
    """Headers the sender marked hop-by-hop by naming them in ``Connection`` (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for name, value in incoming if name == "connection" for token in value.split(",")}


def failure(upstream: str, exc: aiohttp.ClientError | TimeoutError) -> GuardError:
    """A transport error as the proxy's own: a timeout is 504, anything else on the wire 502.

    ``exc``'s traceback is dropped: aiohttp raises one shared ``ClientConnectionError("Connection
    closed")`` for every response released mid-body, and each raise prepends its frames to that
    instance's traceback, so without this every stream a client left stayed alive through it (its
    ``UpstreamResponse``, aiohttp response, connection and ``ServerDisconnectedError``, ~5 KB).
    """
    exc.__traceback__ = None
    exc.__context__ = None
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors too
        return GuardError(ErrorKind.UPSTREAM_TIMEOUT, f"upstream {upstream!r} timed out")
    return GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, f"upstream {upstream!r} is unreachable ({type(exc).__name__})")


@contextlib.contextmanager
def translated(upstream: str) -> Iterator[None]:
    """Transport errors raised in the block as the proxy's own (``failure``)."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise failure(upstream, exc) from None


def _decoded(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers by lower-case name, a repeated one joined with ", " (as httpx's ``items()``
    gave them); latin-1, so that the bytes the client gets are the bytes the upstream sent."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class UpstreamResponse:
    """An upstream's answer whose head has arrived; the body follows (``chunks`` or ``read``).

    ``aclose`` ends it: after a complete body the connection goes back to the pool; mid-body the
    connection is closed, which cancels the upstream request.
    """

    __slots__ = ("_response", "headers", "status_code", "upstream")

    def __init__(self, upstream: str, response: aiohttp.ClientResponse) -> None:
        self.upstream = upstream
        self.status_code: int = response.status
        #: By lower-case name (see ``_decoded``).
        self.headers = _decoded(response.raw_headers)
        self._response = response

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk; a transport error is a ``GuardError``."""
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise failure(self.upstream, exc) from None
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """The whole body; the response is closed after."""
        try:
            with translated(self.upstream):
                return await self._response.read()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._response.release()


class Upstream:
    """One configured upstream with its pooled connections and its circuit breaker."""

    def __init__(
        self, config: UpstreamConfig, on_breaker_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.breaker = CircuitBreaker(config.breaker, on_change=on_breaker_change)
        #: The configured base URL, ending with a slash: every path goes below it.
        self.base_url = URL(config.base_url.rstrip("/") + "/")
        # Per read, not in total: a long stream is never cut while bytes keep coming.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=config.timeout_s, sock_connect=min(10.0, config.timeout_s),
            sock_read=config.timeout_s,
        )
        # The trust store httpx used before: certifi's, or SSL_CERT_FILE / SSL_CERT_DIR. Made here, not
        # on the first call, which would wait ~20 ms for it.
        self._ssl: ssl.SSLContext | bool = httpx.create_ssl_context() if self.base_url.scheme == "https" else True
        self._urls: dict[str, URL] = {}
        # Made on the first call: aiohttp's session belongs to the running event loop.
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30, ssl=self._ssl),
            timeout=self.timeout,
            # The client gets the decoded body (aiohttp asks for the encodings it can decode).
            auto_decompress=True,
            # No state shared between calls, hence between tenants: an upstream's cookies are not kept.
            cookie_jar=aiohttp.DummyCookieJar(),
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
        # Values outside ASCII (legal obs-text on the wire) are not forwarded: ASCII only goes up.
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

    def passthrough_path(self, path: str, query: str) -> URL:
        """The absolute URL an unbudgeted ``/v1/<path>`` goes to (Azure: its ``/openai/v1/`` surface).

        Built from the configured base URL and ``path`` (as the client sent it, percent-escapes
        kept), so the client chooses only the path below the base, never the host: a path that
        could read as a scheme, an authority or a dot segment is refused (400 ``invalid_path``),
        and so is one that reads as such once parsed the way it is sent (``%2e%2e``, say).
        """
        invalid = GuardError(ErrorKind.INVALID_PATH, "Invalid request path for passthrough.")
        if not _relative(path) or not _QUERY.fullmatch(query):
            raise invalid
        base = self.base_url
        below = f"{'openai/v1/' if self.config.azure else ''}{path}" + (f"?{query}" if query else "")
        target = URL(f"{base}{below}")  # parsed, and re-quoted, as aiohttp would parse it
        if (target.scheme, target.raw_host, target.port, target.raw_user, target.raw_password, target.raw_fragment) \
                != (base.scheme, base.raw_host, base.port, base.raw_user, base.raw_password, "") \
                or not target.raw_path.startswith(base.raw_path) or not _relative(target.raw_path[len(base.raw_path):]):
            raise invalid
        return target

    def url(self, path: str) -> URL:
        """The URL of ``path`` (an ``endpoint_path``) below the base URL."""
        url = self._urls.get(path)
        if url is None:
            url = URL(f"{self.base_url}{path.lstrip('/')}")
            if len(self._urls) < _URLS_KEPT:
                self._urls[path] = url
        return url

    async def send(
        self, path: str | URL, body: bytes, headers: list[tuple[str, str]], *, method: str = "POST"
    ) -> UpstreamResponse:
        """Send ``body`` to ``path`` (an ``endpoint_path``, or a ``passthrough_path``'s URL) and return
        as soon as the response head arrives (the body streams after).

        Refused at once (502) while the circuit breaker is open. A transport error or a 5xx counts
        as a failure for the breaker; any other answer shows the upstream is alive.
        """
        if not self.breaker.allow():
            raise GuardError(
                ErrorKind.UPSTREAM_UNAVAILABLE,
                f"upstream {self.name!r} is failing: its circuit breaker is open "
                f"(next probe in {self.breaker.retry_in_s():.0f} s)",
            )
        url = path if isinstance(path, URL) else self.url(path)
        if self._session is None:
            self._session = self._open()
        try:
            with translated(self.name):
                try:
                    response = await self._session.request(
                        method, url, data=body or None, headers=headers, allow_redirects=False,
                    )
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        raise
                    # Not a failed connect: the upstream closed the (pooled) connection before any
                    # byte of an answer, as a server does when its keep-alive timeout runs out while
                    # the request is on its way. Sent once more (aiohttp dropped that connection), as
                    # the OpenAI SDK does on a connection error; a second failure is the 502.
                    response = await self._session.request(
                        method, url, data=body or None, headers=headers, allow_redirects=False,
                    )
        except GuardError:
            self.breaker.failure()
            raise
        if response.status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        return UpstreamResponse(self.name, response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _relative(path: str) -> bool:
    """Whether ``path`` is segments below a base path: no scheme, authority, empty or dot segment
    (``%2e%2e`` included: a server may decode it first)."""
    return _RELATIVE_PATH.fullmatch(path) is not None and not any(unquote(s) in (".", "..") for s in path.split("/"))


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
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


def build_upstreams(
    configs: Mapping[str, UpstreamConfig], on_breaker_change: Callable[[str, BreakerState], None] | None = None,
) -> dict[str, Upstream]:
    """One ``Upstream`` per config; ``on_breaker_change(name, state)`` hears every breaker transition."""

    def listener(name: str) -> Callable[[BreakerState], None] | None:
        if on_breaker_change is None:
            return None
        return lambda state: on_breaker_change(name, state)

    return {name: Upstream(config, listener(name)) for name, config in configs.items()}
