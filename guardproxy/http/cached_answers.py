"""Answers from the caches, before any admission: the response cache's lookup and replay (a hit costs
nothing), the semantic cache's lookup (its embedding charged like any call), and keeping a complete
answer for both once it has come."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.datastructures import Headers
from starlette.responses import Response, StreamingResponse

from guardproxy.budget.cost import COST_HEADER, add_usage_cost, usd_text
from guardproxy.budget.pricing import cost_micros, lookup_model, micros_to_usd
from guardproxy.budget.tokens import TokenCounter
from guardproxy.errors import GuardError, StoreUnavailable
from guardproxy.http import cache, semantic
from guardproxy.http.admission import estimate
from guardproxy.http.endpoints import ApiShape
from guardproxy.http.plan import Plan
from guardproxy.http.requests import ApiRequest
from guardproxy.http.services import Services
from guardproxy.observe.calls import CallContext
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.pipeline")

#: Response header of a semantic hit: the similarity of the cached question to the one asked.
SIMILARITY_HEADER = "x-guardproxy-cache-similarity"

#: ``BudgetedEndpoint.call_within`` of the embeddings endpoint: a call on the proxy's own behalf, charged
#: to the tenant, whose complete answer the callable (the last argument) sees before it is settled.
CallWithin = Callable[
    [str, bytes, CallContext, str, Headers, Callable[[Any], Awaitable[dict[str, str | int]]]], Awaitable[None]
]


@dataclass(frozen=True)
class CacheMiss:
    """A cacheable request the cache did not answer: its key, and ``miss`` or ``bypass`` (no-cache)."""

    tenant: str
    key: str
    result: str
    #: The question and its embedding, when the semantic cache missed too (stored with the answer).
    semantic: semantic.Embedded | None = None


async def lookup(
    s: Services, shape: ApiShape, tenant: str, call: ApiRequest, incoming: Headers
) -> Response | CacheMiss | None:
    """A hit's response; a ``CacheMiss`` (the answer is to be stored) or ``None`` (not cached at all).

    A hit is served whatever the tenant's budget: it costs nothing. A store that cannot be read
    is a miss (admission then decides what an unavailable store means for the call)."""
    if not s.config.policy_for(tenant).cache or not cache.deterministic(shape.path, call.body, incoming):
        return None
    key = cache.digest(shape.path, call.body)
    if cache.skips_lookup(incoming):
        s.metrics.cache_requests.labels(tenant, "bypass").inc()
        return CacheMiss(tenant, key, "bypass")
    try:
        raw = await s.ledger.store.cached_response(tenant, key)
    except StoreUnavailable:
        raw = None
    entry = cache.Entry.from_bytes(raw) if raw is not None else None
    if entry is None:
        s.metrics.cache_requests.labels(tenant, "miss").inc()
        return CacheMiss(tenant, key, "miss")
    s.metrics.cache_requests.labels(tenant, "hit").inc()
    s.metrics.cache_saved.labels(tenant).inc(micros_to_usd(saved_micros(s, shape, entry)))
    log.info("cache hit tenant=%s model=%s endpoint=%s", tenant, entry.model, shape.path)
    return replay(s, shape, tenant, call, entry, {cache.CACHE_HEADER: "hit"})


def saved_micros(s: Services, shape: ApiShape, entry: cache.Entry) -> Micros:
    """What a cached answer would have cost upstream (0 when its model or usage is not known)."""
    model = lookup_model(entry.model, s.config.models)
    usage, _ = shape.answer_usage(entry.answer)
    return cost_micros(usage, model.price) if model is not None and usage is not None else 0


def replay(
    s: Services, shape: ApiShape, tenant: str, call: ApiRequest, entry: cache.Entry, extra: dict[str, str]
) -> Response:
    """A cached answer in the shape the client asked for: the object itself, or SSE. Its completion
    is not charged (``usage.cost`` 0)."""
    headers = {**extra, "x-guardproxy-tenant": tenant, "x-guardproxy-model": entry.model,
               "x-request-id": f"req_gp_cache_{uuid.uuid4().hex}", COST_HEADER: usd_text(0)}
    answer = entry.answer
    if s.config.server.usage_cost:
        add_usage_cost(answer, 0)
    if call.stream:
        frames = cache.replay_stream(shape.path, answer, call.wants_usage)
        return StreamingResponse(iterate_in_memory(frames), media_type="text/event-stream", headers=headers)
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


async def semantic_lookup(
    s: Services, shape: ApiShape, miss: CacheMiss, call: ApiRequest, incoming: Headers, context: CallContext,
    job: str, *, embed: CallWithin,
) -> Response | CacheMiss:
    """A semantic hit's response, or the exact miss (with the question and its embedding, to be
    stored with the answer). The embedding is an embeddings call through the same admission and
    settlement as any (``embed``: ``BudgetedEndpoint.call_within``); when it is refused (budget, rate
    limit) or fails, the call goes on without the semantic cache and meets the same admission itself."""
    tenant, store = miss.tenant, s.semantic
    if store is None or not s.config.policy_for(tenant).semantic_cache:
        return miss
    settings = store.config
    question = semantic.question(
        shape.path, call.body, incoming, max_messages=settings.max_messages,
        embeddings_model=settings.embeddings_model, dimensions=settings.dimensions,
    )
    embedder = s.config.models.get(settings.embeddings_model)
    model = lookup_model(call.model, s.config.models)
    if question is None or embedder is None or model is None:
        return miss
    counted = s.metrics.semantic_requests
    text_tokens = TokenCounter(settings.embeddings_model).prompts(question.text)
    if not semantic.pays_off(text_tokens, embedder.price, await estimate(shape, call), model.price):
        counted.labels(tenant, "skipped").inc()
        return miss
    body = {"model": settings.embeddings_model, "input": question.text, "encoding_format": "base64",
            "dimensions": settings.dimensions}
    found: list[tuple[semantic.Found, cache.Entry]] = []
    vectors: list[Any] = []

    async def search(answer: Any) -> dict[str, str | int]:
        vector = semantic.embedding_of(answer, settings.dimensions)
        if vector is None:
            return {}
        vectors.append(vector)
        try:
            hit = await store.search(tenant, question, vector)
            entry = await store.answer(tenant, hit) if hit is not None else None
        except StoreUnavailable:
            return {}
        if hit is None or entry is None:
            return {}
        found.append((hit, entry))
        return {"cache": "semantic-hit", "similarity": f"{hit.similarity:.4f}",
                "saved_micros": saved_micros(s, shape, entry)}

    try:
        await embed(tenant, orjson.dumps(body), context, job, incoming, search)
    except GuardError as exc:
        log.info("semantic cache: no embedding for tenant=%s: %s", tenant, exc.message)
    if not vectors:
        counted.labels(tenant, "error").inc()
        return miss
    if not found:
        counted.labels(tenant, "miss").inc()
        return dataclasses.replace(miss, semantic=semantic.Embedded(question, vectors[0]))
    hit, entry = found[0]
    saved = saved_micros(s, shape, entry)
    counted.labels(tenant, "hit").inc()
    s.metrics.semantic_saved.labels(tenant).inc(micros_to_usd(saved))
    # A store error loses only `guardproxy status`'s tally; /metrics and the call log have the hit.
    with contextlib.suppress(StoreUnavailable):
        await s.ledger.store.count_semantic_hit(tenant, saved)
    log.info("semantic cache hit tenant=%s model=%s similarity=%.4f", tenant, entry.model, hit.similarity)
    return replay(s, shape, tenant, call, entry, {cache.CACHE_HEADER: "semantic-hit",
                                                  SIMILARITY_HEADER: f"{hit.similarity:.4f}"})


async def keep_answer(s: Services, shape: ApiShape, plan: Plan, miss: CacheMiss, answer: Any) -> cache.Entry | None:
    """Keep a complete answer of the model asked for (a downgraded or fallback answer is not
    what an identical request would get on its own, nor is one whose output limit the budget
    clamped: it may be cut short, and served again once the budget is raised); a store error
    only loses the entry. The entry, when it is worth keeping (for the semantic cache too)."""
    if plan.sent is not plan.requested or plan.clamped_tokens is not None \
            or not cache.storable(shape.path, answer):
        return None
    entry = cache.Entry(plan.sent.name, answer)
    value = entry.to_bytes()
    if len(value) > s.config.cache.max_entry_bytes:
        return None
    health = s.ledger.health
    if health is not None and not health.cache_room():
        return None  # the store's memory is for the ledger first
    bounds = s.config.cache
    try:
        with anyio.CancelScope(shield=True):
            await s.ledger.store.cache_response(miss.tenant, miss.key, value, bounds.ttl_s,
                                                max_tenant_bytes=bounds.max_tenant_bytes,
                                                max_total_bytes=bounds.max_total_bytes)
    except StoreUnavailable:
        log.warning("cache: answer for tenant=%s not stored (store unavailable)", miss.tenant)
    return entry


async def keep_semantic(s: Services, miss: CacheMiss, entry: cache.Entry) -> None:
    """Keep the answer for the question the semantic cache missed; a store error only loses it."""
    if miss.semantic is None or s.semantic is None:
        return
    try:
        with anyio.CancelScope(shield=True):
            await s.semantic.add(miss.tenant, miss.semantic.question, miss.semantic.vector, entry)
    except StoreUnavailable:
        log.warning("semantic cache: entry for tenant=%s not stored (store unavailable)", miss.tenant)


async def iterate_in_memory(frames: Iterable[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame
