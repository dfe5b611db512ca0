"""The read-only budget page at ``GET /admin/``: tenants' state as server-rendered HTML.

Pure: it renders the ``TenantState`` list the admin API reads, with no I/O. One self-contained
document (inline CSS, no scripts, no external assets) that reloads itself every 15 seconds; every
value that reaches the markup goes through ``html.escape``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from html import escape

from guardproxy.budget.decision import ACTIVE, BLOCKED, DOWNGRADING, Thresholds
from guardproxy.budget.periods import iso_utc
from guardproxy.budget.pricing import format_usd
from guardproxy.observe.state import PeriodState, TenantState
from guardproxy.types import Micros

REFRESH_S = 15

_CSS = """
:root { --active: #2f9e44; --downgrading: #e8890c; --blocked: #d6336c; --ink: #1f2933; --muted: #66727f;
        --line: #e3e7eb; --track: #eef1f4; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f8f9fb; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 16px; }
h1 { font-size: 20px; margin: 0; }
.summary { color: var(--muted); }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 10px 12px; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line); }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); font-weight: 600; }
td.tenant { font-weight: 600; font-size: 15px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; color: #fff; font-size: 12px;
         font-weight: 600; }
.badge.active { background: var(--active); } .badge.downgrading { background: var(--downgrading); }
.badge.blocked { background: var(--blocked); }
.period { min-width: 260px; width: 30%; }
.bar { position: relative; height: 14px; background: var(--track); border-radius: 7px; overflow: hidden;
       margin: 4px 0; }
.fill { height: 100%; border-radius: 7px; }
.fill.active { background: var(--active); } .fill.downgrading { background: var(--downgrading); }
.fill.blocked { background: var(--blocked); }
.cap { position: absolute; top: 0; bottom: 0; width: 2px; background: rgba(31, 41, 51, .45); }
.figures { font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); font-size: 12px; }
.override { color: var(--downgrading); font-size: 12px; }
footer { margin-top: 12px; color: var(--muted); font-size: 12px; }
"""


def render_page(states: Sequence[TenantState], now: datetime,
                semantic: Mapping[str, tuple[int, Micros]] | None = None) -> str:
    """The whole HTML document for ``states``, as read at ``now``; ``semantic``: each tenant's
    semantic-cache hits and the micro-USD they saved (tenants without hits are left out)."""
    counts = {s: sum(1 for t in states if t.state == s) for s in (ACTIVE, DOWNGRADING, BLOCKED)}
    summary = f"{len(states)} tenant{'' if len(states) == 1 else 's'}: " + ", ".join(
        f"{n} {name}" for name, n in counts.items()
    )
    if states:
        rows = "\n".join(_tenant_row(state, now) for state in states)
    else:
        rows = '<tr><td colspan="5" class="muted">No tenants configured or seen yet.</td></tr>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guardproxy budgets</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>guardproxy budgets</h1><span class="summary">{escape(summary)}</span></header>
<table>
<thead><tr><th>Tenant</th><th>State</th><th>Today</th><th>This month</th><th>Caps</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{_semantic_section(semantic or {})}
<footer>Read from the budget store at <time datetime="{iso_utc(now)}">{escape(iso_utc(now))}</time>;
refreshes every {REFRESH_S} s. Bars show settled spend against the limit; the ticks mark the soft and hard caps.
The same figures as JSON: <a href="/admin/tenants">/admin/tenants</a>.</footer>
</body>
</html>
"""


def _semantic_section(semantic: Mapping[str, tuple[int, Micros]]) -> str:
    lines = [f"<li>{escape(tenant)}: {hits} hit{'' if hits == 1 else 's'}, ${escape(format_usd(saved))} saved</li>"
             for tenant, (hits, saved) in sorted(semantic.items()) if hits]
    if not lines:
        return ""
    return '<section class="semantic"><h2>Semantic cache</h2><ul>' + "".join(lines) + "</ul></section>"


def _tenant_row(state: TenantState, now: datetime) -> str:
    policy = state.policy
    limits = Thresholds.for_policy(policy)
    tenant = escape(state.tenant)
    override = '<div class="override">runtime override</div>' if state.overridden else ""
    day = _period_cell("day", state.day, limits.soft_day, limits.hard_day, state, now)
    month = _period_cell("month", state.month, limits.soft_month, limits.hard_month, state, now)
    return (
        f'<tr class="tenant-row" data-tenant="{tenant}" data-state="{escape(state.state)}">'
        f'<td class="tenant">{tenant}</td>'
        f'<td><span class="badge {escape(state.state)}">{escape(state.state)}</span>{override}</td>'
        f"{day}{month}"
        f'<td class="caps">soft {_percent(policy.soft_cap)} &middot; hard {_percent(policy.hard_cap)}'
        f'<div class="muted">timezone {escape(policy.timezone)}</div>{_rate_limits(state)}{_levels(state)}</td>'
        "</tr>"
    )


