"""CORS for browser apps calling the proxy directly (``server.cors_allow_origins``; default: none).

Without origins configured there is no CORS middleware at all: no ``access-control-*`` headers,
and ``OPTIONS`` is not special. With them, Starlette's ``CORSMiddleware`` answers preflights for
those origins only (any request header, since SDKs send their own), and exposes the headers a
browser app needs to read: guardproxy's budget headers, the provider's rate limits, the request id.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from guardproxy.config.settings import ServerConfig

#: Response headers a browser may read (``Access-Control-Expose-Headers`` takes no wildcard prefixes).
EXPOSED = (
    "x-request-id", "retry-after", "x-should-retry",
    "x-guardproxy-tenant", "x-guardproxy-model", "x-guardproxy-budget-state",
    "x-guardproxy-budget-remaining-usd", "x-guardproxy-downgraded-from", "x-guardproxy-fallback-from",
    "x-guardproxy-unbudgeted",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
)
PREFLIGHT_MAX_AGE_S = 600


def cors_middleware(server: ServerConfig) -> list[Middleware]:
    """The CORS middleware for ``server.cors_allow_origins``, or nothing when none is set."""
    if not server.cors_allow_origins:
        return []
    return [Middleware(
        CORSMiddleware, allow_origins=list(server.cors_allow_origins),
        allow_methods=["GET", "POST", "PUT", "DELETE", "PATCH"], allow_headers=["*"],
        # Keys travel in Authorization, never in cookies: no credentialed CORS.
        allow_credentials=False, expose_headers=list(EXPOSED), max_age=PREFLIGHT_MAX_AGE_S,
    )]
