"""What the budget store answers and is told, as values: reservations, admissions, settlements,
spend snapshots, rate windows, alert and job records (``store.py`` reads and writes them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from guardproxy.budget.decision import Decision, RateLimits, Thresholds
from guardproxy.budget.levels import LevelCap
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.types import Micros

NO_RATE_LIMITS = RateLimits()


@dataclass(frozen=True)
class Reservation:
    """Worst-case money held for one call until it settles (or its lease runs out unrenewed)."""

    id: str
    tenant: str
    day: str
    month: str
    amount: Micros
    #: The job (work order) the call belongs to, or ``""``.
    job: str = ""
    #: The caps whose windows its charge goes to when no admission booked them (a call served
    #: unbudgeted, a batch or external spend booked after the fact); an admitted call's own books win.
    levels: tuple[LevelCap, ...] = ()


@dataclass(frozen=True)
class RateWindow:
    """A tenant's per-minute window as admission saw it (after admitting the call, if it did)."""

    limits: RateLimits = NO_RATE_LIMITS
    requests: int = 0
    tokens: int = 0
    #: ms until the oldest request (tokens) in the window leaves it; 0 for an empty window.
    requests_reset_ms: int = 0
    tokens_reset_ms: int = 0
    #: Why the call was refused (``requests`` or ``tokens``), or ``None``.
    limited: str | None = None
    #: ms until the window admits the call; ``None`` when it never will (the call alone exceeds tpm).
    wait_ms: int | None = 0


@dataclass(frozen=True)
class Admission:
    decision: Decision
    limits: Thresholds
    reservation: Reservation | None
    #: The id had been settled or released before this admit ran: nothing was reserved.
    already_settled: bool = False
    #: Not asked of the store at all (it was unavailable and ``fail_open`` served the call).
    unbudgeted: bool = False
    rate: RateWindow = field(default_factory=RateWindow)
    #: The period's last admission was a budget refusal (see ``budget.state_of``).
    refused: bool = False
    #: The call's job's room before this call (its cap minus its spend and live reservations);
    #: ``None`` when the call names no job or the job has no cap. Clamping can use it.
    job_room: Micros | None = None
    #: The call's job's cap as the script applied it (an override's wins), ``None``: none.
    job_cap: Micros | None = None
    #: The level cap that refused the call (``decision.exhausted == "level"``), else ``None``.
    refused_by: LevelCap | None = None
    #: Each level cap checked and what it has used (settled + held, this call's hold included).
    levels: tuple[tuple[LevelCap, Micros], ...] = ()


@dataclass(frozen=True)
class AlertArgs:
    """What the scripts need to queue alert events for one tenant (``thresholds_ppm`` empty: none)."""

    limit_day: Micros
    limit_month: Micros
    thresholds_ppm: tuple[int, ...] = ()
    enabled: bool = False


@dataclass(frozen=True)
class Settlement:
    """What one settle did: ``applied`` is false when the id had already settled (a retry or replay
    that changed nothing); ``released`` is false when its reservation was no longer held."""

    applied: bool
    released: bool


@dataclass(frozen=True)
class PeriodSpend:
    spent: Micros
    reserved: Micros


@dataclass(frozen=True)
class Snapshot:
    """What the store holds for one tenant now."""

    day: PeriodSpend
    month: PeriodSpend
    override: dict[str, str]
    #: The period's last admission was a budget refusal.
    refused: bool = False
    #: Requests and tokens in the last minute's window.
    window_requests: int = 0
    window_tokens: int = 0


class LoggedCost(NamedTuple):
    """One logged call, as forecasts read it."""

    time_ms: int
    cost_micros: Micros
    outcome: str


class CallCosts(NamedTuple):
    """The store's time and each asked tenant's latest logged calls, newest first."""

    now_ms: int
    logs: list[list[LoggedCost]]


class KeyListing(NamedTuple):
    """A tenant's runtime API keys: metadata (JSON) and last use (epoch ms), each by key id."""

    meta: dict[str, str]
    used: dict[str, str]


