"""How admission picks what a call sends, the same for a real call and for a quote.

``choose`` asks an ``Admit`` (for a call: the ledger, which decides and reserves in one Lua script;
for a quote: ``budget.decide`` on a read of the store, reserving nothing) about the call's full worst
case on each tier of its downgrade chain. When none fits and the tenant has ``clamp_max_tokens``
on, it asks again about the clamped worst cases (``clamp.candidates``): that second admission is
itself an atomic check-and-reserve, so spend made by others in between can only turn it into the
usual refusal, never into an overspend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from guardproxy.budget import clamp
from guardproxy.budget import decision as budget
from guardproxy.budget.clamp import Tier
from guardproxy.budget.decision import Thresholds
from guardproxy.budget.levels import NO_LEVELS, LevelArgs
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.budget.records import Admission
from guardproxy.types import Micros

#: Decides (and, for a call, reserves) among worst cases for a tenant; the flag says the refusal is
#: provisional (a clamped admission may follow), so the store records no blocked state for it; the
#: last argument is the tier (index in the downgrade chain) of each worst case, so that the caps of
#: that tier's model bind it (a clamped admission offers only some tiers).
Admit = Callable[[str, Sequence[Micros], bool, Sequence[int]], Awaitable[Admission]]

WITHIN_BUDGET = "within_budget"
SOFT_CAP = "soft_cap_downgrade"
DOWNGRADED_TO_FIT = "downgraded_to_fit"
CLAMPED = "clamped"


@dataclass(frozen=True)
class Choice:
    """What admission chose for one attempt of a call."""

    #: The first admission, on the full worst cases: the spend the call met.
    first: Admission
    #: The admission that decided: ``first``, or the second one on clamped worst cases.
    deciding: Admission
    #: The worst cases ``deciding`` chose among, and the chain index of each.
    worst_cases: tuple[Micros, ...]
    tiers: tuple[int, ...]
    #: The lowered per-output limit of each of those, when they are clamped ones.
    clamped_limits: tuple[int, ...] | None = None
    #: The requested model's full worst case.
    first_worst_case: Micros = 0

    @property
    def index(self) -> int | None:
        """Position in the downgrade chain of the model to send; ``None`` when refused."""
        chosen = self.deciding.decision.index
        return None if chosen is None else self.tiers[chosen]

    @property
    def clamped_tokens(self) -> int | None:
        """The lowered output limit to send, when the call was clamped."""
        chosen = self.deciding.decision.index
        return None if chosen is None or self.clamped_limits is None else self.clamped_limits[chosen]

    @property
    def worst_case(self) -> Micros:
        """What the chosen tier reserves; refused: the requested model's full worst case."""
        chosen = self.deciding.decision.index
        return self.first_worst_case if chosen is None else self.worst_cases[chosen]

    @property
    def reason(self) -> str:
        """Why: ``within_budget``, ``soft_cap_downgrade``, ``downgraded_to_fit``, ``clamped``, or the
        period that refused (``daily_budget_exhausted``, ``monthly_budget_exhausted``,
        ``job_budget_exhausted``, ``level_budget_exhausted``: another level's cap)."""
        decision, limits = self.deciding.decision, self.deciding.limits
        if decision.index is None:
            return {"month": "monthly_budget_exhausted", "job": "job_budget_exhausted",
                    "level": "level_budget_exhausted"}.get(decision.exhausted or "day", "daily_budget_exhausted")
        if self.clamped_limits is not None:
            return CLAMPED
        if decision.index == 0:
            return WITHIN_BUDGET
        first = self.worst_cases[0]
        fits = decision.used_day + first <= limits.hard_day and decision.used_month + first <= limits.hard_month
        return SOFT_CAP if fits else DOWNGRADED_TO_FIT


async def choose(
    tenant: str, tiers: Sequence[Tier], prompt_tokens: int, choices: int, policy: BudgetPolicy, admit: Admit
) -> Choice:
    """Admit the call's full worst cases on ``tiers`` (its downgrade chain); when none fits and
    ``policy.clamp_max_tokens`` is on, admit the clamped ones instead."""
    worst_cases = tuple(cost_micros(Usage(prompt_tokens, choices * t.limit_tokens), t.price) for t in tiers)
    unclamped = tuple(range(len(tiers)))
    first = await admit(tenant, worst_cases, policy.clamp_max_tokens, unclamped)
    full = Choice(first, first, worst_cases, unclamped, first_worst_case=worst_cases[0])
    decision = first.decision
    if decision.admitted or not policy.clamp_max_tokens:
        return full
    found = clamp.candidates(decision.used_day, decision.used_month, first.limits, prompt_tokens, choices, tiers,
                             policy.min_completion_tokens, first.job_room)
    if not found:
        # Nothing to clamp to: the refusal stands, and is recorded this time (blocked state, alert).
        final = await admit(tenant, worst_cases, False, unclamped)
        return Choice(final, final, worst_cases, unclamped, first_worst_case=worst_cases[0])
    clamped = tuple(c.worst_case for c in found)
    indices = tuple(c.index for c in found)
    second = await admit(tenant, clamped, False, indices)
    return Choice(first, second, clamped, indices, tuple(c.max_tokens for c in found),
                  first_worst_case=worst_cases[0])


def thresholds_in_force(base: Thresholds, override: Mapping[str, str]) -> Thresholds:
    """The thresholds admit.v2.lua applies: a runtime override's (as ``state.override_record``
    wrote them) in place of the configured ones."""
    if "soft_day" not in override:
        return base
    return Thresholds(int(override["soft_day"]), int(override["hard_day"]), int(override["soft_month"]),
                      int(override["hard_month"]))


def reading(used_day: Micros, used_month: Micros, limits: Thresholds, job_room: Micros | None = None,
            job_cap: Micros | None = None, levels: LevelArgs = NO_LEVELS, caps_used: Sequence[Micros] = ()) -> Admit:
    """An ``Admit`` that decides with ``budget.decide_levels`` on spend already read (and the call's
    job's room under its cap, ``None``: no cap; what each of ``levels``' caps has used), and reserves
    nothing."""

    async def admit(tenant: str, worst_cases: Sequence[Micros], provisional: bool, tiers: Sequence[int]
                    ) -> Admission:
        models = levels.for_tiers(tiers).models
        models = (*models, *[""] * (len(worst_cases) - len(models)))
        decision, refusing = budget.decide_levels(used_day, used_month, limits, worst_cases, models, levels.caps,
                                                  caps_used, job_room)
        return Admission(decision, limits, None, job_room=job_room, job_cap=job_cap,
                         refused_by=None if refusing is None else levels.caps[refusing],
                         levels=tuple(zip(levels.caps, caps_used, strict=True)))

    return admit
