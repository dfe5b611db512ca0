"""Exactly-once markers by epoch (``guardproxy/store/markers.py``), through the ``Ledger``, on every backend.

Each process's ids are ``<epoch>.<seq>``; the settle script raises the epoch's high-water mark to the
lowest seq the process can still settle, so the markers hold what is in flight, not history, while a
replay of any id, under the mark or above it, still charges nothing.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import anyio
import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.records import Reservation
from guardproxy.store.ledger import Ledger
from guardproxy.store.markers import parse
from guardproxy.store.redis import BudgetStore
from tests.helpers import make_config

pytestmark = pytest.mark.anyio

TENANT = "acme"  # daily_usd 1 in tests/helpers.py: 1,000,000 micros
CALLS = 5_000
IN_FLIGHT = 20
ROOMY = Thresholds(10**9, 10**9, 10**10, 10**10)


def ledger_on(store: BudgetStore, replay_window_s: float = 0) -> Ledger:
    """A process's ledger (behind Sentinel, ``replay_window_s`` holds the marks back: its own test below)."""
    return Ledger(store, make_config("http://127.0.0.1:9", store={"replay_window_s": replay_window_s}),
                  lambda: datetime.now(UTC))


async def spent_today(store: BudgetStore, ledger: Ledger) -> int:
    return int(await store.client.get(store.keys(TENANT).spend_day(ledger.periods(TENANT).day)) or 0)


async def marker_entries(store: BudgetStore, ledger: Ledger) -> int:
    """Members of the tenant's marker structures (the epoch's set and the day's hash)."""
    k, client = store.keys(TENANT), store.client
    assert ledger.seqs is not None
    day = ledger.periods(TENANT).day
    return int(await client.zcard(k.done(ledger.seqs.epoch))) + int(await client.hlen(k.settled(day)))


