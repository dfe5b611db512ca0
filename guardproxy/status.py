"""``guardproxy status``: tenants' budget state as a table, read straight from the store."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from guardproxy.config import Config
from guardproxy.errors import StoreUnavailable
from guardproxy.forecast import PeriodForecast
from guardproxy.periods import utc_now
from guardproxy.state import PeriodState, TenantState, all_tenants, read_states
from guardproxy.store import BudgetStore

BAR_WIDTH = 20


def bar(ratio: float) -> str:
    filled = max(0, min(BAR_WIDTH, round(ratio * BAR_WIDTH)))
    return "#" * filled + "." * (BAR_WIDTH - filled)


def _period(p: PeriodState) -> str:
    return (f"[{bar(p.utilization)}] {p.utilization * 100:5.1f}%  ${p.spent / 1e6:,.2f} / ${p.limit / 1e6:,.2f}"
            + (f" (+${p.reserved / 1e6:,.2f} held)" if p.reserved else "")
            + f"  resets {p.resets_at:%Y-%m-%d %H:%MZ}")


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
    return "\n".join(lines)


async def _states(config: Config, tenant: str | None) -> list[TenantState]:
    store = BudgetStore.from_config(config.store)
    try:
        tenants = [tenant] if tenant else await all_tenants(store, config)
        return await read_states(store, config, tenants, utc_now())
    finally:
        await store.aclose()


def main(config: Config, tenant: str | None, out: TextIO = sys.stdout) -> int:
    if config.store.embedded:
        print("note: store.redis_url is empty, so this reads a fresh embedded store (a running proxy's "
              "embedded store lives only in its own process)", file=sys.stderr)
    try:
        states = asyncio.run(_states(config, tenant))
    except StoreUnavailable as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    print(render(states) if states else "no tenants yet", file=out)
    return 0
