"""The budget decision (contract §4): thresholds, the decision table, state and remaining."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.decision import ACTIVE, BLOCKED, DOWNGRADING, Decision, Thresholds, decide, remaining, state_of
from guardproxy.budget.policy import BudgetPolicy

USD = 1_000_000
# 10 USD a day, 200 a month, soft 0.8, hard 1.0
LIMITS = Thresholds(soft_day=8 * USD, hard_day=10 * USD, soft_month=160 * USD, hard_month=200 * USD)


# --- thresholds ------------------------------------------------------------------------------


def test_from_limits_is_exact() -> None:
    t = Thresholds.from_limits(10 * USD, 200 * USD, Decimal("0.8"), Decimal("1.0"))
    assert t == LIMITS
    assert t.soft_day == 8_000_000  # float 0.8 * 10_000_000 would be 8000000.000000001 -> ceil 8000001


def test_from_limits_rounds_soft_up_and_hard_down() -> None:
    # 0.8 * 7 = 5.6 -> soft 6; 0.9 * 7 = 6.3 -> hard 6
    t = Thresholds.from_limits(7, 13, Decimal("0.8"), Decimal("0.9"))
    assert t.soft_day == 6
    assert t.hard_day == 6
    # 0.8 * 13 = 10.4 -> 11; 0.9 * 13 = 11.7 -> 11
    assert t.soft_month == 11
    assert t.hard_month == 11


def test_from_limits_odd_values() -> None:
    t = Thresholds.from_limits(333_333, 1, Decimal("0.333333"), Decimal("1.5"))
    assert t.soft_day == 111_111  # 111110.888889 -> 111111
    assert t.hard_day == 499_999  # 499999.5 -> 499999
    assert t.soft_month == 1  # 0.333333 -> 1
    assert t.hard_month == 1  # 1.5 -> 1


def test_from_limits_integral_products_are_not_moved() -> None:
    t = Thresholds.from_limits(100, 100, Decimal("0.25"), Decimal("0.75"))
    assert (t.soft_day, t.hard_day) == (25, 75)


def test_for_policy() -> None:
    policy = BudgetPolicy(10 * USD, 200 * USD, Decimal("0.8"), Decimal("1.0"), "UTC")
    assert Thresholds.for_policy(policy) == LIMITS


@given(
    st.integers(0, 10**13), st.integers(0, 10**13),
    st.decimals(min_value=0, max_value=2, places=6), st.decimals(min_value=Decimal("0.000001"), max_value=2, places=6),
)
def test_from_limits_matches_definition(day: int, month: int, soft: Decimal, hard: Decimal) -> None:
    t = Thresholds.from_limits(day, month, soft, hard)
    # soft is the smallest integer spend with spend/limit >= soft_cap; hard the largest with <= hard_cap.
    for value, limit, cap in ((t.soft_day, day, soft), (t.soft_month, month, soft)):
        assert value >= cap * limit
        assert value - 1 < cap * limit
    for value, limit, cap in ((t.hard_day, day, hard), (t.hard_month, month, hard)):
        assert value <= cap * limit
        assert value + 1 > cap * limit


# --- the decision table ----------------------------------------------------------------------


def test_under_soft_cap_sends_requested_model() -> None:
    assert decide(1 * USD, 1 * USD, LIMITS, [USD, USD // 10]) == Decision(0, 1 * USD, 1 * USD)


def test_just_under_soft_cap_sends_requested_model() -> None:
    assert decide(8 * USD - 1, 0, LIMITS, [1, 1]).index == 0


def test_at_day_soft_cap_downgrades_one_tier() -> None:
    d = decide(8 * USD, 0, LIMITS, [USD, USD // 10, USD // 100])
    assert d.index == 1
    assert d.admitted
    assert d.exhausted is None


def test_at_month_soft_cap_downgrades() -> None:
    assert decide(0, 160 * USD, LIMITS, [USD, USD // 10]).index == 1


def test_at_soft_cap_without_downgrade_sends_requested() -> None:
    assert decide(9 * USD, 0, LIMITS, [USD]).index == 0


def test_at_soft_cap_when_downgrade_does_not_fit_keeps_requested() -> None:
    # An odd chain where the "cheaper" tier has a larger worst case (e.g. a bigger max_output_tokens).
    assert decide(8 * USD, 0, LIMITS, [USD, 3 * USD]).index == 0


def test_soft_cap_downgrades_only_one_tier() -> None:
    assert decide(9 * USD, 0, LIMITS, [USD // 2, USD // 4, USD // 8]).index == 1


def test_over_hard_takes_first_cheaper_that_fits() -> None:
    # used 9.5 USD of 10: 2 USD does not fit, 1 USD does not fit, 0.4 fits.
    d = decide(9_500_000, 0, LIMITS, [2 * USD, 1 * USD, 400_000])
    assert d == Decision(2, 9_500_000, 0)


def test_over_hard_second_tier_fits() -> None:
    assert decide(9_500_000, 0, LIMITS, [2 * USD, 400_000, 100_000]).index == 1


def test_over_hard_by_month() -> None:
    assert decide(0, 199 * USD, LIMITS, [2 * USD, 1 * USD, 400_000]).index == 1


def test_none_fits_day_exhausted() -> None:
    d = decide(9_900_000, 100 * USD, LIMITS, [2 * USD, 1 * USD, 200_000])
    assert d == Decision(None, 9_900_000, 100 * USD, "day")
    assert not d.admitted


def test_none_fits_month_exhausted() -> None:
    d = decide(0, 199_900_000, LIMITS, [2 * USD, 1 * USD, 200_000])
    assert d.index is None
    assert d.exhausted == "month"


def test_both_exhausted_reports_month() -> None:
    # The month resets later than the day: reporting it gives the honest retry-after.
    assert decide(10 * USD, 200 * USD, LIMITS, [1]).exhausted == "month"


def test_exact_boundary_admitted_one_more_refused() -> None:
    assert decide(9 * USD, 0, LIMITS, [1 * USD]).index == 0
    assert decide(9 * USD + 1, 0, LIMITS, [1 * USD]).index is None
    assert decide(0, 199 * USD, LIMITS, [1 * USD]).index == 0
    assert decide(0, 199 * USD + 1, LIMITS, [1 * USD]).exhausted == "month"


def test_exact_boundary_on_downgrade() -> None:
    assert decide(9 * USD, 0, LIMITS, [2 * USD, 1 * USD]).index == 1
    assert decide(9 * USD, 0, LIMITS, [2 * USD, 1 * USD + 1]).index is None


def test_zero_worst_case_fits_at_the_cap() -> None:
    assert decide(10 * USD, 0, LIMITS, [0]).index == 0


# --- state and remaining ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "month", "state"),
    [
        (0, 0, ACTIVE),
        (8 * USD - 1, 160 * USD - 1, ACTIVE),
        (8 * USD, 0, DOWNGRADING),
        (0, 160 * USD, DOWNGRADING),
        (10 * USD - 1, 0, DOWNGRADING),
        (10 * USD, 0, BLOCKED),
        (0, 200 * USD, BLOCKED),
        (11 * USD, 0, BLOCKED),
    ],
)
def test_state_of(day: int, month: int, state: str) -> None:
    assert state_of(day, month, LIMITS) == state


@pytest.mark.parametrize(
    ("day", "month", "left"),
    [
        (0, 0, 10 * USD),
        (3 * USD, 0, 7 * USD),
        (0, 195 * USD, 5 * USD),
        (3 * USD, 195 * USD, 5 * USD),
        (10 * USD, 0, 0),
        (12 * USD, 0, 0),
    ],
)
def test_remaining(day: int, month: int, left: int) -> None:
    assert remaining(day, month, LIMITS) == left


# --- properties ------------------------------------------------------------------------------


@st.composite
def thresholds(draw: st.DrawFn) -> Thresholds:
    hard_day = draw(st.integers(0, 10**9))
    hard_month = draw(st.integers(0, 10**10))
    return Thresholds(
        soft_day=draw(st.integers(0, hard_day)), hard_day=hard_day,
        soft_month=draw(st.integers(0, hard_month)), hard_month=hard_month,
    )


used = st.integers(0, 2 * 10**10)
worst_cases = st.lists(st.integers(0, 10**9), min_size=1, max_size=4)


@given(used, used, thresholds(), worst_cases)
def test_admitted_candidate_fits_both_hard_caps(day: int, month: int, limits: Thresholds, worst: list[int]) -> None:
    d = decide(day, month, limits, worst)
    assert (d.used_day, d.used_month) == (day, month)
    if d.index is not None:
        assert 0 <= d.index < len(worst)
        assert day + worst[d.index] <= limits.hard_day
        assert month + worst[d.index] <= limits.hard_month
        assert d.exhausted is None


@given(used, used, thresholds(), worst_cases)
def test_refused_only_when_nothing_fits(day: int, month: int, limits: Thresholds, worst: list[int]) -> None:
    d = decide(day, month, limits, worst)
    anything_fits = any(day + w <= limits.hard_day and month + w <= limits.hard_month for w in worst)
    assert d.admitted == anything_fits
    if not d.admitted:
        assert d.exhausted in ("day", "month")
        cheapest = worst[-1]
        if d.exhausted == "day":
            assert day + cheapest > limits.hard_day
        else:
            assert month + cheapest > limits.hard_month


@given(used, used, thresholds(), worst_cases)
def test_requested_model_kept_when_it_fits_below_soft(
    day: int, month: int, limits: Thresholds, worst: list[int]
) -> None:
    d = decide(day, month, limits, worst)
    fits0 = day + worst[0] <= limits.hard_day and month + worst[0] <= limits.hard_month
    soft = day >= limits.soft_day or month >= limits.soft_month
    if fits0 and not soft:
        assert d.index == 0
    if fits0 and soft and len(worst) > 1:
        assert d.index in (0, 1)
    if not fits0 and d.index is not None:
        # the first (cheapest-first order as given) candidate that fits, never an earlier one
        assert d.index >= 1
        assert all(day + w > limits.hard_day or month + w > limits.hard_month for w in worst[: d.index])


def test_rate_limit_durations_read_like_openais() -> None:
    from guardproxy.budget.ratelimit import duration

    assert [duration(ms) for ms in (0, 20, 999, 1000, 1500, 59_999, 60_000, 360_000, 61_250)] == [
        "0ms", "20ms", "999ms", "1s", "1.5s", "59.999s", "1m0s", "6m0s", "1m1.25s",
    ]


def test_format_usd_keeps_sub_cent_digits() -> None:
    from guardproxy.budget.pricing import format_usd

    assert [format_usd(m) for m in (0, 500, 5_000, 10_000, 1_234_567, 1_500_000, 250_000_000)] == [
        "0.00", "0.0005", "0.005", "0.01", "1.234567", "1.50", "250.00",
    ]
