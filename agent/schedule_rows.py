"""Schedules in the store's SQLite file: their table, the pending retries, and the queries on them.

Every function here runs on the store's thread with its connection, inside the caller's
transaction where there is one (agent.store composes them with the deployment it writes in
the same transaction, as it does with the callback outbox).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any

from agent.errors import NotFound
from agent.idempotent_rows import earlier_row
from agent.schedule_models import Schedule, ScheduleFilter, ScheduleStats

SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    name            TEXT NOT NULL,
    application     TEXT NOT NULL,
    timing          TEXT NOT NULL,          -- JSON: the request's `schedule`
    template        TEXT NOT NULL,          -- JSON: the validated deployment request
    config          TEXT NOT NULL,          -- JSON
    metadata        TEXT NOT NULL,          -- JSON
    status          TEXT NOT NULL,          -- active, paused
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    anchor_at       TEXT NOT NULL,
    next_due_at     TEXT,                   -- null while paused or archived
    paused_reason   TEXT,
    paused_at       TEXT,
    archived_at     TEXT,
    stats           TEXT NOT NULL,          -- JSON: ScheduleStats
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT
);
-- The trigger loop's one question, when the next schedule falls due, from the index alone.
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_due_at) WHERE next_due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS schedules_application ON schedules (application, seq);
CREATE TABLE IF NOT EXISTS schedule_retries (
    deployment_id   TEXT PRIMARY KEY,       -- the failed run that is retried
    schedule_id     TEXT NOT NULL,
    attempt         INTEGER NOT NULL,       -- the attempt the retry is (2 for the first retry)
    due_at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS schedule_retries_due ON schedule_retries (due_at);
"""
# Made once the deployments table has its schedule_id column (a database of an older agent gets it added).
DEPLOYMENTS_INDEX = "CREATE INDEX IF NOT EXISTS deployments_schedule ON deployments (schedule_id, seq)"

_JSON = ("timing", "template", "config", "metadata")
_COLUMNS = ("id", "name", "application", *_JSON, "status", "created_at", "updated_at", "anchor_at", "next_due_at",
            "paused_reason", "paused_at", "archived_at", "stats")
_STATS_FIELDS = tuple(item.name for item in dataclasses.fields(ScheduleStats))


@dataclasses.dataclass(frozen=True)
class Retry:
    deployment_id: str  # the failed run
    schedule_id: str
    attempt: int
    due_at: str


def insert(db: sqlite3.Connection, schedule: Schedule, key: str | None, request_hash: str | None) -> tuple[Schedule, bool]:
    """Writes a new schedule; with an Idempotency-Key already used for the same body, the earlier one (False)."""
    if key is not None and (row := earlier_row(db, "schedules", key, request_hash)) is not None:
        return _schedule(row), False
    values = _values(schedule)
    db.execute(
        f"INSERT INTO schedules ({', '.join(_COLUMNS)}, idempotency_key, request_hash) "
        f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?, ?)",
        (*values, key, request_hash),
    )
    return get(db, schedule.id), True


def get(db: sqlite3.Connection, schedule_id: str) -> Schedule:
    row = db.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,)).fetchone()
    if row is None:
        raise NotFound(f"schedule {schedule_id} not found")
    return _schedule(row)


def write(db: sqlite3.Connection, schedule: Schedule) -> None:
    """Rewrites every column of the schedule but its identity."""
    columns = _COLUMNS[1:]
    values = _values(schedule)[1:]
    db.execute(f"UPDATE schedules SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?", (*values, schedule.id))


def write_progress(db: sqlite3.Connection, schedule: Schedule) -> None:
    """Rewrites what a trigger or a run changes: the next due time and the stats (a thousand fire at once)."""
    db.execute("UPDATE schedules SET next_due_at = ?, stats = ? WHERE id = ?",
               (schedule.next_due_at, _stats_text(schedule.stats), schedule.id))


