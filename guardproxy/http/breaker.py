"""A circuit breaker per upstream, so a dead provider costs no latency.

Closed: calls go through and consecutive failures are counted. After ``failures`` in a row the
circuit opens: calls are refused at once, without touching the network, and the pipeline moves on
to the model's fallbacks. After ``cooldown_s`` one call is let through as a probe (half-open): its
success closes the circuit, its failure opens it for another cool-down. The state is per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from guardproxy.config.models import BreakerConfig


class BreakerState(IntEnum):
    """The values of the ``guardproxy_upstream_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self, config: BreakerConfig, *, clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_started_at = 0.0

    def allow(self) -> bool:
        """May a call go to the upstream now? In half-open state, ``True`` for one probe at a time."""
        if self.state is BreakerState.CLOSED or self.config.failures == 0:
            return True
        now = self.clock()
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.config.cooldown_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        elif now - self._probe_started_at < self.config.cooldown_s:
            return False  # a probe is in flight; a probe that never reported back frees the slot after a cool-down
        self._probe_started_at = now
        return True

    def retry_in_s(self) -> float:
        """Seconds until the next probe may go out (0 when calls go through now)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        since = self._opened_at if self.state is BreakerState.OPEN else self._probe_started_at
        return max(0.0, self.config.cooldown_s - (self.clock() - since))

    def success(self) -> None:
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.config.failures == 0:
            return
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self.config.failures
        ):
            self._opened_at = self.clock()
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self.state = state
        if self.on_change is not None:
            self.on_change(state)
