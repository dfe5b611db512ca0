"""CircuitBreaker: closed → open after N consecutive failures → one half-open probe after the cool-down."""

from __future__ import annotations

from guardproxy.config.models import BreakerConfig
from guardproxy.http.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> BreakerState:
    # A call, so that mypy does not keep one narrowed value of the attribute across method calls.
    return b.state


def breaker(failures: int = 3, cooldown_s: float = 10.0) -> tuple[CircuitBreaker, Clock, list[BreakerState]]:
    clock = Clock()
    changes: list[BreakerState] = []
    return CircuitBreaker(BreakerConfig(failures, cooldown_s), clock=clock, on_change=changes.append), clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    b, _, changes = breaker(failures=3)
    b.failure()
    b.failure()
    b.success()  # the count is of consecutive failures
    b.failure()
    b.failure()
    assert b.allow() and state(b) is BreakerState.CLOSED
    b.failure()
    assert state(b) is BreakerState.OPEN and changes == [BreakerState.OPEN]
    assert not b.allow()


def test_half_open_lets_one_probe_through_after_the_cooldown() -> None:
    b, clock, changes = breaker(failures=1, cooldown_s=10)
    b.failure()
    clock.now += 9.9
    assert not b.allow()
    assert 0 < b.retry_in_s() <= 0.1 + 1e-9
    clock.now += 0.1
    assert b.allow()  # the probe
    assert state(b) is BreakerState.HALF_OPEN
    assert not b.allow()  # only one at a time
    b.success()
    assert state(b) is BreakerState.CLOSED and b.allow() and b.retry_in_s() == 0
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_failed_probe_opens_again_for_a_whole_cooldown() -> None:
    b, clock, _ = breaker(failures=2, cooldown_s=10)
    b.failure()
    b.failure()
    clock.now += 10
    assert b.allow()
    b.failure()  # one failure is enough in half-open
    assert state(b) is BreakerState.OPEN
    clock.now += 9
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_a_probe_that_never_reports_back_frees_the_slot_after_a_cooldown() -> None:
    b, clock, _ = breaker(failures=1, cooldown_s=10)
    b.failure()
    clock.now += 10
    assert b.allow()
    clock.now += 9
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_zero_failures_disables_the_breaker() -> None:
    b, _, changes = breaker(failures=0)
    for _ in range(100):
        b.failure()
    assert b.allow() and state(b) is BreakerState.CLOSED and changes == []
