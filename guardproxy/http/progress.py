"""What a call costs and how its audit entry reads, at its end or, for a running stream, so far.

``call_record`` is the audit-log entry of a settled attempt. ``StreamProgress`` follows a running
stream for the ledger's checkpoints (``Ledger.track``, ``Ledger.relaying`` before each batch of frames
it relays): the settlement of what it has relayed until now, its completion tokens counted
incrementally (the count of a stream's texts is the sum of its pieces' counts, so each piece is
counted once).
"""

from __future__ import annotations

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.budget.records import Outcome
from guardproxy.budget.tokens import TokenCounter
from guardproxy.http.plan import Plan
from guardproxy.http.relay import StreamWatcher
from guardproxy.store.journal import Entry
from guardproxy.store.ledger import CallRecord
from guardproxy.types import Micros


def call_record(plan: Plan, request_id: str, usage: Usage, charge: Micros, outcome: Outcome) -> CallRecord:
    """The audit-log entry of one settled attempt of ``plan``."""
    return {
        "request_id": request_id, "requested_model": plan.request.model,
        "model": plan.sent.name, "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens, "cached_tokens": usage.cached_prompt_tokens,
        "cost_micros": charge, "outcome": outcome.value,
        **({"job": plan.reservation.job} if plan.reservation.job else {}),
        # for the chargeback export (``observe/export.py``): the token classes, the prices they were charged
        # at (micro-USD per 1M tokens), the provider, the caller's key and the budget day charged
        "reasoning_tokens": usage.reasoning_tokens, "upstream": plan.sent.upstream,
        "price_input": plan.sent.price.input, "price_cached_input": plan.sent.price.cached_input,
        "price_output": plan.sent.price.output, "key": plan.context.key_id, "day": plan.reservation.day,
    }


class StreamProgress:
    """The charge of a running stream so far, as the settlement a crash would leave to the journal."""

    def __init__(self, plan: Plan, watcher: StreamWatcher, request_id: str) -> None:
        self.plan = plan
        self.watcher = watcher
        self.request_id = request_id
        self._counter: TokenCounter | None = None  # built at the first text counted
        self._counted = 0
        self._tokens = 0
        #: What ``grown`` last saw: the texts counted and the usage.
        self._seen: tuple[int, Usage | None] = (0, None)

    def grown(self) -> tuple[Entry, bool] | None:
        """``entry()`` when texts or a usage arrived since the last call, else ``None`` (a role chunk,
        a keep-alive), and whether only texts did: what the relay writes before each batch it sends."""
        seen = (len(self.watcher.texts), self.watcher.usage)
        if seen == self._seen:
            return None
        only_texts = seen[1] is None or seen[1] == self._seen[1]
        self._seen = seen
        return self.entry(), only_texts

    def entry(self) -> Entry:
        usage = self.watcher.usage
        if usage is None:  # once the upstream's usage came, it is what is charged: nothing to count
            texts = self.watcher.texts
            if len(texts) > self._counted:
                if self._counter is None:
                    self._counter = TokenCounter(self.plan.sent.name)
                self._tokens += self._counter.texts(texts[self._counted:])
                self._counted = len(texts)
            usage = Usage(self.plan.prompt_tokens, self._tokens)
        charge = cost_micros(usage, self.plan.sent.price)
        return Entry(self.plan.reservation, charge,
                     call_record(self.plan, self.request_id, usage, charge, Outcome.INTERRUPTED))
