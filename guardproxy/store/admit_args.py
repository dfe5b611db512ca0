"""The admission script's arguments and reply as typed values (``lua/admit.v5.lua``).

``AdmitArgs`` is built in one place (``BudgetStore.admit``) and turned into the script's KEYS and
ARGV here; the script's reply is decoded here, once, into ``AdmitReply`` and then an ``Admission``.
The levels (``budget/levels.py``) travel as one JSON argument that the script decodes with cjson:
their number varies per call, and their fields are named on both sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from guardproxy.budget.decision import REQUESTS, TOKENS, Decision, RateLimits, Thresholds
from guardproxy.budget.levels import WINDOW_TTL_S, LevelArgs, LevelCap
from guardproxy.budget.periods import Periods
from guardproxy.budget.records import Admission, AlertArgs, JobArgs, RateWindow, Reservation
from guardproxy.store.markers import epoch_of
from guardproxy.types import Micros

#: Tenant spend counters' lifetimes (kept in step with ``redis.DAY_KEY_TTL_S`` / ``MONTH_KEY_TTL_S``).
DAY_KEY_TTL_S = WINDOW_TTL_S["day"]
MONTH_KEY_TTL_S = WINDOW_TTL_S["month"]
EXHAUSTED = {1: "day", 2: "month", 3: "job", 4: "level"}


class LevelKeys(Protocol):
    """``layout.Keys`` or ``layout.GlobalKeys``: where a level's counters live."""

    def level_spend(self, scope: str, window: str, period: str) -> str: ...

    def level_held(self, scope: str) -> str: ...


class TenantKeys(LevelKeys, Protocol):
    """The tenant's keys admission touches (``layout.Keys``)."""

    def spend_day(self, day: str) -> str: ...
    def spend_month(self, month: str) -> str: ...
    def settled(self, day: str) -> str: ...
    def flags(self, period: str, period_id: str) -> str: ...
    def job(self, job: str) -> str: ...
    def done(self, epoch: int) -> str: ...

    @property
    def reservations(self) -> str: ...
    @property
    def reservation_amounts(self) -> str: ...
    @property
    def reserved(self) -> str: ...
    @property
    def budget(self) -> str: ...
    @property
    def rate_requests(self) -> str: ...
    @property
    def rate_tokens(self) -> str: ...
    @property
    def rate_token_counts(self) -> str: ...
    @property
    def rate_token_sum(self) -> str: ...
    @property
    def alerts(self) -> str: ...
    @property
    def alerts_due(self) -> str: ...
    @property
    def reservation_jobs(self) -> str: ...
    @property
    def job_held(self) -> str: ...
    @property
    def reservation_levels(self) -> str: ...


@dataclass(frozen=True)
class AdmitArgs:
    """Everything one admission decides on."""

    tenant: str
    periods: Periods
    limits: Thresholds
    worst_cases: Sequence[Micros]
    reservation_id: str
    lease_ms: int
    rate: RateLimits
    call_tokens: int
    alerts: AlertArgs
    job: JobArgs
    provisional: bool
    levels: LevelArgs

    def script_call(self, k: TenantKeys, global_keys: LevelKeys) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of admit.v5."""
        caps: list[dict[str, str | int]] = []
        level_keys: set[str] = set()
        for cap in self.levels.caps:
            spend, held, flags = cap_keys(cap, k, global_keys)
            level_keys |= {spend, held, flags}
            caps.append({
                "level": cap.level, "scope": cap.scope, "window": cap.window, "period": cap.period,
                "spend": spend, "held": held,
                "own": 0 if cap.scope == "tenant" else 1, "hard": cap.hard, "soft": cap.soft,
                "limit": str(cap.limit),  # text: the script writes it into the reservation's books as is
                "model": cap.model, "flags": flags, "ttl": WINDOW_TTL_S[cap.window],
            })
        p, a, job = self.periods, self.alerts, self.job
        keys = [k.spend_day(p.day), k.spend_month(p.month), k.reservations, k.reservation_amounts, k.reserved,
                k.budget, k.settled(p.day), k.rate_requests, k.rate_tokens, k.rate_token_counts, k.rate_token_sum,
                k.flags("day", p.day), k.flags("month", p.month), k.alerts, k.alerts_due, k.reservation_jobs,
                k.job_held, k.job(job.id), k.reservation_levels, k.done(epoch_of(self.reservation_id)),
                *sorted(level_keys)]
        models = list(self.levels.models) + [""] * (len(self.worst_cases) - len(self.levels.models))
        args: list[str | int] = [
            self.reservation_id, self.lease_ms,
            self.limits.soft_day, self.limits.hard_day, self.limits.soft_month, self.limits.hard_month,
            self.rate.rpm, self.rate.tpm, self.call_tokens, int(a.enabled), self.tenant, p.day, p.month,
            a.limit_day, a.limit_month, DAY_KEY_TTL_S, MONTH_KEY_TTL_S,
            job.id, -1 if job.cap_micros is None else job.cap_micros, 1 if self.provisional else 0,
            orjson.dumps({"models": models, "caps": caps}).decode(), *self.worst_cases,
        ]
        return keys, args


def cap_keys(cap: LevelCap, k: TenantKeys, global_keys: LevelKeys) -> tuple[str, str, str]:
    """The spend, held and flags keys of one of tenant ``k``'s caps."""
    where = global_keys if cap.level == "global" else k
    return (where.level_spend(cap.scope, cap.window, cap.period), where.level_held(cap.scope),
            k.flags(cap.window, cap.period))