def _levels(state: TenantState) -> str:
    """The other levels and windows that cap the tenant's calls (global, its hour and week, its models)."""
    items = "".join(
        f'<li data-level="{escape(lv.cap.level)}" data-window="{escape(lv.cap.window)}">'
        f"{escape(lv.cap.scope)} {escape(lv.cap.window)}: {escape(_usd(lv.spent))} / {escape(_usd(lv.cap.limit))}"
        + (f" &middot; reserved {escape(_usd(lv.held))}" if lv.held else "") + "</li>"
        for lv in state.levels
    )
    return f'<ul class="muted levels">{items}</ul>' if items else ""


def _period_cell(name: str, period: PeriodState, soft: Micros, hard: Micros, state: TenantState, now: datetime) -> str:
    # The bar's colour is this period's own state, so the day and month that put a tenant in its
    # state stand out; the badge is the tenant's overall state.
    used = period.spent + period.reserved
    colour = BLOCKED if used >= hard else DOWNGRADING if used >= soft else ACTIVE
    width = f"{min(period.utilization, 1.0) * 100:.1f}%"
    ticks = "".join(
        f'<span class="cap" style="left:calc({_percent(cap)} - 1px)"></span>'
        for cap in (state.policy.soft_cap, state.policy.hard_cap) if cap < 1
    )
    reserved = f" &middot; reserved {escape(_usd(period.reserved))}" if period.reserved else ""
    resets = iso_utc(period.resets_at)
    return (
        f'<td class="period" data-period="{name}" data-utilization="{period.utilization:.6f}">'
        f'<div class="muted">{escape(period.period)}</div>'
        f'<div class="bar" role="progressbar" aria-label="{name} utilization" aria-valuemin="0" aria-valuemax="100"'
        f' aria-valuenow="{period.utilization * 100:.1f}">'
        f'<div class="fill {colour}" data-colour="{colour}" style="width:{width}"></div>{ticks}</div>'
        f'<div class="figures">{escape(_usd(period.spent))} / {escape(_usd(period.limit))}'
        f" ({period.utilization * 100:.1f}%){reserved}</div>"
        f'<div class="muted">resets <time datetime="{resets}">{escape(resets)}</time>'
        f" ({escape(_until(period.resets_at, now))})</div>"
        f"{_forecast_line(name, state, now)}"
        "</td>"
    )


def _rate_limits(state: TenantState) -> str:
    """The tenant's per-minute limits and how full the current window is (nothing without limits)."""
    parts = []
    if state.policy.rpm:
        parts.append(f"{state.window_requests}/{state.policy.rpm} requests")
    if state.policy.tpm:
        parts.append(f"{state.window_tokens}/{state.policy.tpm} tokens")
    return f'<div class="muted rate">last minute: {" &middot; ".join(parts)}</div>' if parts else ""


def _forecast_line(name: str, state: TenantState, now: datetime) -> str:
    """Projected spend at the period's end, and when the hard cap would be reached at this rate."""
    if state.forecast is None:
        return ""
    forecast = state.forecast.day if name == "day" else state.forecast.month
    cap = ""
    if forecast.hard_cap_at is not None:
        at = iso_utc(forecast.hard_cap_at)
        cap = f' &middot; hard cap <time datetime="{at}">{escape(_until(forecast.hard_cap_at, now))}</time>'
    return (f'<div class="forecast muted" data-projected-usd="{forecast.projected_micros / 1_000_000:.6f}">'
            f"projected {escape(_usd(forecast.projected_micros))}{cap}</div>")


def _usd(micros: Micros) -> str:
    return f"${format_usd(micros)}"


def _percent(fraction: Decimal) -> str:
    return f"{(fraction * 100).normalize():f}%"


def _until(moment: datetime, now: datetime) -> str:
    minutes = max(0, int((moment - now).total_seconds()) // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"in {days} d {hours} h"
    return f"in {hours} h {minutes} min" if hours else f"in {minutes} min"
