"""The record of objects created through the proxy (``BudgetStore.record_objects`` and friends), on
every backend of ``tests/stores.py``: per tenant, with the upstream that holds each, kept for a TTL
or until forgotten."""

from __future__ import annotations

import pytest

from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio


async def test_objects_are_recorded_per_tenant_with_their_upstream(budget_store: BudgetStore) -> None:
    await budget_store.record_objects("acme", ["file-a", "resp_b"], "openai", None)
    await budget_store.record_objects("globex", ["file-c"], "azure", 3600)
    assert await budget_store.object_upstreams("acme", ["file-a", "file-c", "resp_b", "nope"]) == [
        "openai", None, "openai", None]
    assert await budget_store.object_upstreams("globex", ["file-a", "file-c"]) == [None, "azure"]
    assert await budget_store.object_upstreams("acme", []) == []
    await budget_store.record_objects("acme", [], "openai", None)  # nothing to record: no call at all


async def test_a_recorded_object_keeps_its_ttl_or_lives_until_forgotten(budget_store: BudgetStore) -> None:
    await budget_store.record_objects("acme", ["resp_1"], "openai", 30 * 86400)
    await budget_store.record_objects("acme", ["file-1"], "openai", None)
    keys = budget_store.keys("acme")
    assert 29 * 86400 < await budget_store.client.ttl(keys.stored_object("resp_1")) <= 30 * 86400
    assert await budget_store.client.ttl(keys.stored_object("file-1")) == -1
    await budget_store.forget_object("acme", "file-1")
    assert await budget_store.object_upstreams("acme", ["file-1", "resp_1"]) == [None, "openai"]


async def test_a_deferred_call_is_kept_open_until_closed(budget_store: BudgetStore) -> None:
    await budget_store.open_deferred("acme", "batch_1", {"kind": "batch", "reserved_micros": 1234, "state": "open"})
    await budget_store.open_deferred("acme", "resp_2", {"kind": "response", "state": "open"})
    assert await budget_store.open_deferred_ids("acme") == ["batch_1", "resp_2"]
    assert await budget_store.open_deferred_ids("globex") == []
    assert await budget_store.deferred_record("acme", "batch_1") == {"kind": "batch", "reserved_micros": "1234",
                                                                      "state": "open"}
    await budget_store.close_deferred("acme", "batch_1", {"state": "settled", "charged_micros": 99}, 3600)
    assert await budget_store.open_deferred_ids("acme") == ["resp_2"]
    record = await budget_store.deferred_record("acme", "batch_1")
    assert record is not None and record["state"] == "settled" and record["charged_micros"] == "99"
    assert record["reserved_micros"] == "1234"
    assert 0 < await budget_store.client.ttl(budget_store.keys("acme").deferred("batch_1")) <= 3600
    assert await budget_store.deferred_record("acme", "nope") is None
