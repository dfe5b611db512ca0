"""Per-minute rate limits as the client sees them: OpenAI's ``x-ratelimit-*`` headers and the 429.

Pure: the store's admission script keeps the windows (``lua/admit.v4.lua``, mirrored by
``budget.rate_verdict``); this module only says what the answer carries.
"""

from __future__ import annotations

from guardproxy.budget.decision import REQUESTS
from guardproxy.budget.records import RateWindow
from guardproxy.errors import ErrorKind, GuardError


def duration(ms: int) -> str:
    """A wait as OpenAI writes it in ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{seconds}" if minutes else seconds


def headers(window: RateWindow) -> dict[str, str]:
    """The ``x-ratelimit-*`` trio of each limit the tenant has (none without limits)."""
    out: dict[str, str] = {}
    if window.limits.rpm > 0:
        out.update({
            "x-ratelimit-limit-requests": str(window.limits.rpm),
            "x-ratelimit-remaining-requests": str(max(0, window.limits.rpm - window.requests)),
            "x-ratelimit-reset-requests": duration(window.requests_reset_ms),
        })
    if window.limits.tpm > 0:
        out.update({
            "x-ratelimit-limit-tokens": str(window.limits.tpm),
            "x-ratelimit-remaining-tokens": str(max(0, window.limits.tpm - window.tokens)),
            "x-ratelimit-reset-tokens": duration(window.tokens_reset_ms),
        })
    return out


def rate_limited(tenant: str, window: RateWindow, call_tokens: int) -> GuardError:
    """The 429 for a call over a per-minute limit: retryable once the window admits it."""
    common = {**headers(window), "x-guardproxy-tenant": tenant}
    if window.limited == REQUESTS:
        assert window.wait_ms is not None
        return GuardError(
            ErrorKind.RATE_LIMITED_REQUESTS,
            f"Rate limit reached for tenant {tenant!r}: {window.limits.rpm} requests per minute. "
            f"Try again in {duration(window.wait_ms)}.",
            headers={**common, **_retry_after(window.wait_ms)},
        )
    if window.wait_ms is None:
        # Waiting cannot help: the call alone is over the limit (OpenAI's "Request too large").
        return GuardError(
            ErrorKind.RATE_LIMITED_TOKENS,
            f"Request too large for tenant {tenant!r}: it may use up to {call_tokens} tokens (prompt plus "
            f"max output) and the limit is {window.limits.tpm} tokens per minute. Ask for fewer output tokens.",
            headers={**common, "x-should-retry": "false"},
        )
    return GuardError(
        ErrorKind.RATE_LIMITED_TOKENS,
        f"Rate limit reached for tenant {tenant!r}: {window.limits.tpm} tokens per minute, used "
        f"{window.tokens}, this call may use up to {call_tokens}. Try again in {duration(window.wait_ms)}.",
        headers={**common, **_retry_after(window.wait_ms)},
    )


def _retry_after(wait_ms: int) -> dict[str, str]:
    # Both forms: the SDKs prefer retry-after-ms (exact), proxies and curl users read retry-after.
    return {"retry-after": str(max(1, -(-wait_ms // 1000))), "retry-after-ms": str(wait_ms)}
