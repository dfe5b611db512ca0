"""Talking to an OpenAI-compatible upstream over httpx.

Which headers cross the proxy in each direction is decided here, and httpx's errors become
``GuardError``s (502 unreachable, 504 timed out) in one place, ``translated``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping

import httpx

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
    """httpx errors as the proxy's own: a timeout is 504, anything else on the wire 502."""
    try:
        yield
    except httpx.TimeoutException:
        raise GuardError(ErrorKind.UPSTREAM_TIMEOUT, f"upstream {upstream!r} timed out") from None
    except httpx.TransportError as exc:
        raise GuardError(
            ErrorKind.UPSTREAM_UNAVAILABLE, f"upstream {upstream!r} is unreachable ({type(exc).__name__})"
        ) from None


class Upstream:
    """One configured upstream with its pooled connections."""

    def __init__(self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.name = config.name
        self.client = httpx.AsyncClient(
            base_url=config.base_url,
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            transport=transport,
            follow_redirects=False,
        )

    def request_headers(self, incoming: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
        """The caller's headers, minus hop-by-hop and proxy-only ones, with the upstream's credentials."""
        headers = [
            (name, value) for name, value in incoming
            if name not in HOP_BY_HOP and name not in _CALLER_ONLY and name not in drop
        ]
        if self.config.api_key:
            headers.append(("authorization", f"Bearer {self.config.api_key}"))
        else:
            # No key of its own: the caller's key is a real provider key (bring your own key).
            headers.extend((name, value) for name, value in incoming if name in ("authorization", "api-key"))
        headers.extend((name.lower(), value) for name, value in self.config.headers.items())
        return headers

    async def send(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> httpx.Response:
        """POST ``body`` and return as soon as the response head arrives (the body streams after)."""
        request = self.client.build_request("POST", path.lstrip("/"), content=body, headers=headers)
        with translated(self.name):
            return await self.client.send(request, stream=True)

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
    configs: Mapping[str, UpstreamConfig], transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Upstream]:
    return {name: Upstream(config, transport) for name, config in configs.items()}