@dataclass(frozen=True)
class JobArgs:
    """A call's job for the scripts: its id (``""``: none), its cap (``None``: none) and how long its
    counters are kept after its last call."""

    id: str = ""
    cap_micros: Micros | None = None
    ttl_s: int = 90 * 86400


NO_JOB = JobArgs()


@dataclass(frozen=True)
class JobUsage:
    """What one job (work order) has cost so far; ``by_model``: model -> the same counters."""

    job: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: Micros
    first_at_ms: int
    last_at_ms: int
    by_model: dict[str, dict[str, int]]

    @classmethod
    def from_hash(cls, job: str, fields: Mapping[str, str]) -> JobUsage:
        by_model: dict[str, dict[str, int]] = {}
        for name, value in fields.items():
            if name.startswith("model:"):
                model, _, counter = name[len("model:"):].rpartition(":")
                by_model.setdefault(model, {})[counter] = int(value)
        return cls(
            job=job, calls=int(fields.get("calls", 0)), prompt_tokens=int(fields.get("prompt_tokens", 0)),
            completion_tokens=int(fields.get("completion_tokens", 0)),
            cost_micros=int(fields.get("cost_micros", 0)), first_at_ms=int(fields.get("first_at", 0)),
            last_at_ms=int(fields.get("last_at", 0)), by_model=by_model,
        )


@dataclass(frozen=True)
class QueuedAlert:
    """One alert event claimed for delivery: its stream ``id`` and ``fields`` as the script wrote them."""

    tenant: str
    id: str
    fields: dict[str, str]
    attempts: int
    #: Indexes of the webhooks that already took it.
    delivered_to: set[int]


@dataclass(frozen=True)
class AlertRecord:
    """One queued alert event and how its delivery stands (``pending``, ``delivered``, ``dropped``)."""

    tenant: str
    id: str
    fields: dict[str, str]
    state: str
    attempts: int
    error: str
    next_attempt_ms: int | None


class Outcome(StrEnum):
    """How a call ended, as the audit log (``outcome``) records it."""

    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    #: The upstream stream broke or ended without its proper end.
    UPSTREAM_CUT = "upstream_cut"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    #: The upstream answered an error, or could not be reached.
    UPSTREAM_ERROR = "upstream_error"
    #: Served unbudgeted (``fail_open``) because the store could not be asked; otherwise complete.
    STORE_UNAVAILABLE = "store_unavailable"
    #: The proxy stopped (killed, crashed) mid-stream: charged what its last checkpoint had relayed.
    INTERRUPTED = "interrupted"
    #: Spend made outside the proxy, booked through ``POST /admin/tenants/{t}/spend``.
    EXTERNAL = "external"

    @classmethod
    def of_failure(cls, error: GuardError) -> Outcome:
        """The outcome of an upstream call that failed with ``error``."""
        return cls.UPSTREAM_TIMEOUT if error.kind is ErrorKind.UPSTREAM_TIMEOUT else cls.UPSTREAM_ERROR


@dataclass(frozen=True)
class LoopCount:
    """What the loop brake's count said of one request (``BudgetStore.count_repeat``)."""

    #: The window already held ``max_repeats`` identical requests: this one was not counted.
    over: bool
    #: Identical requests in the window, this one included.
    repeats: int
    #: ms until the window admits the request again (0 when it was admitted).
    retry_ms: int


@dataclass(frozen=True)
class VelocityCount:
    """The tenant's hourly spend after one charge (``BudgetStore.count_hourly_spend``)."""

    last_hour_micros: Micros
    #: The hourly average of the baseline hours (rounded down).
    average_micros: Micros
    #: This charge took the last hour over the factor first in its hour (the alert was queued).
    fired: bool


@dataclass(frozen=True)
class LoggedCall:
    """One entry of a tenant's call log: its stream id (``<settled ms>-<seq>``) and fields."""

    id: str
    fields: dict[str, str]

    @property
    def time_ms(self) -> int:
        return int(self.id.split("-")[0])
