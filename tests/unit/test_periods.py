"""A tenant's local day and month and their reset times, around midnights, year ends and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.periods import iso_utc, periods_at, utc_now

CHICAGO = ZoneInfo("America/Chicago")
UTC_ZONE = ZoneInfo("UTC")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def test_utc_midday() -> None:
    p = periods_at(utc(2026, 11, 22, 12, 0), UTC_ZONE)
    assert p.day == "2026-11-22"
    assert p.month == "2026-11"
    assert p.day_resets_at == utc(2026, 11, 23)
    assert p.month_resets_at == utc(2026, 12, 1)
    assert p.day_resets_at.tzinfo == UTC


def test_utc_around_midnight() -> None:
    before = periods_at(utc(2026, 11, 22, 23, 59, 59, 999999), UTC_ZONE)
    at = periods_at(utc(2026, 11, 23, 0, 0), UTC_ZONE)
    assert before.day == "2026-11-22"
    assert at.day == "2026-11-23"
    assert before.day_resets_at == at.day_resets_at - timedelta(days=1) == utc(2026, 11, 23)


def test_chicago_contract_example() -> None:
    # contract §5: day 2026-11-22 in Chicago resets at 2026-11-23T06:00:00Z, the month at 2026-12-01T06:00:00Z
    p = periods_at(utc(2026, 11, 22, 18, 0), CHICAGO)
    assert (p.day, p.month) == ("2026-11-22", "2026-11")
    assert iso_utc(p.day_resets_at) == "2026-11-23T06:00:00Z"
    assert iso_utc(p.month_resets_at) == "2026-12-01T06:00:00Z"


def test_chicago_local_midnight_is_not_utc_midnight() -> None:
    # 2026-11-23 03:00 UTC is still 2026-11-22 21:00 in Chicago (CST, UTC-6)
    assert periods_at(utc(2026, 11, 23, 3, 0), CHICAGO).day == "2026-11-22"
    assert periods_at(utc(2026, 11, 23, 5, 59, 59), CHICAGO).day == "2026-11-22"
    assert periods_at(utc(2026, 11, 23, 6, 0), CHICAGO).day == "2026-11-23"


def test_chicago_month_boundary_in_utc() -> None:
    # 2026-12-01 03:00 UTC is 2026-11-30 21:00 in Chicago: still November there
    p = periods_at(utc(2026, 12, 1, 3, 0), CHICAGO)
    assert (p.day, p.month) == ("2026-11-30", "2026-11")
    assert p.month_resets_at == utc(2026, 12, 1, 6)
    assert p.day_resets_at == utc(2026, 12, 1, 6)


def test_year_rollover_utc() -> None:
    p = periods_at(utc(2026, 12, 31, 23, 0), UTC_ZONE)
    assert (p.day, p.month) == ("2026-12-31", "2026-12")
    assert p.day_resets_at == utc(2027, 1, 1)
    assert p.month_resets_at == utc(2027, 1, 1)


def test_year_rollover_chicago() -> None:
    # 2027-01-01 02:00 UTC is 2026-12-31 20:00 in Chicago
    p = periods_at(utc(2027, 1, 1, 2, 0), CHICAGO)
    assert (p.day, p.month) == ("2026-12-31", "2026-12")
    assert p.day_resets_at == utc(2027, 1, 1, 6)
    assert p.month_resets_at == utc(2027, 1, 1, 6)


def test_january_to_february_and_leap_day() -> None:
    p = periods_at(utc(2028, 1, 15), UTC_ZONE)
    assert p.month_resets_at == utc(2028, 2, 1)
    leap = periods_at(utc(2028, 2, 29, 12), UTC_ZONE)
    assert (leap.day, leap.month) == ("2028-02-29", "2028-02")
    assert leap.day_resets_at == utc(2028, 3, 1)
    assert leap.month_resets_at == utc(2028, 3, 1)


def test_november_month_reset() -> None:
    assert periods_at(utc(2026, 11, 5), UTC_ZONE).month_resets_at == utc(2026, 12, 1)


def test_dst_start_chicago() -> None:
    # 2026-03-08: clocks go 02:00 CST -> 03:00 CDT. The day starts at 06:00 UTC, ends at 05:00 UTC (23 hours).
    before = periods_at(utc(2026, 3, 7, 18), CHICAGO)
    assert before.day == "2026-03-07"
    assert before.day_resets_at == utc(2026, 3, 8, 6)
    on = periods_at(utc(2026, 3, 8, 18), CHICAGO)
    assert on.day == "2026-03-08"
    assert on.day_resets_at == utc(2026, 3, 9, 5)
    assert on.day_resets_at - before.day_resets_at == timedelta(hours=23)
    assert on.month_resets_at == utc(2026, 4, 1, 5)  # April starts in CDT


def test_dst_end_chicago() -> None:
    # 2026-11-01: clocks go 02:00 CDT -> 01:00 CST. The day lasts 25 hours.
    before = periods_at(utc(2026, 10, 31, 18), CHICAGO)
    assert before.day_resets_at == utc(2026, 11, 1, 5)
    assert before.month_resets_at == utc(2026, 11, 1, 5)
    on = periods_at(utc(2026, 11, 1, 18), CHICAGO)
    assert on.day == "2026-11-01"
    assert on.day_resets_at == utc(2026, 11, 2, 6)
    assert on.day_resets_at - before.day_resets_at == timedelta(hours=25)
    # inside the repeated hour (01:30 CDT and 01:30 CST) it is still the same day
    assert periods_at(utc(2026, 11, 1, 6, 30), CHICAGO).day == "2026-11-01"
    assert periods_at(utc(2026, 11, 1, 7, 30), CHICAGO).day == "2026-11-01"


def test_dst_gap_at_midnight_santiago() -> None:
    # Chile springs forward at local midnight: 2024-09-08 00:00 does not exist; the day starts at
    # the transition, 04:00 UTC (00:00 -04 == 01:00 -03).
    santiago = ZoneInfo("America/Santiago")
    p = periods_at(utc(2024, 9, 7, 16), santiago)
    assert p.day == "2024-09-07"
    assert p.day_resets_at == utc(2024, 9, 8, 4)
    assert periods_at(p.day_resets_at, santiago).day == "2024-09-08"
    assert periods_at(p.day_resets_at - timedelta(microseconds=1), santiago).day == "2024-09-07"


def test_positive_offset_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    p = periods_at(utc(2026, 5, 31, 15, 0), tokyo)  # 2026-06-01 00:00 JST
    assert (p.day, p.month) == ("2026-06-01", "2026-06")
    assert p.day_resets_at == utc(2026, 6, 1, 15)
    assert p.month_resets_at == utc(2026, 6, 30, 15)


def test_non_utc_input_timezone() -> None:
    berlin_noon = datetime(2026, 7, 1, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    assert periods_at(berlin_noon, CHICAGO).day == "2026-07-01"
    assert periods_at(berlin_noon, CHICAGO).day_resets_at == utc(2026, 7, 2, 5)


@pytest.mark.parametrize(
    ("now", "period", "seconds"),
    [
        (utc(2026, 11, 22, 23, 59, 0), "day", 60),
        (utc(2026, 11, 22, 23, 59, 59, 500_000), "day", 1),
        (utc(2026, 11, 22, 23, 59, 59, 999_999), "day", 1),
        (utc(2026, 11, 22, 0, 0, 0), "day", 86400),
        (utc(2026, 11, 30, 23, 0, 0), "month", 3600),
    ],
)
def test_seconds_until_reset(now: datetime, period: str, seconds: int) -> None:
    assert periods_at(now, UTC_ZONE).seconds_until_reset(period, now) == seconds


def test_seconds_until_reset_after_reset_is_one() -> None:
    p = periods_at(utc(2026, 11, 22, 12), UTC_ZONE)
    assert p.seconds_until_reset("day", utc(2026, 11, 23, 0, 0, 5)) == 1
    assert p.seconds_until_reset("month", utc(2027, 1, 1)) == 1


zones = st.sampled_from(["UTC", "America/Chicago", "America/Santiago", "Europe/Berlin", "Asia/Kolkata",
                         "Australia/Lord_Howe", "Pacific/Kiritimati", "America/St_Johns"])
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(moments, zones)
def test_period_properties(now: datetime, zone: str) -> None:
    tz = ZoneInfo(zone)
    p = periods_at(now, tz)
    assert p.day_resets_at > now
    assert p.month_resets_at >= p.day_resets_at
    assert p.day_resets_at - now <= timedelta(hours=27)
    assert p.seconds_until_reset("day", now) >= 1
    assert p.seconds_until_reset("month", now) >= 1
    # the reset instant starts the next local day, and the instant before still belongs to this one
    after = periods_at(p.day_resets_at, tz)
    assert after.day > p.day
    assert periods_at(p.day_resets_at - timedelta(microseconds=1), tz).day == p.day
    assert periods_at(p.month_resets_at, tz).month > p.month
    assert p.day.startswith(p.month)


def test_utc_now_is_aware() -> None:
    now = utc_now()
    assert now.tzinfo == UTC
    assert abs((datetime.now(UTC) - now).total_seconds()) < 5


def test_iso_utc() -> None:
    assert iso_utc(datetime(2026, 11, 23, 0, 0, 0, 123, tzinfo=CHICAGO)) == "2026-11-23T06:00:00Z"
