"""``guardproxy status``: tenants' budget state as a table, read straight from the store."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import TextIO

from guardproxy.budget.forecast import PeriodForecast
from guardproxy.budget.periods import utc_now
from guardproxy.budget.pricing import format_usd
from guardproxy.budget.records import JobUsage
from guardproxy.config.settings import Config
from guardproxy.errors import StoreUnavailable
from guardproxy.observe.state import LevelState, PeriodState, TenantState, all_tenants, read_states
from guardproxy.store.redis import BudgetStore

BAR_WIDTH = 20


def bar(ratio: float) -> str:
    filled = max(0, min(BAR_WIDTH, round(ratio * BAR_WIDTH)))
    return "#" * filled + "." * (BAR_WIDTH - filled)


def _period(p: PeriodState) -> str:
    return (f"[{bar(p.utilization)}] {p.utilization * 100:5.1f}%  ${format_usd(p.spent)} / ${format_usd(p.limit)}"
            + (f" (+${format_usd(p.reserved)} held)" if p.reserved else "")
            + f"  resets {p.resets_at:%Y-%m-%d %H:%MZ}")


def _level(state: LevelState) -> str:
    """One cap of another level: ``key:ab12 hour`` and its use, as ``_period`` shows a day or month."""
    cap = state.cap
    ratio = state.spent / cap.limit if cap.limit else (1.0 if state.spent else 0.0)
    resets = f"  resets {cap.resets_at:%Y-%m-%d %H:%MZ}" if cap.resets_at else ""
    return (f"{cap.scope} {cap.window}  [{bar(ratio)}] {ratio * 100:5.1f}%  ${format_usd(state.spent)} / "
            f"${format_usd(cap.limit)}" + (f" (+${format_usd(state.held)} held)" if state.held else "") + resets)


def _forecast(forecast: PeriodForecast | None) -> str:
    """``projected $X`` at the period's end, and when the hard cap would be reached at this rate."""
    if forecast is None:
        return ""
    cap = f", hard cap at {forecast.hard_cap_at:%Y-%m-%d %H:%MZ}" if forecast.hard_cap_at else ""
    return f"  projected ${forecast.projected_micros / 1e6:,.2f}{cap}"


def render(states: list[TenantState]) -> str:
    width = max([len("TENANT"), *(len(s.tenant) for s in states)])
    lines = [f"{'TENANT':{width}}  {'STATE':11}  PERIOD  UTILIZATION"]
    for s in states:
        day, month = (s.forecast.day, s.forecast.month) if s.forecast else (None, None)
        lines.append(f"{s.tenant:{width}}  {s.state:11}  day     {_period(s.day)}{_forecast(day)}")
        lines.append(f"{'':{width}}  {'':11}  month   {_period(s.month)}{_forecast(month)}")
        for level in s.levels:
            lines.append(f"{'':{width}}  {'':11}  {_level(level)}")
    return "\n".join(lines)


def render_jobs(tenant: str, jobs: list[JobUsage]) -> str:
    """A tenant's jobs, most recently active first."""
    if not jobs:
        return f"{tenant}: no jobs on record"
    width = max([len("JOB"), *(len(j.job) for j in jobs)])
    lines = [f"{tenant}: jobs", f"  {'JOB':{width}}  {'CALLS':>6}  {'TOKENS':>10}  {'COST USD':>12}  LAST CALL"]
    for j in jobs:
        last = datetime.fromtimestamp(j.last_at_ms / 1000, UTC)
        lines.append(f"  {j.job:{width}}  {j.calls:>6}  {j.prompt_tokens + j.completion_tokens:>10}  "
                     f"{format_usd(j.cost_micros):>12}  {last:%Y-%m-%d %H:%M:%SZ}")
    return "\n".join(lines)


def render_semantic(tenant: str, hits: int, saved_micros: int) -> str:
    """What the semantic cache saved a tenant (its embeddings are in the spend above)."""
    return f"{tenant}: semantic cache: {hits} hit{'' if hits == 1 else 's'}, ${format_usd(saved_micros)} saved"


async def _states(config: Config, tenant: str | None, jobs: int = 0) -> tuple[list[TenantState], list[str]]:
    store = BudgetStore.from_config(config.store)
    try:
        tenants = [tenant] if tenant else await all_tenants(store, config)
        states = await read_states(store, config, tenants, utc_now())
        listings = [render_jobs(t, await store.recent_jobs(t, jobs)) for t in tenants] if jobs > 0 else []
        stats = await store.semantic_stats(tenants)
        listings += [render_semantic(t, *stats[t]) for t in tenants if stats[t][0]]
        return states, listings
    finally:
        await store.aclose()


def main(config: Config, tenant: str | None, out: TextIO = sys.stdout, *, jobs: int = 0) -> int:
    """Print the tenants' budget state; with ``jobs`` > 0, each tenant's latest ``jobs`` jobs too."""
    try:
        states, listings = asyncio.run(_states(config, tenant, jobs))
    except StoreUnavailable as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    print(render(states) if states else "no tenants yet", file=out)
    for listing in listings:
        print(listing, file=out)
    return 0
