"""What happens to a schedule when it falls due and when one of its runs ends: pure rules, no clock, no I/O.

The store applies them inside the transaction that records the trigger or the run's final
status, so that a schedule's stats, its next trigger and its runs never disagree.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from agent.models import format_time, parse_time
from agent.schedule_models import Schedule, ScheduleStats
from agent.schedule_times import count_between, next_time

MAX_RETRY_DELAY_S = 3600.0


@dataclass(frozen=True)
class Trigger:
    """What one due trigger does: start a run (or not), count missed triggers, and when the next falls."""

    run: bool
    reason: str  # "schedule", or "missed" for the run_once run after downtime
    scheduled_for: dt.datetime
    missed: int
    next_due: dt.datetime | None


def plan_trigger(schedule: Schedule, now: dt.datetime, *, after_downtime: bool) -> Trigger | None:
    """The trigger due at `now`, or None if nothing is due yet.

    `after_downtime` (the agent's first look after a start): a trigger that fell before `now`
    fell while the agent was down, and follows `config.missed`: "skip" drops it, "run_once"
    starts one run now however many fell. Otherwise the trigger runs; should the agent have
    fallen more than one period behind, the ones in between are counted missed, never run in a burst.
    """
    if not schedule.triggers or schedule.next_due_at is None:
        return None
    due = parse_time(schedule.next_due_at)
    if due > now:
        return None
    rule = schedule.timing_rule()
    if after_downtime and due < now:
        missed = count_between(rule, due, now)
        run_once = schedule.config.get("missed") == "run_once"
        return Trigger(run=run_once, reason="missed", scheduled_for=due, missed=missed, next_due=next_time(rule, now))
    following = next_time(rule, due)
    missed = 0
    if following is not None and following <= now:
        missed = count_between(rule, following, now)
        following = next_time(rule, now)
    return Trigger(run=True, reason="schedule", scheduled_for=due, missed=missed, next_due=following)


def is_skipped(schedule: Schedule, in_progress: int) -> bool:
    """Whether a trigger is skipped (and counted) because max_concurrent runs are in progress."""
    return in_progress >= int(schedule.config.get("max_concurrent", 1))


def started(stats: ScheduleStats, deployment_id: str, at: str) -> ScheduleStats:
    return dataclasses.replace(
        stats, total_runs=stats.total_runs + 1, last_run_at=at, last_status="queued", last_run_id=deployment_id
    )


@dataclass(frozen=True)
class RunEnd:
    """What a run's final status does to its schedule."""

    stats: ScheduleStats
    retry_due: dt.datetime | None  # when the retry of a failed run starts
    pause_reason: str | None  # set when this failure pauses the schedule


def after_run(
    schedule: Schedule,
    deployment_id: str,
    status: str,
    error_message: str | None,
    attempt: int,
    finished_at: dt.datetime,
) -> RunEnd:
    """Stats, retry and auto-pause after a run ended `status`; `attempt` is 1 for a first run.

    A cancelled run (killed on request) is neither a success nor a failure: it changes no
    count and starts no retry.
    """
    stats = schedule.stats
    if stats.last_run_id == deployment_id:
        stats = dataclasses.replace(stats, last_status=status)
    if status == "succeeded":
        return RunEnd(dataclasses.replace(stats, consecutive_failures=0), None, None)
    if status != "failed":
        return RunEnd(stats, None, None)
    stats = dataclasses.replace(
        stats, total_failures=stats.total_failures + 1, consecutive_failures=stats.consecutive_failures + 1
    )
    threshold = int(schedule.config.get("pause_after_failures", 0))
    if threshold and stats.consecutive_failures >= threshold and schedule.status == "active":
        why = f": {error_message}" if error_message else ""
        reason = (
            f"paused by the agent after {stats.consecutive_failures} consecutive failed runs "
            f"(config.pause_after_failures = {threshold}); the last, {deployment_id}, failed at "
            f"{format_time(finished_at)}{why}"
        )
        return RunEnd(stats, None, reason)
    retry_due = None
    if attempt <= int(schedule.config.get("max_retries", 0)) and not schedule.is_archived:
        retry_due = finished_at + dt.timedelta(seconds=retry_delay_s(float(schedule.config.get("retry_backoff_s", 5.0)), attempt))
    return RunEnd(stats, retry_due, None)


def retry_delay_s(backoff_s: float, retry: int) -> float:
    """The wait before retry number `retry` (1 for the first): backoff_s, doubled for each one after, at most an hour."""
    return min(MAX_RETRY_DELAY_S, backoff_s * 2 ** (retry - 1))
