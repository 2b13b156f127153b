"""The callback outbox: status events waiting to be POSTed, kept in the store's SQLite file.

Every function here runs on the store's thread with its connection, inside the caller's
transaction where there is one: an event is written in the same transaction as the status
change it reports, so a change is never without its event nor an event without its change.
`agent.callbacks` sends them; the deployment row carries a summary (`callbacks`) that is
rewritten with every change here, so that reading a deployment costs no extra query.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable

SCHEMA = """
CREATE TABLE IF NOT EXISTS callback_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    deployment_id   TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL,          -- pending, delivered, failed (gave up)
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,          -- unix seconds
    last_error      TEXT,
    last_attempt_at TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS callback_outbox_pending ON callback_outbox (state, deployment_id, seq);
"""

# The head of a deployment's queue: its oldest pending event. Only heads are sent, so that a
# deployment's events arrive in order; heads of different deployments go out side by side.
_IS_HEAD = """o.state = 'pending' AND NOT EXISTS (
    SELECT 1 FROM callback_outbox p WHERE p.state = 'pending' AND p.deployment_id = o.deployment_id AND p.seq < o.seq)"""


@dataclass(frozen=True)
class CallbackEvent:
    """One event to send: the body is the exact bytes the signature covers."""

    seq: int
    event_id: str
    deployment_id: str
    url: str
    body: bytes
    attempts: int


def enqueue(db: sqlite3.Connection, event_id: str, deployment_id: str, url: str, body: dict[str, Any], now: str) -> None:
    db.execute(
        """INSERT INTO callback_outbox (event_id, deployment_id, url, body, state, next_attempt_at, created_at)
           VALUES (?, ?, ?, ?, 'pending', ?, ?)""",
        (event_id, deployment_id, url, json.dumps(body, separators=(",", ":")), time.time(), now),
    )


def due(db: sqlite3.Connection, now: float, limit: int, skip: Callable[[str], bool]) -> list[CallbackEvent]:
    """Heads whose next attempt is due, oldest first, leaving out deployments `skip` names (in flight)."""
    rows = db.execute(
        f"""SELECT seq, event_id, deployment_id, url, body, attempts FROM callback_outbox o
            WHERE {_IS_HEAD} AND o.next_attempt_at <= ? ORDER BY o.next_attempt_at, o.seq""",
        (now,),
    )
    events = []
    for row in rows:
        if skip(row["deployment_id"]):
            continue
        events.append(CallbackEvent(row["seq"], row["event_id"], row["deployment_id"], row["url"],
                                    row["body"].encode("utf-8"), row["attempts"]))
        if len(events) >= limit:
            break
    return events


def next_due(db: sqlite3.Connection, skip: frozenset[str]) -> float | None:
    """When the earliest head not in `skip` (being sent) falls due, in unix seconds; None if none."""
    rows = db.execute(
        f"SELECT o.deployment_id, o.next_attempt_at FROM callback_outbox o WHERE {_IS_HEAD} ORDER BY o.next_attempt_at"
    )
    return next((moment for deployment_id, moment in rows if deployment_id not in skip), None)


def record_attempt(
    db: sqlite3.Connection, seq: int, *, state: str, error: str | None, next_attempt_at: float, now: str
) -> str | None:
    """Writes one attempt's outcome; returns the event's deployment id (None if it was deleted meanwhile)."""
    db.execute(
        """UPDATE callback_outbox SET state = ?, attempts = attempts + 1, last_error = ?, last_attempt_at = ?,
           next_attempt_at = ? WHERE seq = ?""",
        (state, error, now, next_attempt_at, seq),
    )
    row = db.execute("SELECT deployment_id FROM callback_outbox WHERE seq = ?", (seq,)).fetchone()
    return row["deployment_id"] if row is not None else None


def summary(db: sqlite3.Connection, deployment_id: str) -> dict[str, Any]:
    """The delivery state a deployment shows: counts by state, and the last error of the head.

    `state` is delivered (all sent), pending (sending, no failure yet), failing (the next event
    was refused or unreachable and is being retried) or failed (some event was given up on).
    """
    counts = {"delivered": 0, "pending": 0, "failed": 0}
    for state, count in db.execute(
        "SELECT state, COUNT(*) FROM callback_outbox WHERE deployment_id = ? GROUP BY state", (deployment_id,)
    ):
        counts[state] = count
    head = db.execute(
        """SELECT attempts, last_error, last_attempt_at FROM callback_outbox
           WHERE deployment_id = ? AND state = 'pending' ORDER BY seq LIMIT 1""",
        (deployment_id,),
    ).fetchone()
    last = db.execute(
        """SELECT last_error, last_attempt_at FROM callback_outbox
           WHERE deployment_id = ? AND last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC, seq DESC LIMIT 1""",
        (deployment_id,),
    ).fetchone()
    if head is not None:
        state = "failing" if head["last_error"] else "pending"
    else:
        state = "failed" if counts["failed"] else "delivered"
    return {
        "state": state,
        **counts,
        "attempts": head["attempts"] if head is not None else 0,
        "last_error": (head["last_error"] if head is not None else last["last_error"] if last else None),
        "last_attempt_at": last["last_attempt_at"] if last else None,
    }


def pending_count(db: sqlite3.Connection) -> int:
    (count,) = db.execute("SELECT COUNT(*) FROM callback_outbox WHERE state = 'pending'").fetchone()
    return count


def forget(db: sqlite3.Connection, deployment_id: str) -> None:
    db.execute("DELETE FROM callback_outbox WHERE deployment_id = ?", (deployment_id,))
