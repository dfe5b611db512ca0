"""Admission of one attempt of a call: the model priced, the prompt counted, the decision asked of
the ledger (one script: decide and reserve), and a refusal turned into the client's error."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from guardproxy.budget import decision as budget
from guardproxy.budget import ratelimit
from guardproxy.budget.choice import Admit, Choice, choose
from guardproxy.budget.clamp import Tier
from guardproxy.budget.levels import KeyBudget
from guardproxy.budget.periods import iso_utc
from guardproxy.budget.pricing import format_usd, lookup_model
from guardproxy.budget.records import Admission
from guardproxy.budget.tokens import TokenCounter
from guardproxy.config.settings import Config, ModelConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http import background
from guardproxy.http.endpoints import ApiShape
from guardproxy.http.levels import LEVEL_HEADER, level_over_budget
from guardproxy.http.models import model_not_found
from guardproxy.http.plan import Plan
from guardproxy.http.requests import ApiRequest
from guardproxy.http.services import Services
from guardproxy.observe.calls import CallContext
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.pipeline")

# Counting a large prompt takes milliseconds: off the event loop above this size.
_COUNT_IN_THREAD_BYTES = 32 * 1024


def priced(config: Config, model: str) -> ModelConfig:
    """The model asked for, as the config prices it; 404 ``model_not_found`` when it has no price."""
    entry = lookup_model(model, config.models)
    if entry is None:
        raise model_not_found(model, config.models)
    return entry


async def estimate(shape: ApiShape, call: ApiRequest) -> int:
    """The prompt's tokens, counted off the event loop when the body is large."""
    counter = TokenCounter(call.model)
    if len(call.raw) < _COUNT_IN_THREAD_BYTES:
        return shape.prompt_tokens(counter, call.body)
    return await anyio.to_thread.run_sync(shape.prompt_tokens, counter, call.body)


async def admit_attempt(
    s: Services, shape: ApiShape, tenant: str, call: ApiRequest, requested: ModelConfig, attempt: ModelConfig,
    prompt_tokens: int, context: CallContext, job: str = "", key_budget: KeyBudget | None = None,
) -> Plan | None:
    """Decide and reserve for ``attempt``: 429 when the requested model does not fit, ``None`` for a
    fallback that does not (it is skipped)."""
    chain = s.config.downgrade_chain(attempt)
    call_tokens = prompt_tokens + max(shape.worst_output_tokens(call, m) for m in chain)

    levels = s.ledger.level_args(tenant, [m.name for m in chain], context.key_id, key_budget)
    # a background response is settled by whichever process sees it end: per-day markers (store.markers)
    settled_later = background.requested(shape.path, call.body)

    async def admit(tenant: str, worst_cases: Sequence[Micros], provisional: bool, tiers: Sequence[int]
                    ) -> Admission:
        return await s.ledger.admit(tenant, worst_cases, call_tokens, job, provisional=provisional,
                                    levels=levels.for_tiers(tiers), settled_later=settled_later)

    choice = await choose_model(s, shape, tenant, call, chain, prompt_tokens, admit)
    admission = choice.deciding
    decision = admission.decision
    if admission.rate.limited is not None:
        # The tenant's per-minute window is full: a fallback would count against the same window.
        s.metrics.requests.labels(tenant, requested.name, "rejected").inc()  # contract §6 outcomes
        s.metrics.rate_limited.labels(tenant, admission.rate.limited).inc()
        raise ratelimit.rate_limited(tenant, admission.rate, call_tokens)
    if choice.index is None:
        if attempt is not requested:
            log.info("fallback skipped tenant=%s model=%s: over budget", tenant, attempt.name)
            return None
        s.metrics.requests.labels(tenant, requested.name, "rejected").inc()
        s.metrics.count_budget_refusal(tenant, admission)
        if decision.exhausted == "job":
            raise job_over_budget(tenant, job, admission)
        if admission.refused_by is not None:
            raise level_over_budget(tenant, admission.refused_by, admission, s.clock())
        raise over_budget(s, tenant, decision, admission)
    sent = chain[choice.index]
    if sent is not attempt:
        s.metrics.downgrades.labels(tenant, attempt.name, sent.name).inc()
    if attempt is not requested:
        s.metrics.fallbacks.labels(tenant, requested.name, attempt.name).inc()
    if choice.clamped_tokens is not None:
        s.metrics.clamped.labels(tenant, sent.name).inc()
    return Plan(tenant, call, requested, attempt, sent, prompt_tokens, admission, context,
                choice.clamped_tokens)


async def choose_model(
    s: Services, shape: ApiShape, tenant: str, call: ApiRequest, chain: Sequence[ModelConfig], prompt_tokens: int,
    admit: Admit,
) -> Choice:
    """Which tier of ``chain`` to send (and its output limit), as the tenant's policy and ``admit`` decide."""
    tiers = [Tier(m.price, shape.output_limit(call, m)) for m in chain]
    return await choose(tenant, tiers, prompt_tokens, call.choices, s.config.policy_for(tenant), admit)


def over_budget(s: Services, tenant: str, decision: budget.Decision, admission: Admission) -> GuardError:
    """The 429 of a tenant whose day or month is spent: which limit, and when it resets."""
    period = decision.exhausted or "day"
    periods = s.ledger.periods(tenant)
    limits = admission.limits
    hard = limits.hard_day if period == "day" else limits.hard_month
    resets_at = periods.day_resets_at if period == "day" else periods.month_resets_at
    retry_after = periods.seconds_until_reset(period, s.clock())
    return GuardError(
        ErrorKind.OVER_BUDGET,
        f"Tenant {tenant!r} has reached its {'daily' if period == 'day' else 'monthly'} budget "
        f"(limit {format_usd(hard)} USD for {periods.day if period == 'day' else periods.month}); "
        f"it resets at {iso_utc(resets_at)}.",
        headers={"retry-after": str(retry_after), "x-should-retry": "false", **ratelimit.headers(admission.rate),
                 "x-guardproxy-tenant": tenant, "x-guardproxy-budget-state": budget.BLOCKED,
                 LEVEL_HEADER: "tenant"},
    )


def job_over_budget(tenant: str, job: str, admission: Admission) -> GuardError:
    """The 429 of a call whose worst case does not fit what its job has left."""
    cap = admission.job_cap
    limit = f" (limit {format_usd(cap)} USD)" if cap is not None else ""
    return GuardError(
        ErrorKind.JOB_OVER_BUDGET,
        f"Job {job!r} of tenant {tenant!r} has reached its budget{limit}; this call's worst case does not "
        "fit what is left.",
        headers={"x-should-retry": "false", "x-guardproxy-tenant": tenant, "x-guardproxy-job": job,
                 LEVEL_HEADER: "job"},
    )
