"""The background loop the sweeper, the batch poller and the alert sender share (``store/loops.py``)."""

from __future__ import annotations

import logging

import anyio
import pytest

from guardproxy.errors import StoreUnavailable
from guardproxy.store.loops import repeating

log = logging.getLogger("guardproxy.test_loops")


@pytest.mark.anyio
async def test_a_step_that_fails_is_logged_or_skipped_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    done = anyio.Event()

    async def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise StoreUnavailable("down")  # skipped quietly: the outage is reported elsewhere
        if len(rounds) == 2:
            raise ValueError("a bug")  # logged, and the loop goes on
        if len(rounds) == 4:
            done.set()

    with anyio.fail_after(5):
        async with repeating(step, lambda: 0.001, name="tester", log=log):
            await done.wait()
    assert len(rounds) >= 4
    errors = [r for r in caplog.records if r.name == log.name]
    assert [r.getMessage() for r in errors] == ["tester: unexpected error (continuing)"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], ValueError)


@pytest.mark.anyio
@pytest.mark.parametrize("sleep_first", [False, True])
async def test_the_first_round_runs_at_once_unless_asked_to_wait(sleep_first: bool) -> None:
    rounds: list[float] = []

    async def step() -> None:
        rounds.append(anyio.current_time())

    started = anyio.current_time()
    async with repeating(step, lambda: 0.3, name="tester", log=log, sleep_first=sleep_first):
        await anyio.sleep(0.15)
    # Ended after 0.15 s: one round at once, or none before the first 0.3 s wait.
    assert len(rounds) == (0 if sleep_first else 1)
    if rounds:
        assert rounds[0] - started < 0.1
