"""Background responses (``POST /v1/responses`` with ``background: true``), charged when they end.

The upstream answers at once with a queued response and no usage; the work, and its cost, come
later. So the call's reservation is not settled with the answer: it is kept in the store with what
settling needs (``BudgetStore.open_deferred``, the same record a batch has) and its lease is made as
long as a background response may run, and the response is settled, at the model's price and from
the usage the finished response reports, when it is seen to end: by the poller, or by the tenant's
own ``GET /v1/responses/{id}`` or cancel (``batches.Batches.observe``).
"""

from __future__ import annotations

from typing import Any

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.budget.tokens import TokenCounter
from guardproxy.config.models import ModelConfig
from guardproxy.http.responses_stream import output_texts, responses_usage
from guardproxy.types import JSONObject, Micros

#: How long a background response's reservation holds without renewal.
BACKGROUND_LEASE_MS = 24 * 3_600_000
#: A response in one of these states will not change (nor cost more).
TERMINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})


def requested(endpoint: str, body: JSONObject) -> bool:
    """The call asks for a background response (which may be settled later, by another process)."""
    return endpoint == "responses" and body.get("background") is True


def pending(endpoint: str, body: JSONObject, answer: Any) -> str | None:
    """The id of a background response that the answer shows still to run, else ``None``."""
    if not requested(endpoint, body) or not isinstance(answer, dict):
        return None
    ident = answer.get("id")
    return ident if isinstance(ident, str) and ident and answer.get("status") not in TERMINAL else None


def finished_charge(response: Any, model: ModelConfig, prompt_tokens: int) -> tuple[Usage | None, Micros]:
    """What an ended response costs: its usage at ``model``'s price; without usage, the proxy's count
    of the output it holds (and the prompt it estimated); nothing when it produced nothing."""
    usage = responses_usage(response.get("usage")) if isinstance(response, dict) else None
    if usage is None:
        texts = output_texts(response)
        if not texts:
            return None, 0
        usage = Usage(prompt_tokens, TokenCounter(model.name).texts(texts))
    return usage, cost_micros(usage, model.price)
