"""Timestamps as the agent stores and logs them (RFC 3339, milliseconds, Z); standard library only.

Kept apart from agent.models so that the build output pump (a process of its own per build)
can stamp log lines without importing the models and their validators.
"""

from __future__ import annotations

import datetime as dt


def utc_now() -> str:
    """The current time as RFC 3339 with milliseconds and a Z, the format of every stored timestamp."""
    return format_time(dt.datetime.now(dt.timezone.utc))


def format_time(moment: dt.datetime) -> str:
    moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> dt.datetime:
    """Parses an RFC 3339 timestamp; raises ValueError when it is not one or has no offset."""
    candidate = text.strip()
    if candidate.endswith(("Z", "z")):
        candidate = candidate[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(candidate)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no timezone offset")
    return moment
