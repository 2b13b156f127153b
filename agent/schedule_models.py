"""The schedule record as the store holds it, and its JSON (the contract's schedule object)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from agent.models import REDACTED, format_time, parse_time, redact_url
from agent.schedule_times import CronTiming, IntervalTiming, Timing, next_times

ScheduleStatus = Literal["active", "paused"]
UPCOMING = 5  # trigger times shown in upcoming_runs_at


@dataclass(frozen=True)
class ScheduleStats:
    total_runs: int = 0
    total_failures: int = 0
    consecutive_failures: int = 0
    skipped_runs: int = 0
    # Triggers that fell while the agent was down (run once or skipped, as `missed` says).
    missed_runs: int = 0
    last_run_at: str | None = None
    last_status: str | None = None
    last_run_id: str | None = None


@dataclass(frozen=True)
class Schedule:
    id: str
    name: str
    application: str
    timing: Mapping[str, Any]  # the request's `schedule` object
    template: Mapping[str, Any]  # the validated deployment request, without application
    config: Mapping[str, Any]
    metadata: Mapping[str, Any]
    status: ScheduleStatus
    created_at: str
    updated_at: str
    # The interval grid's origin (creation, or the last change of `schedule`).
    anchor_at: str
    # When it triggers next: null while paused or archived.
    next_due_at: str | None = None
    paused_reason: str | None = None
    paused_at: str | None = None
    archived_at: str | None = None
    stats: ScheduleStats = field(default_factory=ScheduleStats)
    seq: int = 0

    @property
    def is_archived(self) -> bool:
        return self.archived_at is not None

    @property
    def triggers(self) -> bool:
        """Whether it triggers by itself: active and not archived."""
        return self.status == "active" and self.archived_at is None

    def timing_rule(self) -> Timing:
        return timing_rule(self.timing, parse_time(self.anchor_at))

    def upcoming(self, now: dt.datetime, count: int = UPCOMING) -> list[dt.datetime]:
        """The next trigger instants: from next_due_at on (which may be a moment past while it fires)."""
        if not self.triggers or self.next_due_at is None:
            return []
        first = parse_time(self.next_due_at)
        return [first, *next_times(self.timing_rule(), max(first, now), count - 1)]

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        upcoming = [format_time(moment) for moment in self.upcoming(now)]
        stats = self.stats
        return {
            "id": self.id,
            "name": self.name,
            "application": self.application,
            "schedule": dict(self.timing),
            "template": redacted_template(self.template),
            "config": dict(self.config),
            "metadata": dict(self.metadata),
            "status": self.status,
            "paused_reason": self.paused_reason,
            "paused_at": self.paused_at,
            "upcoming_runs_at": upcoming,
            "stats": {
                "total_runs": stats.total_runs,
                "total_failures": stats.total_failures,
                "consecutive_failures": stats.consecutive_failures,
                "skipped_runs": stats.skipped_runs,
                "missed_runs": stats.missed_runs,
                "last_run_at": stats.last_run_at,
                "last_status": stats.last_status,
                "last_run_id": stats.last_run_id,
                "next_trigger_at": upcoming[0] if upcoming else None,
            },
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "archived_at": self.archived_at,
        }


def timing_rule(timing: Mapping[str, Any], anchor: dt.datetime) -> Timing:
    if timing["type"] == "interval":
        return IntervalTiming(int(timing["every_s"]), anchor)
    return CronTiming(timing["expression"], timing.get("timezone") or "UTC")


def redacted_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """The template as responses show it: env values hidden, as a deployment's spec is."""
    shown = {key: value for key, value in template.items() if key != "application"}
    for key in ("build", "run"):
        part = shown.get(key)
        if isinstance(part, Mapping) and part.get("env"):
            shown[key] = {**part, "env": {name: REDACTED for name in part["env"]}}
    callback = shown.get("callback")
    if isinstance(callback, Mapping) and callback.get("url"):
        shown["callback"] = {"url": redact_url(callback["url"])}
    return shown


@dataclass(frozen=True)
class ScheduleFilter:
    """A page request of `GET /v1/schedules`, newest first."""

    application: str | None = None
    status: str | None = None  # active, paused, or archived
    limit: int = 50
    after_seq: int | None = None
