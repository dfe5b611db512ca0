"""A step repeated in the background while a block runs: the sweeper, the batch poller and the alert
sender are each one.

It lives with the store, the lowest layer that does I/O, because the failure every such loop expects is
the store's: ``StoreUnavailable`` skips a round quietly (``/readyz`` and the store's own logs report the
outage); any other error is logged and the loop goes on, since housekeeping must outlive one failure.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from guardproxy.errors import StoreUnavailable


@contextlib.asynccontextmanager
async def repeating(
    step: Callable[[], Awaitable[object]], interval_s: Callable[[], float], *, name: str, log: logging.Logger,
    sleep_first: bool = False,
) -> AsyncIterator[None]:
    """Run ``step`` every ``interval_s()`` seconds until the block ends (first at once, unless
    ``sleep_first``); ``name`` starts its log lines."""
    async with anyio.create_task_group() as group:
        group.start_soon(_every, step, interval_s, name, log, sleep_first)
        try:
            yield
        finally:
            group.cancel_scope.cancel()


async def _every(step: Callable[[], Awaitable[object]], interval_s: Callable[[], float], name: str,
                 log: logging.Logger, sleep_first: bool) -> None:
    while True:
        if sleep_first:
            await anyio.sleep(interval_s())
        try:
            await step()
        except StoreUnavailable:
            pass  # next round
        except Exception:
            log.exception("%s: unexpected error (continuing)", name)
        if not sleep_first:
            await anyio.sleep(interval_s())
