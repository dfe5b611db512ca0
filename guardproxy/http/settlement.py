"""Settling one attempt of a call: what it is charged (the upstream's usage, else the proxy's own
count of what it produced), booked once by the ledger, then counted in the metrics, written to the
call log and told to the observers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.budget.records import Outcome
from guardproxy.budget.tokens import TokenCounter
from guardproxy.http.plan import Plan
from guardproxy.http.progress import call_record
from guardproxy.http.services import Services
from guardproxy.observe.calls import SettledCall
from guardproxy.store.ledger import CallRecord
from guardproxy.types import Micros

#: One line per settled call, when asked (``logs.CALLS_LOGGER``: on with json logs, off with text).
calls_log = logging.getLogger("guardproxy.calls")


@dataclass(frozen=True)
class Ending:
    """How one attempt ended: what the audit log says, and what is charged."""

    outcome: Outcome
    #: An answer (or part of one) was produced: charge its usage, else the proxy's count of ``texts``.
    produced: bool = False
    usage: Usage | None = None
    texts: Sequence[str] = ()
    #: Fields added to the call's log entry (a semantic-cache hit, on the embedding that found it).
    note: tuple[tuple[str, str | int], ...] = ()


def charge_of(plan: Plan, ending: Ending) -> tuple[Usage | None, Micros]:
    """The usage an attempt is charged for (the upstream's, else the proxy's own count of what was
    produced) and its charge: what ``settle`` books and what ``x-guardproxy-cost-usd`` says."""
    usage = ending.usage
    if ending.produced and usage is None:
        usage = Usage(plan.prompt_tokens, TokenCounter(plan.sent.name).texts(list(ending.texts)))
    return usage, cost_micros(usage, plan.sent.price) if ending.produced and usage else 0


async def settle(
    s: Services, endpoint: str, plan: Plan, ending: Ending, request_id: str, *, counted: bool = True
) -> None:
    """Charge the upstream's usage, else the proxy's own count; nothing when nothing was produced.

    ``counted``: the attempt is the call's last, so it counts in ``guardproxy_requests_total``.
    """
    usage, charge = charge_of(plan, ending)
    outcome = ending.outcome
    if outcome is Outcome.COMPLETED and plan.admission.unbudgeted:
        outcome = Outcome.STORE_UNAVAILABLE
    counted_usage = usage or Usage(0, 0)
    record: CallRecord = {**call_record(plan, request_id, counted_usage, charge, outcome), **dict(ending.note)}
    await s.ledger.settle(plan.reservation, charge, record)
    if counted:
        label = "error" if not ending.produced else "downgraded" if plan.downgraded else "allowed"
        s.metrics.requests.labels(plan.tenant, plan.requested.name, label).inc()
    if ending.produced and usage is not None:
        s.metrics.record_settled(plan.tenant, plan.sent.name, usage, charge)
    headers = plan.headers()
    settled = SettledCall(
        context=plan.context, endpoint=endpoint, tenant=plan.tenant, requested_model=plan.request.model,
        model=plan.sent.name, upstream=plan.sent.upstream, upstream_model=plan.upstream_model,
        prompt_tokens=counted_usage.prompt_tokens, completion_tokens=counted_usage.completion_tokens,
        cached_tokens=counted_usage.cached_prompt_tokens, cost_micros=charge,
        reserved_micros=plan.reservation.amount, outcome=outcome.value, request_id=str(record["request_id"]),
        budget_state=headers["x-guardproxy-budget-state"],
        downgraded_from=headers.get("x-guardproxy-downgraded-from"),
        fallback_from=headers.get("x-guardproxy-fallback-from"),
    )
    if calls_log.isEnabledFor(logging.INFO):
        calls_log.info("%s", settled.summary(), extra=settled.log_fields())
    for observer in s.observers:
        observer(settled)


def observe_timing(s: Services, plan: Plan, duration_s: float, first_token_at: float | None, started: float) -> None:
    """The upstream's duration and, for a stream, its time to first token, into the metrics."""
    s.metrics.upstream_duration.labels(plan.sent.upstream, plan.sent.name).observe(duration_s)
    if first_token_at is not None:
        s.metrics.time_to_first_token.labels(plan.sent.name).observe(first_token_at - started)
