"""A charge no admission booked keeps its levels wherever it waits: the journal's line (and back), so
a call served unbudgeted under ``fail_open`` is charged at every level when the store takes it."""

from __future__ import annotations

import orjson

from guardproxy.budget.levels import LevelCap, booked_caps, caps_booked
from guardproxy.budget.records import Reservation
from guardproxy.store.journal import Entry

CAPS = (LevelCap("global", "global", "day", "2026-11-22", 500, 500, 500),
        LevelCap("model", "model:gpt-4o", "hour", "2026-11-22T12", 900, 900, 900, model="gpt-4o"))


def test_a_journal_line_keeps_the_levels_of_an_unbooked_charge() -> None:
    entry = Entry(Reservation("r1", "acme", "2026-11-22", "2026-11", 700, "job-1", CAPS), 650, {"model": "gpt-4o"})
    back = Entry.from_line(entry.to_line())
    assert back.reservation.levels == CAPS and back == entry


def test_a_line_without_levels_reads_as_before() -> None:
    line = orjson.dumps({"id": "r1", "tenant": "acme", "day": "2026-11-22", "month": "2026-11", "amount": 7,
                         "job": "", "charge": 5, "record": None}) + b"\n"
    assert Entry.from_line(line).reservation.levels == ()
    assert b"levels" not in Entry(Reservation("r2", "acme", "2026-11-22", "2026-11", 7), 5).to_line()


def test_booked_caps_round_trip_through_json() -> None:
    assert caps_booked(orjson.loads(orjson.dumps(booked_caps(CAPS)))) == CAPS
    assert caps_booked(None) == ()
