"""The budgeted request pipeline for ``POST /v1/chat/completions``, top to bottom:

tenant → body → estimate → decision → reserve → forward → relay → settle.

Each step is a small function; ``ChatCompletions.__call__`` reads as the list above. The reservation
is settled in exactly one place per path: a ``finally`` for complete answers, the relay's close
callback for streams, so no path leaves money reserved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from guardproxy import budget
from guardproxy.auth import TenantResolver
from guardproxy.config import Config, ModelConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.ledger import CallRecord, Ledger
from guardproxy.metrics import Metrics
from guardproxy.periods import iso_utc
from guardproxy.pricing import Usage, cost_micros, lookup_model, micros_to_usd
from guardproxy.relay import (
    COMPLETED,
    ChatStreamWatcher,
    RelayResult,
    StreamRelay,
    completion_texts,
    usage_from,
)
from guardproxy.requests import ChatRequest, parse_chat_request, read_body
from guardproxy.store import Admission, Reservation
from guardproxy.tokens import TokenCounter
from guardproxy.upstream import Upstream, response_headers

log = logging.getLogger("guardproxy.pipeline")

# Counting a large prompt takes milliseconds: off the event loop above this size.
_COUNT_IN_THREAD_BYTES = 32 * 1024
# A reservation outlives the longest upstream call by this much before it expires by itself.
_RESERVATION_GRACE_S = 60


@dataclass(frozen=True)
class Services:
    """Everything a request needs, built once in the app's lifespan."""

    config: Config
    ledger: Ledger
    upstreams: dict[str, Upstream]
    tenants: TenantResolver
    metrics: Metrics
    clock: Callable[[], datetime]


@dataclass(frozen=True)
class Plan:
    """What admission decided for one call."""

    tenant: str
    request: ChatRequest
    requested: ModelConfig
    sent: ModelConfig
    prompt_tokens: int
    admission: Admission

    @property
    def reservation(self) -> Reservation:
        assert self.admission.reservation is not None
        return self.admission.reservation

    @property
    def downgraded(self) -> bool:
        return self.sent.name != self.requested.name