def page(db: sqlite3.Connection, query: ScheduleFilter) -> tuple[list[Schedule], int | None]:
    clauses, params = [], []
    if query.application is not None:
        clauses.append("application = ?")
        params.append(query.application)
    if query.status == "archived":
        clauses.append("archived_at IS NOT NULL")
    else:
        clauses.append("archived_at IS NULL")
        if query.status is not None:
            clauses.append("status = ?")
            params.append(query.status)
    if query.after_seq is not None:
        clauses.append("seq < ?")
        params.append(query.after_seq)
    rows = db.execute(
        f"SELECT * FROM schedules WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?", (*params, query.limit + 1)
    ).fetchall()
    found = [_schedule(row) for row in rows[: query.limit]]
    return found, (found[-1].seq if len(rows) > query.limit else None)


def due(db: sqlite3.Connection, now: str, limit: int) -> list[Schedule]:
    rows = db.execute(
        "SELECT * FROM schedules WHERE next_due_at IS NOT NULL AND next_due_at <= ? ORDER BY next_due_at LIMIT ?",
        (now, limit),
    )
    return [_schedule(row) for row in rows]


def next_due(db: sqlite3.Connection) -> str | None:
    """The earliest time a schedule or a retry falls due; None when nothing will."""
    (schedule,) = db.execute("SELECT MIN(next_due_at) FROM schedules WHERE next_due_at IS NOT NULL").fetchone()
    (retry,) = db.execute("SELECT MIN(due_at) FROM schedule_retries").fetchone()
    return min((time for time in (schedule, retry) if time is not None), default=None)


def in_progress_runs(db: sqlite3.Connection, schedule_id: str) -> int:
    """Runs of the schedule in progress, a failed one waiting for its retry included (it is not over yet)."""
    (count,) = db.execute(
        "SELECT (SELECT COUNT(*) FROM deployments WHERE schedule_id = ? AND status IN ('queued', 'building', 'deploying'))"
        " + (SELECT COUNT(*) FROM schedule_retries WHERE schedule_id = ?)",
        (schedule_id, schedule_id),
    ).fetchone()
    return int(count)


def add_retry(db: sqlite3.Connection, retry: Retry) -> None:
    db.execute(
        "INSERT OR REPLACE INTO schedule_retries (deployment_id, schedule_id, attempt, due_at) VALUES (?, ?, ?, ?)",
        (retry.deployment_id, retry.schedule_id, retry.attempt, retry.due_at),
    )


def due_retries(db: sqlite3.Connection, now: str, limit: int) -> list[Retry]:
    rows = db.execute("SELECT * FROM schedule_retries WHERE due_at <= ? ORDER BY due_at LIMIT ?", (now, limit))
    return [Retry(row["deployment_id"], row["schedule_id"], row["attempt"], row["due_at"]) for row in rows]


def drop_retry(db: sqlite3.Connection, deployment_id: str) -> None:
    db.execute("DELETE FROM schedule_retries WHERE deployment_id = ?", (deployment_id,))


def drop_retries(db: sqlite3.Connection, schedule_id: str) -> None:
    """Forgets the schedule's pending retries (it was paused or archived)."""
    db.execute("DELETE FROM schedule_retries WHERE schedule_id = ?", (schedule_id,))


def pending_retries(db: sqlite3.Connection, schedule_id: str) -> list[Retry]:
    rows = db.execute("SELECT * FROM schedule_retries WHERE schedule_id = ? ORDER BY due_at", (schedule_id,))
    return [Retry(row["deployment_id"], row["schedule_id"], row["attempt"], row["due_at"]) for row in rows]


def _values(schedule: Schedule) -> list[Any]:
    values: list[Any] = []
    for column in _COLUMNS:
        value = getattr(schedule, column)
        if column in _JSON:
            value = json.dumps(dict(value), separators=(",", ":"))
        elif column == "stats":
            value = _stats_text(value)
        values.append(value)
    return values


def _stats_text(stats: ScheduleStats) -> str:
    return json.dumps({name: getattr(stats, name) for name in _STATS_FIELDS}, separators=(",", ":"))


def _schedule(row: sqlite3.Row) -> Schedule:
    values = {column: row[column] for column in _COLUMNS}
    for column in _JSON:
        values[column] = json.loads(values[column])
    stats = json.loads(values.pop("stats"))
    return Schedule(**values, stats=ScheduleStats(**{k: v for k, v in stats.items() if k in _STATS_FIELDS}),
                    seq=row["seq"])
