"""Idempotency-Key lookups, shared by every table a creating POST writes (deployments, schedules)."""

from __future__ import annotations

import sqlite3
from typing import Literal

from agent.errors import Conflict

# The tables whose rows carry `idempotency_key` and `request_hash`, and what their id is called in errors.
_ID_NAMES = {"deployments": "deployment_id", "schedules": "schedule_id"}


def earlier_row(
    db: sqlite3.Connection, table: Literal["deployments", "schedules"], key: str, request_hash: str | None
) -> sqlite3.Row | None:
    """The row created earlier with `key`, or None; Conflict when that key came with another request body."""
    row = db.execute(f"SELECT * FROM {table} WHERE idempotency_key = ?", (key,)).fetchone()
    if row is not None and row["request_hash"] != request_hash:
        raise Conflict(
            "Idempotency-Key was already used with a different request",
            code="idempotency_key_reused",
            details={_ID_NAMES[table]: row["id"]},
        )
    return row
