"""The semantic cache's store methods on every backend (tests/stores.py), and the replica-side index
(``SemanticCache``) kept up to date from them."""

from __future__ import annotations

import numpy as np
import pytest

from guardproxy.config.settings import SemanticCacheConfig
from guardproxy.http import cache, semantic
from guardproxy.http.semantic_cache import SYNC_MARGIN_MS, SemanticCache
from guardproxy.observe.metrics import Metrics
from guardproxy.store.redis import BudgetStore
from guardproxy.testing.fake_embedding import embed_text

pytestmark = pytest.mark.anyio

ANSWER = cache.Entry("gpt-4o", {"object": "chat.completion", "choices": []})


def value(entry_id: str, created_ms: int) -> bytes:
    vector = np.asarray(embed_text(entry_id, 8), dtype=np.float32)
    return semantic.IndexEntry(entry_id, "p", (), vector, created_ms).to_bytes()


async def add(store: BudgetStore, entry_id: str, created_ms: int, *, max_entries: int = 10, ttl_s: int = 60) -> int:
    return await store.add_semantic_entry("acme", entry_id, value(entry_id, created_ms), ANSWER.to_bytes(),
                                          created_ms=created_ms, ttl_s=ttl_s, max_entries=max_entries)


async def test_entries_are_added_listed_and_versioned(budget_store: BudgetStore) -> None:
    assert await budget_store.semantic_version("acme") == 0
    assert await budget_store.semantic_entries("acme", 0, set()) == (0, {})
    assert await add(budget_store, "a", 1_000) == 1
    assert await add(budget_store, "b", 2_000) == 2
    assert await add(budget_store, "c", 3_000) == 3
    version, new = await budget_store.semantic_entries("acme", 0, {"a"})
    assert version == 3 and list(new) == ["b", "c"]
    assert new["b"] == value("b", 2_000)
    # only the entries created since a time, less the ones known
    assert await budget_store.semantic_entries("acme", 2_000, {"c"}) == (3, {"b": value("b", 2_000)})
    assert await budget_store.semantic_answer("acme", "a") == ANSWER.to_bytes()
    assert await budget_store.semantic_answer("acme", "nope") is None
    # another tenant sees none of it
    assert await budget_store.semantic_version("globex") == 0


async def test_the_oldest_beyond_max_entries_and_the_expired_are_dropped(budget_store: BudgetStore) -> None:
    for i, entry_id in enumerate(("a", "b", "c")):
        await add(budget_store, entry_id, 1_000 + i, max_entries=2)
    version, new = await budget_store.semantic_entries("acme", 0, set())
    assert set(new) == {"b", "c"} and version == 4  # three additions, one drop
    assert await budget_store.semantic_answer("acme", "a") is None
    # an entry older than the ttl is dropped by the next addition
    await add(budget_store, "d", 1_000 + 61_000, max_entries=5)
    _, new = await budget_store.semantic_entries("acme", 0, set())
    assert set(new) == {"d"}


async def test_hits_are_tallied_per_tenant(budget_store: BudgetStore) -> None:
    await budget_store.count_semantic_hit("acme", 120)
    await budget_store.count_semantic_hit("acme", 30)
    assert await budget_store.semantic_stats(["acme", "globex"]) == {"acme": (2, 150), "globex": (0, 0)}
    assert await budget_store.semantic_stats([]) == {}


async def test_two_replicas_indexes_follow_the_store(budget_store: BudgetStore) -> None:
    config = SemanticCacheConfig(dimensions=64, max_entries=3)
    now = [10_000]
    metrics = Metrics()
    one = SemanticCache(config, 3600, budget_store, metrics, clock_ms=lambda: now[0])
    two = SemanticCache(config, 3600, budget_store, Metrics(), clock_ms=lambda: now[0])

    def ask(text: str) -> tuple[semantic.Question, np.ndarray]:
        return (semantic.Question("prefix", text, semantic.marks(text)),
                np.asarray(embed_text(text, 64), dtype=np.float32))

    q, vector = ask("Where is my order?")
    assert await two.search("acme", *ask("where's my order")) is None  # synced while empty
    assert await one.search("acme", q, vector) is None  # a miss searches, then adds
    await one.add("acme", q, vector, ANSWER)
    assert len(one.index("acme")) == 1, "the writer's own index takes its entry at once"
    found = await two.search("acme", *ask("where's my order"))
    assert found is not None and await two.answer("acme", found) == ANSWER
    # the oldest is dropped everywhere once max_entries is passed
    for text in ("How do I reset my password?", "What are your opening hours?", "Do you ship to Canada?"):
        now[0] += 1
        await two.add("acme", *ask(text), ANSWER)
    assert await one.search("acme", *ask("where's my order")) is None
    assert len(await one.refresh("acme")) == 3 and len(await two.refresh("acme")) == 3
    # a writer whose clock is behind (within SYNC_MARGIN_MS) is still seen by an index already past it
    assert await one.search("globex", *ask("Where is my order?")) is None
    await one.add("globex", *ask("Where is my order?"), ANSWER)
    late = SemanticCache(config, 3600, budget_store, Metrics(), clock_ms=lambda: now[0] - SYNC_MARGIN_MS // 2)
    await late.add("globex", *ask("Is there a student discount?"), ANSWER)
    found = await one.search("globex", *ask("is there any student discount"))
    assert found is not None
    # an entry the store no longer has is found in an index but has no answer: a miss, never an error
    await budget_store.client.delete(budget_store.keys("globex").semantic_answer(found.id))
    assert await one.answer("globex", found) is None
    # the index of an idle tenant is dropped past MAX_TENANT_INDEXES, and its gauge with it
    for i in range(semantic.MAX_TENANT_INDEXES):
        one.index(f"t{i}")
    assert "acme" not in one._indexes
    assert metrics.registry.get_sample_value("guardproxy_semantic_cache_entries", {"tenant": "acme"}) == 0
