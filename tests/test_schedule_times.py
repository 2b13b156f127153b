"""When schedules trigger: cron across daylight-saving changes in two time zones, and intervals without drift."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.schedule_times import (
    CronTiming,
    IntervalTiming,
    count_between,
    cron_problem,
    next_times,
    timezone_problem,
    zone_of,
)

UTC = dt.timezone.utc


def utc(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)


def local(moments: list[dt.datetime], zone: str) -> list[str]:
    """Each instant as the wall clock of `zone` shows it, with its offset."""
    return [moment.astimezone(zone_of(zone)).strftime("%m-%d %H:%M%z") for moment in moments]


# --- spring forward: the wall time does not exist ----------------------------------------


@pytest.mark.parametrize(
    ("zone", "day_before", "expected"),
    [
        # New York, 2026-03-08: 02:00 EST becomes 03:00 EDT.
        ("America/New_York", utc(2026, 3, 7, 12), ["03-08 03:00-0400", "03-09 02:30-0400", "03-10 02:30-0400"]),
        # Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST.
        ("Europe/Berlin", utc(2026, 3, 28, 12), ["03-29 03:00+0200", "03-30 02:30+0200", "03-31 02:30+0200"]),
    ],
)
def test_a_time_in_the_spring_gap_runs_once_when_the_clock_has_jumped(
    zone: str, day_before: dt.datetime, expected: list[str]
) -> None:
    """02:30 does not exist that night: the job runs once, at 03:00 (as cron does), not zero or two times."""
    assert local(next_times(CronTiming("30 2 * * *", zone), day_before, 3), zone) == expected


def test_several_times_in_the_gap_collapse_into_one_run() -> None:
    times = next_times(CronTiming("*/15 2 * * *", "Europe/Berlin"), utc(2026, 3, 28, 12), 5)
    assert local(times, "Europe/Berlin") == [
        "03-29 03:00+0200",  # 02:00, 02:15, 02:30 and 02:45 that night: one run
        "03-30 02:00+0200", "03-30 02:15+0200", "03-30 02:30+0200", "03-30 02:45+0200",
    ]


def test_an_hourly_job_keeps_its_hours_across_the_gap() -> None:
    times = next_times(CronTiming("0 * * * *", "America/New_York"), utc(2026, 3, 8, 5, 30), 3)
    assert local(times, "America/New_York") == ["03-08 01:00-0500", "03-08 03:00-0400", "03-08 04:00-0400"]
    # ... each an hour after the one before.
    assert [b - a for a, b in zip(times, times[1:])] == [dt.timedelta(hours=1)] * 2


# --- fall back: the wall time happens twice ----------------------------------------------


@pytest.mark.parametrize(
    ("zone", "expression", "day_before", "expected"),
    [
        # New York, 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
        ("America/New_York", "30 1 * * *", utc(2026, 10, 31, 12), ["11-01 01:30-0400", "11-02 01:30-0500"]),
        # Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        ("Europe/Berlin", "30 2 * * *", utc(2026, 10, 24, 12), ["10-25 02:30+0200", "10-26 02:30+0100"]),
    ],
)
def test_a_time_in_the_autumn_overlap_runs_once_at_its_first_occurrence(
    zone: str, expression: str, day_before: dt.datetime, expected: list[str]
) -> None:
    assert local(next_times(CronTiming(expression, zone), day_before, 2), zone) == expected


def test_a_job_with_a_wildcard_hour_runs_in_both_occurrences_of_the_repeated_hour() -> None:
    """`30 * * * *` is hourly: the repeated hour is an hour of real time, so it runs then too."""
    times = next_times(CronTiming("30 * * * *", "America/New_York"), utc(2026, 11, 1, 4), 4)
    assert local(times, "America/New_York") == [
        "11-01 00:30-0400", "11-01 01:30-0400", "11-01 01:30-0500", "11-01 02:30-0500",
    ]
    assert [b - a for a, b in zip(times, times[1:])] == [dt.timedelta(hours=1)] * 3


def test_the_second_occurrence_is_found_from_inside_the_overlap() -> None:
    """Asked just after the first 01:30, the next hourly run is the second 01:30, an hour later."""
    after_first = utc(2026, 11, 1, 5, 31)  # 01:31 EDT
    assert local(next_times(CronTiming("30 * * * *", "America/New_York"), after_first, 1), "America/New_York") == [
        "11-01 01:30-0500"
    ]


def test_times_are_strictly_after_the_given_instant_and_in_utc() -> None:
    times = next_times(CronTiming("0 9 * * *", "Asia/Shanghai"), utc(2026, 12, 3, 1, 0), 2)
    assert times == [utc(2026, 12, 4, 1, 0), utc(2026, 12, 5, 1, 0)]
    assert all(moment.tzinfo == UTC for moment in times)


# --- intervals -----------------------------------------------------------------------------


def test_interval_triggers_stay_on_their_grid_whatever_the_runs_take() -> None:
    """A slow run does not shift later triggers: they fall at anchor + k * every_s."""
    timing = IntervalTiming(60, utc(2026, 1, 1, 0, 0, 0))
    # Asked at any moment (after a run that took 59 s, or 1 s), the next trigger is on the grid.
    assert next_times(timing, utc(2026, 1, 1, 0, 0, 59), 2) == [utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 2)]
    assert next_times(timing, utc(2026, 1, 1, 0, 1, 0), 1) == [utc(2026, 1, 1, 0, 2)]
    assert next_times(timing, utc(2026, 1, 1, 0, 1, 1), 1) == [utc(2026, 1, 1, 0, 2)]


def test_triggers_that_fell_in_a_window_are_counted() -> None:
    assert count_between(IntervalTiming(10, utc(2026, 1, 1)), utc(2026, 1, 1, 0, 0, 5), utc(2026, 1, 1, 0, 1)) == 5
    assert count_between(CronTiming("0 * * * *"), utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 0)) == 3
    assert count_between(CronTiming("0 * * * *"), utc(2026, 1, 1, 3, 0), utc(2026, 1, 1, 3, 0)) == 0


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("0 9 * * *", None),
        ("*/5 9-17 * * MON-FRI", None),
        ("0 9 * *", "5-field"),
        ("* * * * * *", "5-field"),
        ("@daily", "5-field"),
        ("61 * * * *", "not a valid cron expression"),
        ("0 0 31 2 *", "never"),
    ],
)
def test_cron_expressions_are_checked(expression: str, problem: str | None) -> None:
    found = cron_problem(expression)
    if problem is None:
        assert found is None
    else:
        assert found is not None and (problem in found or "not a valid" in found), found


def test_time_zones_must_be_iana_names() -> None:
    assert timezone_problem("Asia/Shanghai") is None
    assert "IANA" in (timezone_problem("Mars/Olympus") or "")
    assert "IANA" in (timezone_problem("../../etc/passwd") or "")