class ChatCompletions:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def __call__(self, request: Request) -> Response:
        tenant = await self.s.tenants.resolve(request.headers)
        chat = parse_chat_request(await read_body(request, self.s.config.server.max_body_bytes))
        requested = self._price(chat.model)
        prompt_tokens = await self._estimate(chat, requested)
        plan = await self._admit(tenant, chat, requested, prompt_tokens)
        upstream = self.s.upstreams[plan.sent.upstream]
        started = time.monotonic()
        try:
            response = await upstream.send(
                "chat/completions", self._outgoing_body(plan),
                upstream.request_headers(request.headers.items(), self.s.tenants.routing_headers),
            )
        except BaseException:
            await self._settle(plan, None, [], produced=False)
            raise
        request_id = response.headers.get("x-request-id", "")
        headers = {**response_headers(response.headers), **self._budget_headers(plan)}
        if chat.stream and response.status_code == 200:

            async def on_close(result: RelayResult) -> None:
                self._observe(plan, upstream, result.duration_s, result.watcher.first_token_at, started)
                watcher = result.watcher
                await self._settle(plan, watcher.usage, watcher.texts, produced=True, outcome=result.outcome,
                                   request_id=request_id)

            return StreamRelay(  # type: ignore[return-value]
                upstream.name, response, headers, ChatStreamWatcher(chat.wants_usage), on_close
            )
        produced = False
        usage: Usage | None = None
        texts: list[str] = []
        try:
            content = await upstream.read(response)
            produced = 200 <= response.status_code < 300
            if produced:
                usage, texts = _answer_usage(content)
        finally:
            with anyio.CancelScope(shield=True):
                self._observe(plan, upstream, time.monotonic() - started, None, started)
                await self._settle(plan, usage, texts, produced=produced, request_id=request_id)
        return Response(content, response.status_code, headers=headers)

    # -- the steps -------------------------------------------------------------------------------

    def _price(self, model: str) -> ModelConfig:
        entry = lookup_model(model, self.s.config.models)
        if entry is None:
            raise GuardError(
                ErrorKind.MODEL_NOT_PRICED,
                f"The model {model[:100]!r} has no price configured on this proxy, so it cannot be budgeted.",
                param="model",
            )
        return entry

    async def _estimate(self, chat: ChatRequest, model: ModelConfig) -> int:
        counter = TokenCounter(chat.model)
        if len(chat.raw) < _COUNT_IN_THREAD_BYTES:
            return counter.chat_prompt(chat.messages, chat.tools)
        return await anyio.to_thread.run_sync(counter.chat_prompt, chat.messages, chat.tools)

    async def _admit(self, tenant: str, chat: ChatRequest, requested: ModelConfig, prompt_tokens: int) -> Plan:
        chain = self.s.config.downgrade_chain(requested)
        worst_cases = [
            cost_micros(Usage(prompt_tokens, chat.choices * (chat.max_output_tokens or m.max_output_tokens)), m.price)
            for m in chain
        ]
        ttl_ms = int((self.s.upstreams[requested.upstream].config.timeout_s + _RESERVATION_GRACE_S) * 1000)
        admission = await self.s.ledger.admit(tenant, worst_cases, ttl_ms)
        decision = admission.decision
        if decision.index is None:
            self.s.metrics.requests.labels(tenant, requested.name, "rejected").inc()
            raise self._over_budget(tenant, decision, admission)
        sent = chain[decision.index]
        if sent is not requested:
            self.s.metrics.downgrades.labels(tenant, requested.name, sent.name).inc()
        return Plan(tenant, chat, requested, sent, prompt_tokens, admission)

    def _over_budget(self, tenant: str, decision: budget.Decision, admission: Admission) -> GuardError:
        period = decision.exhausted or "day"
        periods = self.s.ledger.periods(tenant)
        limits = admission.limits
        hard = limits.hard_day if period == "day" else limits.hard_month
        resets_at = periods.day_resets_at if period == "day" else periods.month_resets_at
        retry_after = periods.seconds_until_reset(period, self.s.clock())
        return GuardError(
            ErrorKind.OVER_BUDGET,
            f"Tenant {tenant!r} has reached its {'daily' if period == 'day' else 'monthly'} budget "
            f"(limit {micros_to_usd(hard):.2f} USD for {periods.day if period == 'day' else periods.month}); "
            f"it resets at {iso_utc(resets_at)}.",
            headers={"retry-after": str(retry_after), "x-should-retry": "false",
                     "x-guardproxy-tenant": tenant, "x-guardproxy-budget-state": budget.BLOCKED},
        )

    def _outgoing_body(self, plan: Plan) -> bytes:
        """The request body for upstream; the caller's own bytes when nothing needs to change."""
        chat = plan.request
        changes: dict[str, Any] = {}
        if plan.downgraded:
            changes["model"] = plan.sent.name
        if chat.stream and not chat.wants_usage:
            changes["stream_options"] = {**(chat.body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps({**chat.body, **changes}) if changes else chat.raw

    def _budget_headers(self, plan: Plan) -> dict[str, str]:
        decision, limits = plan.admission.decision, plan.admission.limits
        headers = {
            "x-guardproxy-tenant": plan.tenant,
            "x-guardproxy-model": plan.sent.name,
            "x-guardproxy-budget-state": budget.state_of(decision.used_day, decision.used_month, limits),
            "x-guardproxy-budget-remaining-usd":
                f"{micros_to_usd(budget.remaining(decision.used_day, decision.used_month, limits)):.6f}",
        }
        if plan.downgraded:
            headers["x-guardproxy-downgraded-from"] = plan.request.model
        return headers

    def _observe(
        self, plan: Plan, upstream: Upstream, duration_s: float, first_token_at: float | None, started: float
    ) -> None:
        self.s.metrics.upstream_duration.labels(upstream.name, plan.sent.name).observe(duration_s)
        if first_token_at is not None:
            self.s.metrics.time_to_first_token.labels(plan.sent.name).observe(first_token_at - started)

    async def _settle(
        self, plan: Plan, usage: Usage | None, texts: list[str], *, produced: bool, outcome: str = COMPLETED,
        request_id: str = "",
    ) -> None:
        """Charge the upstream's usage, else the proxy's own count; nothing when nothing was produced."""
        if produced and usage is None:
            usage = Usage(plan.prompt_tokens, TokenCounter(plan.sent.name).texts(texts))
        charge = cost_micros(usage, plan.sent.price) if produced and usage else 0
        outcome = outcome if produced else "error"
        counted = usage or Usage(0, 0)
        record: CallRecord = {
            "request_id": request_id or plan.reservation.id, "requested_model": plan.request.model,
            "model": plan.sent.name, "prompt_tokens": counted.prompt_tokens,
            "completion_tokens": counted.completion_tokens, "cached_tokens": counted.cached_prompt_tokens,
            "cost_micros": charge, "outcome": outcome,
        }
        await self.s.ledger.settle(plan.reservation, charge, record)
        label = "error" if not produced else "downgraded" if plan.downgraded else "allowed"
        self.s.metrics.requests.labels(plan.tenant, plan.requested.name, label).inc()
        if produced and usage is not None:
            self.s.metrics.record_settled(plan.tenant, plan.sent.name, usage, charge)
        log.info(
            "settled tenant=%s requested=%s sent=%s outcome=%s cost_micros=%d reserved_micros=%d request_id=%s",
            plan.tenant, plan.requested.name, plan.sent.name, outcome, charge, plan.reservation.amount,
            record["request_id"],
        )


def _answer_usage(content: bytes) -> tuple[Usage | None, list[str]]:
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None, []
    if not isinstance(answer, dict):
        return None, []
    return usage_from(answer.get("usage")), completion_texts(answer.get("choices"), "message")
