"""What a due trigger and a finished run do to a schedule, with the clock given by the test."""

from __future__ import annotations

import dataclasses
import datetime as dt

from agent.models import format_time
from agent.schedule_models import Schedule, ScheduleStats
from agent.schedule_outcomes import after_run, is_skipped, plan_trigger, retry_delay_s

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)


def schedule(every_s: int = 60, due: dt.datetime | None = T0 + dt.timedelta(seconds=60), **config: object) -> Schedule:
    return Schedule(
        id="sch_1", name="n", application="jobs", timing={"type": "interval", "every_s": every_s}, template={},
        config={"max_concurrent": 1, "max_retries": 0, "pause_after_failures": 0, "missed": "skip",
                "retry_backoff_s": 5.0, **config},
        metadata={}, status="active", created_at=format_time(T0), updated_at=format_time(T0),
        anchor_at=format_time(T0), next_due_at=None if due is None else format_time(due),
    )


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_nothing_is_due_before_its_time() -> None:
    assert plan_trigger(schedule(), at(59.9), after_downtime=False) is None


def test_a_due_trigger_runs_and_moves_to_the_next_grid_point() -> None:
    trigger = plan_trigger(schedule(), at(60.004), after_downtime=False)
    assert trigger is not None and trigger.run and trigger.reason == "schedule"
    assert trigger.scheduled_for == at(60) and trigger.next_due == at(120) and trigger.missed == 0


def test_a_loop_that_fell_behind_runs_once_and_counts_the_rest_missed() -> None:
    """Never a burst: 3.5 periods late, one run now, two counted missed, the next on the grid after now."""
    trigger = plan_trigger(schedule(), at(60 + 3.5 * 60), after_downtime=False)
    assert trigger is not None and trigger.run
    assert trigger.missed == 3 and trigger.next_due == at(300)


def test_triggers_missed_while_down_are_skipped_by_default() -> None:
    trigger = plan_trigger(schedule(), at(60 + 10 * 60 + 5), after_downtime=True)
    assert trigger is not None
    assert not trigger.run
    assert trigger.missed == 11  # 60, 120, ..., 660
    assert trigger.next_due == at(720)


def test_triggers_missed_while_down_run_once_with_run_once() -> None:
    trigger = plan_trigger(schedule(missed="run_once"), at(60 + 10 * 60 + 5), after_downtime=True)
    assert trigger is not None
    assert trigger.run and trigger.reason == "missed"
    assert trigger.missed == 11 and trigger.next_due == at(720)


def test_a_trigger_due_exactly_at_start_is_not_missed() -> None:
    trigger = plan_trigger(schedule(), at(60), after_downtime=True)
    assert trigger is not None and trigger.run and trigger.reason == "schedule"


def test_paused_and_archived_schedules_do_not_trigger() -> None:
    assert plan_trigger(dataclasses.replace(schedule(), status="paused"), at(600), after_downtime=False) is None
    archived = dataclasses.replace(schedule(), archived_at=format_time(at(1)))
    assert plan_trigger(archived, at(600), after_downtime=False) is None


def test_max_concurrent_skips_while_that_many_runs_are_in_progress() -> None:
    assert not is_skipped(schedule(), 0)
    assert is_skipped(schedule(), 1)
    assert not is_skipped(schedule(max_concurrent=2), 1)
    assert is_skipped(schedule(max_concurrent=2), 2)


def test_a_failed_run_is_retried_with_doubling_backoff_up_to_max_retries() -> None:
    retrying = schedule(max_retries=2, retry_backoff_s=5.0)
    first = after_run(retrying, "dep_1", "failed", "exit 1", 1, at(100))
    assert first.retry_due == at(105) and first.pause_reason is None
    second = after_run(retrying, "dep_2", "failed", "exit 1", 2, at(200))
    assert second.retry_due == at(210)
    third = after_run(retrying, "dep_3", "failed", "exit 1", 3, at(300))
    assert third.retry_due is None
    assert retry_delay_s(5.0, 20) == 3600.0


def test_failures_count_and_a_success_resets_the_streak() -> None:
    failing = dataclasses.replace(schedule(), stats=ScheduleStats(total_runs=3, last_run_id="dep_3"))
    end = after_run(failing, "dep_3", "failed", "boom", 1, at(1))
    assert (end.stats.total_failures, end.stats.consecutive_failures, end.stats.last_status) == (1, 1, "failed")
    again = after_run(dataclasses.replace(failing, stats=end.stats), "dep_3", "succeeded", None, 1, at(2))
    assert (again.stats.total_failures, again.stats.consecutive_failures) == (1, 0)


def test_the_schedule_pauses_itself_after_that_many_consecutive_failures() -> None:
    pausing = dataclasses.replace(schedule(pause_after_failures=3, max_retries=5),
                                  stats=ScheduleStats(consecutive_failures=2))
    end = after_run(pausing, "dep_9", "failed", "build command exited with code 2", 1, at(30))
    assert end.stats.consecutive_failures == 3
    assert end.retry_due is None  # a paused schedule starts nothing, retries neither
    assert end.pause_reason is not None
    assert "3 consecutive failed runs" in end.pause_reason and "dep_9" in end.pause_reason
    assert format_time(at(30)) in end.pause_reason and "exited with code 2" in end.pause_reason


def test_a_cancelled_run_is_neither_success_nor_failure() -> None:
    streak = dataclasses.replace(schedule(max_retries=3), stats=ScheduleStats(consecutive_failures=2))
    end = after_run(streak, "dep_1", "cancelled", "killed", 1, at(1))
    assert end.stats.consecutive_failures == 2 and end.stats.total_failures == 0 and end.retry_due is None
