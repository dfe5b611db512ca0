"""The semantic cache's I/O: each tenant's entries in the store, and this process's index of them.

Entries live in the store under the tenant's hash tag (``Store.add_semantic_entry``), so every
replica sees every entry. Each process keeps an in-memory ``TenantIndex`` per active tenant (at most
``semantic.MAX_TENANT_INDEXES``, least recently used dropped) and brings it up to date before each
search when the store's version counter moved: one ``GET`` when nothing changed, else the ids and
the index values of the new entries. The answers stay in the store and are read on a hit only.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guardproxy.config.settings import SemanticCacheConfig
from guardproxy.http import cache, semantic
from guardproxy.http.semantic import Found, IndexEntry, Question, TenantIndex
from guardproxy.observe.metrics import Metrics
from guardproxy.store.protocol import Store

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("guardproxy.semantic")

#: How far before its newest entry a replica looks again for entries it has not seen: a writer whose
#: clock is behind, or whose write was in flight when the index was last brought up to date.
SYNC_MARGIN_MS = 10_000


class SemanticCache:
    """Search and add one tenant's semantic entries; ``StoreUnavailable`` passes through to the caller."""

    def __init__(
        self, config: SemanticCacheConfig, ttl_s: int, store: Store, metrics: Metrics,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.config = config
        self.ttl_s = ttl_s
        self.store = store
        self.metrics = metrics
        self.clock_ms = clock_ms
        self._indexes: OrderedDict[str, TenantIndex] = OrderedDict()

    @property
    def dimensions(self) -> int:
        return self.config.dimensions

    def index(self, tenant: str) -> TenantIndex:
        """The tenant's index in this process (made empty, never synced, the first time)."""
        found = self._indexes.get(tenant)
        if found is None:
            found = self._indexes[tenant] = TenantIndex(self.config.max_entries, self.config.dimensions)
            while len(self._indexes) > semantic.MAX_TENANT_INDEXES:
                dropped, _ = self._indexes.popitem(last=False)
                self.metrics.semantic_entries.labels(dropped).set(0)
            self._measure(tenant, found)
        self._indexes.move_to_end(tenant)
        return found

    async def refresh(self, tenant: str) -> TenantIndex:
        """The tenant's index, brought up to date with the store when its version moved: the entries
        created since the newest it holds (less ``SYNC_MARGIN_MS``, for writers' clocks and writes in
        flight), so the cost follows what is new, not what is kept. Entries the store dropped stay
        until this index drops them itself (expired: never found; beyond ``max_entries``: the oldest
        replaced): a hit on one finds no answer in the store and is a miss."""
        index = self.index(tenant)
        version = await self.store.semantic_version(tenant)
        if version == index.version:
            return index
        since_ms = index.newest_ms - SYNC_MARGIN_MS if index.version is not None else 0
        version, added = await self.store.semantic_entries(tenant, since_ms, index.ids)
        for entry_id, raw in added.items():
            entry = IndexEntry.from_bytes(entry_id, raw) if raw is not None else None
            if entry is not None:
                index.add(entry)
        index.version = version
        self._measure(tenant, index)
        return index

    async def search(self, tenant: str, q: Question, vector: np.ndarray[Any, np.dtype[np.float32]]) -> Found | None:
        """The closest entry that may answer ``q`` (same prefix and marks, similar enough, not expired)."""
        index = await self.refresh(tenant)
        return index.search(q, vector, self.config.threshold, self.clock_ms() - self.ttl_s * 1000)

    async def answer(self, tenant: str, found: Found) -> cache.Entry | None:
        """The answer of an entry found, ``None`` when it expired meanwhile."""
        raw = await self.store.semantic_answer(tenant, found.id)
        return cache.Entry.from_bytes(raw) if raw is not None else None

    async def add(self, tenant: str, q: Question, vector: np.ndarray[Any, np.dtype[np.float32]],
                  answer: cache.Entry) -> None:
        """Keep ``answer`` for ``q``; this process's index takes it at once when no other write came between."""
        entry = IndexEntry(uuid.uuid4().hex[:20], q.prefix, q.marks, semantic.normalised(vector), self.clock_ms())
        version = await self.store.add_semantic_entry(
            tenant, entry.id, entry.to_bytes(), answer.to_bytes(), created_ms=entry.created_ms, ttl_s=self.ttl_s,
            max_entries=self.config.max_entries,
        )
        index = self.index(tenant)
        if index.version is not None and version == index.version + 1:
            index.add(entry)
            index.version = version
            self._measure(tenant, index)

    def _measure(self, tenant: str, index: TenantIndex) -> None:
        self.metrics.semantic_entries.labels(tenant).set(len(index))
        self.metrics.semantic_index_bytes.set(sum(i.nbytes for i in self._indexes.values()))
