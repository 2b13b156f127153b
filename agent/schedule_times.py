"""When a schedule triggers: cron in a time zone (with cron's daylight-saving rules) or a fixed interval.

Pure functions of the times given: no clock is read here, so the tests drive them with any
"now" they like.

Daylight saving, as Vixie cron (and cronie) handle it, in the schedule's time zone:
- a wall-clock time that does not exist (the spring-forward gap: 02:30 on the night clocks
  jump from 02:00 to 03:00) runs once, at the first moment after the gap (03:00); several
  such times collapse into that one run;
- a wall-clock time that happens twice (the fall-back overlap: 01:30 happens once in summer
  time, then again in standard time) runs once, at its first occurrence, unless the
  expression's hour field is a wildcard (`*`, `*/2`): a job that runs every hour keeps
  running every hour, so it runs in both.
"""

from __future__ import annotations

import datetime as dt
import heapq
import threading
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    import croniter

UTC = dt.timezone.utc
# How far the fall-back overlap can reach back: a second occurrence's wall time is at most this
# much earlier than the wall time of an instant after it (real zones shift by at most 2 h).
_OVERLAP_REACH = dt.timedelta(hours=3)
# Cron expressions are searched this far ahead for a match before they count as never firing.
NEVER_AFTER = dt.timedelta(days=366 * 5)
_MINUTE = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class CronTiming:
    expression: str
    timezone: str = "UTC"


@dataclass(frozen=True)
class IntervalTiming:
    every_s: int
    # The grid's origin: triggers fall at anchor + k * every_s, whatever the runs take (no drift).
    anchor: dt.datetime


Timing = CronTiming | IntervalTiming


def _cron() -> ModuleType:
    """croniter, imported with the first cron expression: with dateutil it costs ~1.5 MiB and
    ~60 ms at start, and most agents have no cron schedule (an import, not a lazy module: the
    store's thread and the loop's may both be first)."""
    import croniter

    return croniter


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a 5-field cron expression that ever fires; None when it is one."""
    fields = expression.split()
    if len(fields) != 5 or expression.strip().startswith("@"):
        return "must be a 5-field cron expression (minute hour day-of-month month day-of-week), e.g. '0 9 * * *'"
    cron = _cron()
    try:
        matcher = cron.croniter(expression, dt.datetime(2000, 1, 1), max_years_between_matches=5)
        matcher.get_next(dt.datetime)
    except (cron.CroniterBadCronError, ValueError, KeyError):
        return f"is not a valid cron expression: {expression!r}"
    except cron.CroniterBadDateError:
        return f"never matches a date: {expression!r}"
    return None


def timezone_problem(name: str) -> str | None:
    """Why `name` is not an IANA time zone this host knows; None when it is one."""
    try:
        zone_of(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"is not an IANA time zone name (such as 'UTC' or 'Europe/Paris'): {name!r}"
    return None


@lru_cache(maxsize=256)
def zone_of(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def next_times(timing: Timing, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next `count` trigger instants strictly after `after` (aware), in UTC, earliest first."""
    if isinstance(timing, IntervalTiming):
        return _interval_times(timing, after, count)
    return _cron_times(timing, after, count)


def next_time(timing: Timing, after: dt.datetime) -> dt.datetime | None:
    found = next_times(timing, after, 1)
    return found[0] if found else None


def count_between(timing: Timing, start: dt.datetime, end: dt.datetime, cap: int = 100_000) -> int:
    """How many triggers fall in [start, end) (at most `cap`): those missed while the agent was down."""
    if end <= start:
        return 0
    if isinstance(timing, IntervalTiming):
        first = _interval_index_after(timing, start - dt.timedelta(microseconds=1))
        last = _interval_index_after(timing, end - dt.timedelta(microseconds=1))
        return min(cap, max(0, last - first))
    counted = 0
    for moment in _cron_instants(timing, start - dt.timedelta(microseconds=1)):
        if moment >= end or counted >= cap:
            break
        counted += 1
    return counted


# --- intervals -----------------------------------------------------------------------------