async def test_markers_hold_what_is_in_flight_not_history(budget_store: BudgetStore) -> None:
    """5,000 calls of one tenant, 20 at a time settled in random order: the markers never hold more than
    the calls in flight (plus the mark); every call was charged once, and none can be charged again."""
    ledger = ledger_on(budget_store)
    rng = random.Random(7)
    largest = 0
    settled: list[Reservation] = []
    for _ in range(CALLS // IN_FLIGHT):
        batch = [await ledger.admit(TENANT, [10]) for _ in range(IN_FLIGHT)]
        reservations = [a.reservation for a in batch if a.reservation is not None]
        assert len(reservations) == IN_FLIGHT
        rng.shuffle(reservations)
        async with anyio.create_task_group() as group:
            for r in reservations:
                group.start_soon(ledger.settle, r, 10)
        settled += reservations
        largest = max(largest, await marker_entries(budget_store, ledger))
    last_alone = (await ledger.admit(TENANT, [10])).reservation
    assert last_alone is not None
    await ledger.settle(last_alone, 10)
    settled.append(last_alone)
    assert await spent_today(budget_store, ledger) == 10 * (CALLS + 1)
    assert largest <= IN_FLIGHT + 1, largest
    assert await marker_entries(budget_store, ledger) == 1  # nothing in flight: the mark alone
    assert ledger.seqs is not None and ledger.seqs.held() == 0
    # every id is of this process's epoch, the earliest are under the mark
    first, last = parse(settled[0].id), parse(settled[-1].id)
    assert first is not None and last is not None and first[0] == last[0] == ledger.seqs.epoch

    # a replay of any of them (under the mark, or the last ones) charges nothing, through the store or the ledger
    duplicates: list[str] = []
    ledger.on_duplicate = lambda: duplicates.append("dup")
    for r in (settled[0], settled[CALLS // 2], *settled[-IN_FLIGHT:]):
        assert not (await budget_store.settle(r, 10)).applied
        await ledger.settle(r, 10)
    assert await spent_today(budget_store, ledger) == 10 * (CALLS + 1)
    assert len(duplicates) == IN_FLIGHT + 2
    # nor can a settled id be reserved again
    late = await budget_store.admit(TENANT, ledger.periods(TENANT), ROOMY, [10], settled[0].id, 60_000)
    assert late.already_settled and late.reservation is None


async def test_a_live_call_holds_the_mark_under_it(budget_store: BudgetStore) -> None:
    """A call still running (a long stream) keeps the mark under its seq while later calls settle; its own
    settlement then charges, once, and lets the mark rise past every seq."""
    ledger = ledger_on(budget_store)
    running = (await ledger.admit(TENANT, [10])).reservation
    assert running is not None and ledger.seqs is not None
    for _ in range(50):
        r = (await ledger.admit(TENANT, [10])).reservation
        assert r is not None
        await ledger.settle(r, 10)
    assert await marker_entries(budget_store, ledger) == 50  # every later seq in the set: none is under the mark
    await ledger.settle(running, 7)
    assert await spent_today(budget_store, ledger) == 50 * 10 + 7
    assert await marker_entries(budget_store, ledger) == 1  # the mark alone
    assert not (await budget_store.settle(running, 7)).applied
    assert await spent_today(budget_store, ledger) == 50 * 10 + 7


async def test_a_refused_call_needs_no_marker_and_its_retry_is_admitted(budget_store: BudgetStore) -> None:
    ledger = ledger_on(budget_store)
    refused = await ledger.admit(TENANT, [2_000_000])  # over the day's 1,000,000
    assert refused.reservation is None
    assert ledger.seqs is not None and ledger.seqs.held() == 0
    retried = (await ledger.admit(TENANT, [10])).reservation
    assert retried is not None
    await ledger.settle(retried, 10)
    assert await spent_today(budget_store, ledger) == 10
    assert await marker_entries(budget_store, ledger) == 1


async def test_an_adopter_never_raises_another_epochs_mark(budget_store: BudgetStore) -> None:
    """A process settling another's id (adopting a dead process's journal, a killed stream's progress)
    marks it in that epoch's set without raising its mark; the owner's own settlement is then refused."""
    owner, adopter = ledger_on(budget_store), ledger_on(budget_store)
    orphan = (await owner.admit(TENANT, [10])).reservation
    later = (await owner.admit(TENANT, [10])).reservation
    assert orphan is not None and later is not None and owner.seqs is not None
    mine = (await adopter.admit(TENANT, [10])).reservation  # gives the adopter its own epoch
    assert mine is not None and adopter.seqs is not None and adopter.seqs.epoch != owner.seqs.epoch
    await adopter.settle(later, 5)
    k = budget_store.keys(TENANT)
    assert await budget_store.client.zscore(k.done(owner.seqs.epoch), "mark") is None  # not raised
    assert await budget_store.client.zscore(k.done(owner.seqs.epoch), later.id.split(".")[1]) is not None
    duplicates: list[str] = []
    owner.on_duplicate = lambda: duplicates.append("dup")
    await owner.settle(later, 5)  # a replay by the owner: ignored
    await owner.settle(orphan, 3)
    assert duplicates == ["dup"]
    assert await spent_today(budget_store, owner) == 8
    mark = await budget_store.client.zscore(k.done(owner.seqs.epoch), "mark")
    assert mark is not None and int(mark) >= 2  # the owner raised it past both


async def test_ids_settled_later_keep_per_day_markers(budget_store: BudgetStore) -> None:
    """A call another process may settle days later (a background response) keeps a uuid id and its
    per-day marker: no process's floor can pass it."""
    ledger = ledger_on(budget_store)
    background = (await ledger.admit(TENANT, [10], settled_later=True)).reservation
    assert background is not None and parse(background.id) is None
    other = ledger_on(budget_store)
    await other.settle(background, 10)
    assert not (await budget_store.settle(background, 10)).applied
    k = budget_store.keys(TENANT)
    assert await budget_store.client.hget(k.settled(background.day), background.id) == b"10"
    assert await spent_today(budget_store, ledger) == 10


async def test_behind_sentinel_the_mark_stays_under_the_replay_window(budget_store: BudgetStore) -> None:
    """Behind Sentinel a failover replays the settlements of the last ``store.replay_window_s``: the mark
    stays under every seq settled in that window, so that such a replay on the new primary is applied
    there; past the window, the mark rises."""
    window_s = 0.5
    ledger = ledger_on(budget_store, replay_window_s=window_s)
    first = [(await ledger.admit(TENANT, [10])).reservation for _ in range(5)]
    for r in first:
        assert r is not None
        await ledger.settle(r, 10)
    if not budget_store.follows_failovers:  # no failover replays elsewhere: the mark follows at once
        assert await marker_entries(budget_store, ledger) == 1
        return
    assert await marker_entries(budget_store, ledger) == 5  # all within the window: none under the mark
    await anyio.sleep(window_s + 0.2)
    later = (await ledger.admit(TENANT, [10])).reservation
    assert later is not None
    await ledger.settle(later, 10)
    await anyio.sleep(window_s + 0.2)
    last = (await ledger.admit(TENANT, [10])).reservation
    assert last is not None
    await ledger.settle(last, 10)
    assert ledger.seqs is not None
    k = budget_store.keys(TENANT)
    mark = await budget_store.client.zscore(k.done(ledger.seqs.epoch), "mark")
    assert mark is not None and int(mark) >= 5  # the first five, settled more than a window ago, are under it
    assert await spent_today(budget_store, ledger) == 70