def settle_books(caps: Sequence[LevelCap], k: TenantKeys, global_keys: LevelKeys) -> tuple[str, list[str]]:
    """The books of a charge no admission booked (settle.v4's "books" argument): a spend line per cap, as
    admit.v5 writes them, and the keys they name (declared for Redis Cluster)."""
    lines: dict[str, str] = {}  # spend key -> its line (one per counter, as admit.v5 books them)
    keys: set[str] = set()
    for cap in caps:
        spend, _, flags = cap_keys(cap, k, global_keys)
        fields = (WINDOW_TTL_S[cap.window], cap.limit, cap.level, cap.window, cap.period, cap.scope, flags, spend)
        lines.setdefault(spend, "s " + "\t".join(str(f) for f in fields) + "\n")
        keys |= {spend, flags}
    return "".join(lines.values()), sorted(keys)


@dataclass(frozen=True)
class AdmitReply:
    """admit.v5's reply, by name."""

    index: int
    used_day: Micros
    used_month: Micros
    exhausted: int
    effective: Thresholds
    already_settled: bool
    limited: int
    rpm: int
    tpm: int
    requests: int
    tokens: int
    wait_ms: int
    requests_reset_ms: int
    tokens_reset_ms: int
    blocked: bool
    job_cap: int
    job_used: Micros
    #: 1-based index of the cap that refused the call (0: none).
    refused_by: int
    #: What each cap has used (settled + held; after this call when it was admitted).
    caps_used: tuple[Micros, ...]
    #: Each cap's (hard, soft, limit) in force: a runtime override's for the tenant's hour and week.
    caps_in_force: tuple[tuple[Micros, Micros, Micros], ...] = ()

    @classmethod
    def decode(cls, reply: Sequence[Any]) -> AdmitReply:
        v = [int(x) for x in reply]
        tail = v[21:]
        n = len(tail) // 4
        return cls(
            index=v[0], used_day=v[1], used_month=v[2], exhausted=v[3], effective=Thresholds(*v[4:8]),
            already_settled=v[8] == 1, limited=v[9], rpm=v[10], tpm=v[11], requests=v[12], tokens=v[13],
            wait_ms=v[14], requests_reset_ms=v[15], tokens_reset_ms=v[16], blocked=v[17] == 1, job_cap=v[18],
            job_used=v[19], refused_by=v[20], caps_used=tuple(tail[:n]),
            caps_in_force=tuple((tail[n + 3 * c], tail[n + 3 * c + 1], tail[n + 3 * c + 2]) for c in range(n)),
        )

    def admission(self, call: AdmitArgs) -> Admission:
        window = RateWindow(
            limits=RateLimits(self.rpm, self.tpm), requests=self.requests, tokens=self.tokens,
            requests_reset_ms=self.requests_reset_ms, tokens_reset_ms=self.tokens_reset_ms,
            limited={1: REQUESTS, 2: TOKENS, 3: TOKENS}.get(self.limited),
            wait_ms=None if self.limited == 3 else self.wait_ms,
        )
        decision = Decision(
            index=self.index if self.index >= 0 and not self.limited else None, used_day=self.used_day,
            used_month=self.used_month, exhausted=EXHAUSTED.get(self.exhausted),
        )
        reservation = None
        if decision.index is not None and not self.already_settled:
            p = call.periods
            reservation = Reservation(call.reservation_id, call.tenant, p.day, p.month,
                                      call.worst_cases[decision.index], call.job.id)
        caps = tuple(cap if (cap.hard, cap.soft, cap.limit) == in_force else
                     dataclasses.replace(cap, hard=in_force[0], soft=in_force[1], limit=in_force[2])
                     for cap, in_force in zip(call.levels.caps, self.caps_in_force, strict=True))
        refused_by: LevelCap | None = caps[self.refused_by - 1] if self.refused_by > 0 else None
        return Admission(
            decision, self.effective, reservation, self.already_settled, rate=window, refused=self.blocked,
            job_room=None if self.job_cap < 0 else max(0, self.job_cap - self.job_used),
            job_cap=None if self.job_cap < 0 else self.job_cap,
            refused_by=refused_by, levels=tuple(zip(caps, self.caps_used, strict=True)),
        )