def _interval_index_after(timing: IntervalTiming, after: dt.datetime) -> int:
    """The k of the first trigger anchor + k * every_s strictly after `after` (k >= 1)."""
    elapsed = (after - timing.anchor).total_seconds()
    return max(1, int(elapsed // timing.every_s) + 1)


def _interval_times(timing: IntervalTiming, after: dt.datetime, count: int) -> list[dt.datetime]:
    first = _interval_index_after(timing, after)
    step = dt.timedelta(seconds=timing.every_s)
    anchor = timing.anchor.astimezone(UTC)
    return [anchor + step * (first + index) for index in range(count)]


# --- cron ----------------------------------------------------------------------------------


def _cron_times(timing: CronTiming, after: dt.datetime, count: int) -> list[dt.datetime]:
    found: list[dt.datetime] = []
    for moment in _cron_instants(timing, after):
        found.append(moment)
        if len(found) >= count:
            break
    return found


def _cron_instants(timing: CronTiming, after: dt.datetime) -> Iterator[dt.datetime]:
    """Trigger instants strictly after `after`, in order, each once, with cron's DST rules.

    Wall-clock matches come from croniter in order; each becomes zero, one or two instants.
    Second occurrences of an overlap come out of order (their wall time is earlier than the
    first occurrences that follow them in time), so instants wait in a heap until no later
    wall-clock match could still produce an earlier instant.
    """
    zone = zone_of(timing.timezone)
    hourly = timing.expression.split()[1].startswith("*")
    after = after.astimezone(UTC)
    # Far from a change of offset, wall time and instants keep the same order, and the search
    # starts at `after` itself; near one, it starts early enough to see second occurrences.
    reach = _OVERLAP_REACH if _near_transition(after, zone) else dt.timedelta(0)
    wall_start = after.astimezone(zone).replace(tzinfo=None) - reach
    matcher = _matcher(timing.expression, wall_start)
    bad_date = _cron().CroniterBadDateError
    pending: list[dt.datetime] = []
    last: dt.datetime | None = None
    horizon = after + NEVER_AFTER
    while True:
        try:
            wall = matcher.get_next(dt.datetime)
        except bad_date:
            wall = None
        if wall is not None:
            for moment in _instants_of(wall, zone, hourly):
                if moment > after:
                    heapq.heappush(pending, moment)
        # Every instant still to come from later wall times lies after this one (less the
        # overlap's reach near a change of offset): what is in the heap before it is final.
        safe_before = None
        if wall is not None:
            earliest = _earliest_instant(wall, zone)
            safe_before = earliest - _OVERLAP_REACH if _near_transition(earliest, zone) else earliest
        while pending and (safe_before is None or pending[0] <= safe_before):
            moment = heapq.heappop(pending)
            if last is None or moment > last:
                last = moment
                yield moment
        if wall is None or (last is not None and last > horizon) or _earliest_instant(wall, zone) > horizon:
            return


_MATCHERS = threading.local()


def _matcher(expression: str, start: dt.datetime) -> croniter.croniter:
    """A croniter for `expression` set to `start`: parsing an expression costs 150 µs, a thousand
    schedules falling due at once must not pay it each; one cache per thread (the store's and the loop's)."""
    cache: dict[str, croniter.croniter] | None = getattr(_MATCHERS, "cache", None)
    if cache is None:
        cache = _MATCHERS.cache = {}
    matcher = cache.get(expression)
    if matcher is None:
        if len(cache) >= 1024:
            cache.clear()
        matcher = cache[expression] = _cron().croniter(expression, start, max_years_between_matches=5)
    else:
        matcher.set_current(start, force=True)
    return matcher


def _near_transition(moment: dt.datetime, zone: ZoneInfo) -> bool:
    """Whether the zone's UTC offset changes within the overlap's reach of `moment`."""
    offsets = {(moment + shift).astimezone(zone).utcoffset() for shift in (-_OVERLAP_REACH, dt.timedelta(0), _OVERLAP_REACH)}
    return len(offsets) > 1


def _earliest_instant(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    return min(wall.replace(tzinfo=zone, fold=0).astimezone(UTC), wall.replace(tzinfo=zone, fold=1).astimezone(UTC))


def _instants_of(wall: dt.datetime, zone: ZoneInfo, hourly: bool) -> list[dt.datetime]:
    """The instants a wall-clock match stands for in `zone`: one, two (overlap, hourly jobs), or the gap's end."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    first_utc, second_utc = first.astimezone(UTC), second.astimezone(UTC)
    if first_utc == second_utc:
        return [first_utc]
    if _exists(first) and _exists(second):  # the overlap: the wall time happens twice
        return [first_utc, second_utc] if hourly else [min(first_utc, second_utc)]
    return [_after_gap(wall, zone)]


def _exists(moment: dt.datetime) -> bool:
    """Whether the aware wall time round-trips through UTC (a time in a gap does not)."""
    back = moment.astimezone(UTC).astimezone(moment.tzinfo)
    return back.replace(tzinfo=None) == moment.replace(tzinfo=None)


def _after_gap(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The first instant after the gap that `wall` falls in: when the clock has jumped past it."""
    probe = wall.replace(second=0, microsecond=0)
    for _ in range(24 * 60):
        probe += _MINUTE
        candidate = probe.replace(tzinfo=zone)
        if _exists(candidate):
            return candidate.astimezone(UTC)
    return wall.replace(tzinfo=zone).astimezone(UTC)  # no zone has a day-long gap
