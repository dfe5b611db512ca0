"""The budget page's rendering (guardproxy.admin_page): pure, so checked without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from guardproxy.admin.page import render_page
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.observe.state import PeriodState, TenantState

NOW = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)


def tenant(name: str, day_spent: int, *, reserved: int = 0, state: str = "active", daily: int = 1_000_000,
           hard_cap: str = "1.0", overridden: bool = False) -> TenantState:
    policy = BudgetPolicy(daily, 20_000_000, Decimal("0.8"), Decimal(hard_cap), "UTC")
    return TenantState(
        tenant=name, state=state,
        day=PeriodState("2026-11-22", daily, day_spent, reserved, NOW + timedelta(hours=5, minutes=30)),
        month=PeriodState("2026-11", 20_000_000, day_spent, reserved, NOW + timedelta(days=8, hours=5)),
        policy=policy, overridden=overridden,
    )


def test_values_are_escaped() -> None:
    evil = tenant("<script>alert(1)</script>", 0, state='"><img src=x>')
    page = render_page([evil], NOW)
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-state="&quot;&gt;&lt;img src=x&gt;"' in page


def test_page_is_self_contained_and_refreshes() -> None:
    page = render_page([tenant("acme", 0)], NOW)
    assert '<meta http-equiv="refresh" content="15">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "1 tenant: 1 active, 0 downgrading, 0 blocked" in page


def test_no_tenants() -> None:
    assert "No tenants configured or seen yet." in render_page([], NOW)


@pytest.mark.parametrize(
    ("spent", "reserved", "width", "colour"),
    [
        (0, 0, "0.0%", "active"),
        (799_999, 0, "80.0%", "active"),
        (800_000, 0, "80.0%", "downgrading"),
        (700_000, 100_000, "70.0%", "downgrading"),  # in-flight reservations count toward the caps
        (1_000_000, 0, "100.0%", "blocked"),
        (3_000_000, 0, "100.0%", "blocked"),  # over the limit: the bar stops at its end
    ],
)
def test_day_bar_width_and_colour(spent: int, reserved: int, width: str, colour: str) -> None:
    page = render_page([tenant("acme", spent, reserved=reserved)], NOW)
    day = page.split('data-period="day"', 1)[1].split("</td>", 1)[0]
    assert f'class="fill {colour}" data-colour="{colour}" style="width:{width}"' in day


def test_figures_caps_and_reset() -> None:
    page = render_page([tenant("acme", 850_000, reserved=20_000, overridden=True, hard_cap="0.95")], NOW)
    assert "$0.85 / $1.00 (85.0%) &middot; reserved $0.02" in page
    assert "soft 80% &middot; hard 95%" in page
    assert "runtime override" in page
    assert '<time datetime="2026-11-23T00:00:00Z">' in page and "(in 5 h 30 min)" in page
    assert "(in 8 d 5 h)" in page
    assert page.count('class="cap"') == 4  # soft and hard (below 100%) ticks on both bars


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "$0.00"), (12_340_000, "$12.34"), (9, "$0.000009"), (1_234_500, "$1.2345"), (2_000_000_000, "$2,000.00")],
)
def test_amounts_keep_sub_cent_spend_visible(micros: int, text: str) -> None:
    page = render_page([tenant("acme", micros, daily=10**12)], NOW)
    assert f"{text} / " in page
