"""The durable store: one SQLite file (WAL), the single source of truth.

SQLite blocks, so one dedicated thread owns the connection and every call is
handed to it; the event loop never touches the database. `transition` is the
only function that changes a deployment's status.

A full disk (SQLITE_FULL, ENOSPC) is `DiskFull` to every caller, never a raw
sqlite3 error (agent.disk tells which errors are), and never corrupts the file:
SQLite rolls the transaction back itself. A final status that could not be
written for lack of space is held by agent.store_pending until there is room;
reads show it meanwhile.

It runs past 400 lines for a reason: the schema and every query share the one
connection and its thread, and splitting them would hand the connection around.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import sqlite3
import time
from collections.abc import Mapping as MappingABC
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, Field, dataclass, fields
from functools import partial
from pathlib import Path
from types import UnionType
from typing import Any, Callable, TypeVar, Union, get_args, get_origin, get_type_hints

from agent import callback_outbox as outbox
from agent import schedule_rows
from agent.callback_outbox import CallbackEvent
from agent.changes import ChangeFeed
from agent.disk import disk_full_of, is_sqlite_disk_full
from agent.errors import Conflict, DiskFull, NotFound, QueueFull
from agent.idempotent_rows import earlier_row
from agent.models import (
    FINAL_STATUSES,
    IN_PROGRESS_STATUSES,
    STATUSES,
    TRANSITIONS,
    Deployment,
    DeploymentFilter,
    DeploymentSpec,
    format_time,
    new_id,
    parse_time,
    utc_now,
)
from agent.schedule_models import Schedule, ScheduleFilter
from agent.schedule_outcomes import Trigger, after_run, is_skipped, plan_trigger, started
from agent.store_pending import PendingStatuses

# Builds the queued run a trigger starts: (schedule, trigger reason, scheduled time, attempt, run it retries).
MakeRun = Callable[[Schedule, str, "dt.datetime | None", int, "str | None"], Deployment]

T = TypeVar("T")
# Up to this many rows changed since a poller's `updated_since`, the list reads them by updated_at.
_FEW_CHANGED = 2000


def _stored_as(hint: Any) -> tuple[str, bool]:
    """How a field of this type is stored: its SQLite type, and whether it is JSON text (a mapping)."""
    optional = get_origin(hint) in (Union, UnionType)
    kinds = [arg for arg in get_args(hint) if arg is not type(None)] if optional else [hint]
    if get_origin(kinds[0]) in (MappingABC, dict):
        return "TEXT", True
    return {int: "INTEGER", float: "REAL"}.get(kinds[0], "TEXT"), False


# The deployment's columns are its fields, stored as their types say (the spec as JSON of its
# dict); `seq` is SQLite's row order and the list cursor.
FIELDS = tuple(item for item in fields(Deployment) if item.name != "seq")
_STORED_AS = {name: _stored_as(hint) for name, hint in get_type_hints(Deployment).items()}
JSON_COLUMNS = frozenset(item.name for item in FIELDS if _STORED_AS[item.name][1])
# Set by the store itself (identity, status and its times); every other field may be updated.
MANAGED = frozenset({"id", "application", "server", "status", "created_at", "updated_at", "started_at", "finished_at",
                     "log_path", "spec"})
UPDATABLE = frozenset(item.name for item in FIELDS) - MANAGED


def _column_definition(item: Field[Any]) -> str:
    required = item.default is MISSING and item.default_factory is MISSING
    unique = " UNIQUE" if item.name == "id" else ""
    return f"{item.name} {_STORED_AS[item.name][0]}{' NOT NULL' if required else ''}{unique}"


_COLUMNS = ",\n    ".join(_column_definition(item) for item in FIELDS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    {_COLUMNS},
    idempotency_key TEXT UNIQUE,
    request_hash TEXT
);
{outbox.SCHEMA}
{schedule_rows.SCHEMA}
CREATE INDEX IF NOT EXISTS deployments_status ON deployments (status, seq);
CREATE INDEX IF NOT EXISTS deployments_application ON deployments (application, seq);
CREATE INDEX IF NOT EXISTS deployments_updated ON deployments (updated_at);
-- The scheduler's question, each application's oldest queued deployment, from the index alone.
CREATE INDEX IF NOT EXISTS deployments_queue ON deployments (status, application, seq);
-- Each deployment's string metadata values, kept by triggers from the spec (whoever writes it):
-- a `metadata.KEY=VALUE` filter reads the matching rows newest first from this index alone.
CREATE TABLE IF NOT EXISTS deployment_metadata (
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    dseq  INTEGER NOT NULL,
    PRIMARY KEY (key, value, dseq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deployment_metadata_dseq ON deployment_metadata (dseq);
CREATE TRIGGER IF NOT EXISTS deployment_metadata_inserted AFTER INSERT ON deployments BEGIN
    INSERT OR IGNORE INTO deployment_metadata (key, value, dseq)
        SELECT key, value, NEW.seq FROM json_each(NEW.spec, '$.metadata') WHERE type = 'text';
END;
CREATE TRIGGER IF NOT EXISTS deployment_metadata_updated AFTER UPDATE OF spec ON deployments BEGIN
    DELETE FROM deployment_metadata WHERE dseq = OLD.seq;
    INSERT OR IGNORE INTO deployment_metadata (key, value, dseq)
        SELECT key, value, NEW.seq FROM json_each(NEW.spec, '$.metadata') WHERE type = 'text';
END;
CREATE TRIGGER IF NOT EXISTS deployment_metadata_deleted AFTER DELETE ON deployments BEGIN
    DELETE FROM deployment_metadata WHERE dseq = OLD.seq;
END;
CREATE TABLE IF NOT EXISTS applications (
    name            TEXT PRIMARY KEY,
    deployment_id   TEXT NOT NULL,
    state           TEXT NOT NULL,
    since           TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
"""
_INSERT = (
    f"INSERT INTO deployments ({', '.join(item.name for item in FIELDS)}, idempotency_key, request_hash) "
    f"VALUES ({', '.join('?' for _ in FIELDS)}, ?, ?)"
)


class Store:
    """Async facade over one SQLite connection living on its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._connection: sqlite3.Connection | None = None
        # Final statuses a full disk kept from the file; only the store thread changes them.
        self._pending = PendingStatuses(self.path.parent)
        # Every write of a deployment below is counted there (ETags, long polls).
        self.changes = ChangeFeed()
        # Deployments by status as reads show them (a kept final status counted as such); kept by
        # every write below, so /metrics and /healthz never count the table.
        self._counts: dict[str, int] = {status: 0 for status in STATUSES}
        # Called after a status change queued a callback event (the sender's wake-up).
        self.on_callback_event: Callable[[], None] = _no_one
        # Called after a run of a schedule ended (the trigger loop's wake-up: a retry may be due).
        self.on_schedule_event: Callable[[], None] = _no_one
        # Kept final statuses the store thread wrote, to announce on the loop (_announce_kept_written).
        self._kept_written: list[str] = []

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        await self._pending.stop_retrying()
        if self._connection is not None:
            # The call first tries the pending statuses once more; a close never fails on a full disk.
            with contextlib.suppress(DiskFull):
                await self._call(self._close_connection)
            self._connection = None
        self._executor.shutdown(wait=True)

    def pending_statuses(self) -> dict[str, str]:
        """Deployments whose final status waits for disk space to be written, with that status."""
        return self._pending.statuses()

    async def insert(
        self,
        deployment: Deployment,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_queued: int | None = None,
    ) -> tuple[Deployment, bool]:
        """Writes a new deployment durably; returns (deployment, created).

        With an idempotency key already used for the same request hash, the earlier
        deployment comes back with created=False.
        """
        stored, created = await self._call(self._insert, deployment, idempotency_key, request_hash, max_queued)
        if created:
            self._changed(stored)
        return stored, created

    async def get(self, deployment_id: str) -> Deployment:
        return await self._call(self._get, deployment_id)

    async def by_idempotency_key(self, key: str, request_hash: str | None) -> Deployment | None:
        """The deployment an Idempotency-Key created, None if none; 409 when it came with another request."""
        return await self._call(self._by_idempotency_key, key, request_hash)

    async def list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        """A page of deployments, newest first, and the seq to continue after (None at the end)."""
        return await self._call(self._list, query)

    async def transition(self, deployment_id: str, status: str, **fields: Any) -> Deployment:
        """The one way a status changes: checks the move is legal, stamps the times, writes atomically.

        On a full disk a move to a final status is kept and written once there is room (reads
        show it meanwhile); any other move raises DiskFull.
        """
        deployment = await self._call(self._transition, deployment_id, status, fields)
        self._changed(deployment)
        return deployment

    def _changed(self, deployment: Deployment) -> None:
        """After a write that may have queued a callback event: wakes the pollers and the sender."""
        self.changes.changed(deployment.id)
        if deployment.spec.callback is not None:
            self.on_callback_event()
        if deployment.schedule_id is not None and deployment.is_final:
            self.on_schedule_event()

    async def update(self, deployment_id: str, **fields: Any) -> Deployment:
        """Sets fields other than status (pid, container_id, ...) and stamps updated_at."""
        deployment = await self._call(self._update, deployment_id, fields)
        self.changes.changed(deployment_id)
        return deployment

    async def set_metadata(self, deployment_id: str, metadata: dict[str, Any]) -> Deployment:
        """Replaces the deployment's metadata (kept in its spec) and stamps updated_at."""
        deployment = await self._call(self._set_metadata, deployment_id, metadata)
        self.changes.changed(deployment_id)
        return deployment

    async def delete(self, deployment_id: str) -> Deployment:
        """Removes a record that is not in progress; returns what was removed."""
        removed = await self._call(self._delete, deployment_id)
        self.changes.changed(deployment_id)
        return removed

    # --- the callback outbox (agent.callbacks sends) -----------------------------------------

    async def due_callbacks(self, limit: int, skip: Callable[[str], bool]) -> list[CallbackEvent]:
        """Events to send now: the oldest pending one of each deployment not in `skip`."""
        return await self._call(lambda: outbox.due(self._db, time.time(), limit, skip))

    async def next_callback_due(self, skip: frozenset[str]) -> float | None:
        return await self._call(lambda: outbox.next_due(self._db, skip))

    async def record_callback_attempt(self, seq: int, *, state: str, error: str | None, next_attempt_at: float) -> None:
        """Writes an attempt's outcome and the deployment's delivery summary (which its ETag follows)."""
        deployment_id = await self._call(self._record_callback_attempt, seq, state, error, next_attempt_at)
        if deployment_id is not None:
            self.changes.changed(deployment_id)

    async def pending_callbacks(self) -> int:
        return await self._call(lambda: outbox.pending_count(self._db))

    async def with_status(self, *statuses: str) -> list[Deployment]:
        """Deployments in any of these statuses, oldest first."""
        return await self._call(self._with_status, statuses)

    async def queue_heads(self, blocked: frozenset[str], after_seq: int, limit: int) -> list[Deployment]:
        """The oldest queued deployment of each application not in `blocked`, oldest first, after `after_seq`.

        Only these rows are read and parsed: a long queue costs the scheduler nothing per pass.
        """
        return await self._call(self._queue_heads, blocked, after_seq, limit)

    async def status_counts(self) -> dict[str, int]:
        return await self._call(self._status_counts)

    async def succeeded_releases(self, application: str) -> list[Deployment]:
        """Succeeded deployments of the application that started a release, newest first."""
        return await self._call(self._succeeded_releases, application)

    async def get_application(self, name: str) -> Application:
        return await self._call(self._get_application, name)

    async def list_applications(self) -> list[Application]:
        return await self._call(self._list_applications)

    async def set_application(self, name: str, deployment_id: str, state: str, *, keep_since: bool = False) -> Application:
        """Records the application's current release and whether it runs."""
        return await self._call(self._set_application, name, deployment_id, state, keep_since)

    # --- schedules (agent.schedules triggers them) -------------------------------------------

    async def create_schedule(
        self, schedule: Schedule, idempotency_key: str | None, request_hash: str | None
    ) -> tuple[Schedule, bool]:
        return await self._call(self._transaction, lambda: schedule_rows.insert(self._db, schedule, idempotency_key,
                                                                               request_hash))

    async def get_schedule(self, schedule_id: str) -> Schedule:
        return await self._call(lambda: schedule_rows.get(self._db, schedule_id))

    async def list_schedules(self, query: ScheduleFilter) -> tuple[list[Schedule], int | None]:
        return await self._call(lambda: schedule_rows.page(self._db, query))

    async def change_schedule(self, schedule_id: str, change: Callable[[Schedule], Schedule]) -> Schedule:
        """Reads, changes (`change` is pure: it runs on the store thread) and writes a schedule in one transaction.

        A schedule that no longer triggers by itself (paused, archived) loses its pending retries.
        """
        def apply() -> Schedule:
            changed = change(schedule_rows.get(self._db, schedule_id))
            schedule_rows.write(self._db, changed)
            if not changed.triggers:
                schedule_rows.drop_retries(self._db, schedule_id)
            return schedule_rows.get(self._db, schedule_id)

        return await self._call(self._transaction, apply)

    async def next_schedule_due(self) -> str | None:
        """When the next schedule or retry falls due (RFC 3339), from the indexes alone."""
        return await self._call(lambda: schedule_rows.next_due(self._db))

    async def fire_due_schedules(
        self, now: dt.datetime, make_run: MakeRun, *, after_downtime: bool, limit: int, max_queued: int | None
    ) -> list[Deployment]:
        """Fires every schedule due at `now` (at most `limit`), all in one transaction; returns the runs started.

        Each advances to its next trigger time in the same transaction as the run it starts,
        so a crash can neither lose a trigger nor run it twice.
        """
        runs = await self._call(self._transaction, lambda: self._fire_due(now, make_run, after_downtime, limit,
                                                                          max_queued))
        for run in runs:
            self._changed(run)
        return runs

    async def fire_due_retries(self, now: dt.datetime, make_run: MakeRun, limit: int) -> list[Deployment]:
        """Starts the retries due at `now`, each as a new run linked to the run it retries."""
        runs = await self._call(self._transaction, lambda: self._fire_retries(now, make_run, limit))
        for run in runs:
            self._changed(run)
        return runs

    async def trigger_schedule(
        self, schedule_id: str, make_run: MakeRun, idempotency_key: str | None, request_hash: str | None,
        max_queued: int | None,
    ) -> tuple[Deployment, bool]:
        """Starts a run now, on request (paused or not, whatever runs); (the run, created)."""
        def trigger() -> tuple[Deployment, bool]:
            if idempotency_key is not None:
                earlier = self._by_idempotency_key(idempotency_key, request_hash)
                if earlier is not None:
                    return earlier, False
            schedule = schedule_rows.get(self._db, schedule_id)
            if schedule.is_archived:
                raise Conflict(f"schedule {schedule_id} is archived: it starts no more runs", code="archived")
            self._check_queue(max_queued)
            run = make_run(schedule, "manual", None, 1, None)
            self._insert_row(run, idempotency_key, request_hash)
            schedule_rows.write(self._db, dataclasses.replace(
                schedule, stats=started(schedule.stats, run.id, run.created_at)))
            return self._get(run.id), True

        run, created = await self._call(self._transaction, trigger)
        if created:
            self._changed(run)
        return run, created

    def _fire_due(
        self, now: dt.datetime, make_run: MakeRun, after_downtime: bool, limit: int, max_queued: int | None
    ) -> list[Deployment]:
        runs = []
        for schedule in schedule_rows.due(self._db, format_time(now), limit):
            trigger = plan_trigger(schedule, now, after_downtime=after_downtime)
            if trigger is None:
                continue
            stats = dataclasses.replace(schedule.stats, missed_runs=schedule.stats.missed_runs + trigger.missed)
            if trigger.run:
                if is_skipped(schedule, schedule_rows.in_progress_runs(self._db, schedule.id)) or self._queue_full(
                    max_queued
                ):
                    stats = dataclasses.replace(stats, skipped_runs=stats.skipped_runs + 1)
                else:
                    run = make_run(schedule, trigger.reason, trigger.scheduled_for, 1, None)
                    self._insert_row(run, None, None)
                    stats = started(stats, run.id, run.created_at)
                    runs.append(run)
            schedule_rows.write_progress(self._db, _advanced(schedule, trigger, stats))
        return runs

    def _fire_retries(self, now: dt.datetime, make_run: MakeRun, limit: int) -> list[Deployment]:
        runs = []
        for retry in schedule_rows.due_retries(self._db, format_time(now), limit):
            schedule_rows.drop_retry(self._db, retry.deployment_id)
            try:
                schedule = schedule_rows.get(self._db, retry.schedule_id)
            except NotFound:
                continue
            if not schedule.triggers:
                continue
            run = make_run(schedule, "retry", None, retry.attempt, retry.deployment_id)
            self._insert_row(run, None, None)
            schedule_rows.write(self._db, dataclasses.replace(
                schedule, stats=started(schedule.stats, run.id, run.created_at)))
            runs.append(self._get(run.id))
        return runs

    def _run_moved(self, run: Deployment) -> None:
        """In a run's status change's transaction: its schedule's stats, retry and pause follow."""
        try:
            schedule = schedule_rows.get(self._db, run.schedule_id or "")
        except NotFound:
            return
        if not run.is_final:
            if schedule.stats.last_run_id == run.id:
                schedule_rows.write(self._db, dataclasses.replace(
                    schedule, stats=dataclasses.replace(schedule.stats, last_status=run.status)))
            return
        attempt = int((run.schedule_run or {}).get("attempt", 1))
        finished = parse_time(run.finished_at or utc_now())
        end = after_run(schedule, run.id, run.status, (run.error or {}).get("message"), attempt, finished)
        changed = dataclasses.replace(schedule, stats=end.stats)
        if end.pause_reason is not None:
            changed = dataclasses.replace(changed, status="paused", paused_reason=end.pause_reason,
                                          paused_at=run.finished_at, next_due_at=None, updated_at=utc_now())
            schedule_rows.drop_retries(self._db, schedule.id)
        elif end.retry_due is not None:
            schedule_rows.add_retry(self._db, schedule_rows.Retry(run.id, schedule.id, attempt + 1,
                                                                  format_time(end.retry_due)))
        schedule_rows.write(self._db, changed)

    def _transaction(self, work: Callable[[], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            self._recount()
            raise
        return result

    # --- the store thread ------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(self._guarded, function, *args))
        finally:
            self._announce_kept_written()
            self._pending.retry_in_background(lambda: self._call(_nothing), lambda: self._connection is not None)

    def _announce_kept_written(self) -> None:
        """On the loop, after a call: kept final statuses the store thread has written meanwhile are news."""
        while self._kept_written:
            deployment_id = self._kept_written.pop()
            self.changes.changed(deployment_id)
            self.on_callback_event()
            self.on_schedule_event()

    def _guarded(self, function: Callable[..., T], *args: Any) -> T:
        """Runs `function` on the store thread after the pending statuses; a full disk becomes DiskFull."""
        try:
            if self._pending and self._connection is not None:
                self._pending.write(self._write_kept)
            return function(*args)
        except (sqlite3.Error, OSError) as exc:
            full = disk_full_of(exc, self.path.parent)
            if full is None:
                raise
            raise full from exc

    def _deployment(self, row: sqlite3.Row) -> Deployment:
        """The deployment of a row, with its final status if a full disk keeps that from the row."""
        return self._pending.apply(_row_to_deployment(row))

    def _close_connection(self) -> None:
        self._db.close()

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("store is not open")
        return self._connection

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: a 201 is only sent for what is on disk.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=5000")
        indexed = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'deployment_metadata'"
        ).fetchone() is not None
        connection.executescript(SCHEMA)
        if not indexed:
            # A database of an agent before the metadata index: its rows are indexed once, here.
            connection.execute(
                """INSERT OR IGNORE INTO deployment_metadata (key, value, dseq)
                   SELECT j.key, j.value, d.seq FROM deployments d, json_each(d.spec, '$.metadata') j
                   WHERE j.type = 'text'"""
            )
        # A database written before a field existed gets its column (nullable: old rows have none).
        present = {row["name"] for row in connection.execute("PRAGMA table_info(deployments)")}
        for item in FIELDS:
            if item.name not in present:
                connection.execute(f"ALTER TABLE deployments ADD COLUMN {item.name} {_STORED_AS[item.name][0]}")
        connection.execute(schedule_rows.DEPLOYMENTS_INDEX)
        self._connection = connection
        self._recount()

    def _recount(self) -> None:
        """Counts the deployments by status from the table (at open, and after a failed write that counted ahead)."""
        connection = self._db
        self._counts = {status: 0 for status in STATUSES}
        for status, count in connection.execute("SELECT status, COUNT(*) FROM deployments GROUP BY status"):
            self._counts[status] = count
        for deployment_id, status in self._pending.statuses().items():
            row = connection.execute("SELECT status FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
            if row is not None:
                self._count_move(row["status"], status)

    def _insert(
        self,
        deployment: Deployment,
        idempotency_key: str | None,
        request_hash: str | None,
        max_queued: int | None,
    ) -> tuple[Deployment, bool]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if idempotency_key is not None:
                earlier = self._by_idempotency_key(idempotency_key, request_hash)
                if earlier is not None:
                    _rollback(db)
                    return earlier, False
            self._check_queue(max_queued)
            self._insert_row(deployment, idempotency_key, request_hash)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            self._recount()
            raise
        return self._get(deployment.id), True

    def _insert_row(self, deployment: Deployment, idempotency_key: str | None, request_hash: str | None) -> None:
        """Inside a transaction: the new deployment's row, and its first callback event."""
        values = [_encode(item.name, getattr(deployment, item.name)) for item in FIELDS]
        self._db.execute(_INSERT, (*values, idempotency_key, request_hash))
        if deployment.spec.callback is not None:
            self._queue_callback(deployment.id)
        # Counted before the commit: a failed commit re-reads the counts (_recount) rather than undo this.
        self._count_move(None, deployment.status)

    def _queue_full(self, max_queued: int | None) -> bool:
        if max_queued is None:
            return False
        return self._counts["queued"] >= max_queued

    def _check_queue(self, max_queued: int | None) -> None:
        if self._queue_full(max_queued):
            queued = self._counts["queued"]
            raise QueueFull(f"the queue is full: {queued} deployments are waiting (max_queued={max_queued})")

    def _by_idempotency_key(self, key: str, request_hash: str | None) -> Deployment | None:
        row = earlier_row(self._db, "deployments", key, request_hash)
        return None if row is None else self._deployment(row)

    def _get(self, deployment_id: str) -> Deployment:
        row = self._db.execute("SELECT * FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        if row is None:
            raise NotFound(f"deployment {deployment_id} not found")
        return self._deployment(row)

    def _list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("application", "server", "schedule_id"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.status is not None:
            # A final status that a full disk keeps from its row (rare) is the row's status here too.
            kept = self._pending.ids()
            clauses.append(f"(status = ?{' OR id IN (' + ', '.join('?' for _ in kept) + ')' if kept else ''})")
            params += [query.status, *kept]
        if query.updated_since is not None:
            clauses.append("updated_at >= ?")
            params.append(query.updated_since)
        if query.after_seq is not None:
            clauses.append("seq < ?")
            params.append(query.after_seq)
        source = "deployments"
        order = "+seq" if query.updated_since is not None and self._few_updated_since(query.updated_since) else "seq"
        for index, (key, value) in enumerate(query.metadata):
            # From the metadata index (deployment_metadata), kept from the spec by triggers.
            if index == 0:
                source = "deployment_metadata m JOIN deployments ON deployments.seq = m.dseq"
                clauses.append("m.key = ? AND m.value = ?")
                params += [key, value]
                # Newest first straight from the index: the matching rows are read, not the table.
                order = "m.dseq" if order == "seq" else order
            else:
                clauses.append(
                    "EXISTS (SELECT 1 FROM deployment_metadata x WHERE x.key = ? AND x.value = ? AND x.dseq = seq)"
                )
                params += [key, value]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT deployments.* FROM {source} {where} ORDER BY {order} DESC LIMIT ?",
            (*params, query.limit + 1),
        ).fetchall()
        page = [self._deployment(row) for row in rows[: query.limit]]
        next_seq = page[-1].seq if len(rows) > query.limit else None
        return [item for item in page if query.status is None or item.status == query.status], next_seq

    def _few_updated_since(self, since: str) -> bool:
        """Whether few rows changed since `since` (a poller's usual question), looked up in the index.

        Then they are read through the updated_at index and sorted (`ORDER BY +seq` keeps SQLite
        from walking the whole table newest first looking for them); when many changed, that
        walk finds a page at once.
        """
        probe = "SELECT 1 FROM deployments WHERE updated_at >= ? LIMIT 1 OFFSET ?"
        return self._db.execute(probe, (since, _FEW_CHANGED)).fetchone() is None

    def _transition(self, deployment_id: str, status: str, fields: dict[str, Any]) -> Deployment:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        values: dict[str, Any] | None = None
        try:
            current = self._get(deployment_id)
            if status not in TRANSITIONS[current.status]:
                kept = " (written once the disk has room)" if deployment_id in self._pending else ""
                raise Conflict(
                    f"deployment {deployment_id} is {current.status}{kept}; it cannot become {status}",
                    code="illegal_transition",
                )
            values = _transition_values(current, status, fields)
            self._write(deployment_id, values)
            self._queue_callback(deployment_id)
            if current.schedule_id is not None:
                self._run_moved(self._get(deployment_id))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            if values is None or status not in FINAL_STATUSES or not is_sqlite_disk_full(exc, self.path.parent):
                raise
            self._pending.keep(deployment_id, values)
        except BaseException:
            _rollback(db)
            raise
        self._count_move(current.status, status)
        return self._get(deployment_id)

    def _update(self, deployment_id: str, fields: dict[str, Any]) -> Deployment:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)} with update(); status goes through transition()")
        self._get(deployment_id)
        self._write(deployment_id, {**fields, "updated_at": utc_now()})
        return self._get(deployment_id)

    def _set_metadata(self, deployment_id: str, metadata: dict[str, Any]) -> Deployment:
        current = self._get(deployment_id)
        spec = dataclasses.replace(current.spec, metadata=metadata)
        self._write(deployment_id, {"spec": spec, "updated_at": utc_now()})
        return self._get(deployment_id)

    def _queue_callback(self, deployment_id: str) -> None:
        """In the status change's transaction: the event that reports it, if the deployment has a callback."""
        deployment = self._get(deployment_id)
        if deployment.spec.callback is None:
            return
        event_id = new_id("evt_")
        body = {"type": "deployment.status", "id": event_id, "deployment": deployment.to_json()}
        outbox.enqueue(self._db, event_id, deployment_id, deployment.spec.callback.url, body, utc_now())
        self._write(deployment_id, {"callbacks": outbox.summary(self._db, deployment_id)})

    def _record_callback_attempt(self, seq: int, state: str, error: str | None, next_attempt_at: float) -> str | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            deployment_id = outbox.record_attempt(db, seq, state=state, error=error, next_attempt_at=next_attempt_at,
                                                  now=utc_now())
            exists = deployment_id is not None and db.execute(
                "SELECT 1 FROM deployments WHERE id = ?", (deployment_id,)
            ).fetchone() is not None
            if exists:
                self._write(deployment_id, {"callbacks": outbox.summary(db, deployment_id), "updated_at": utc_now()})
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return deployment_id if exists else None

    def _write_kept(self, deployment_id: str, values: dict[str, Any]) -> None:
        """A final status kept for lack of room, written now with what its move would have written:
        its callback event and its schedule's outcome, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._write(deployment_id, values)
            self._queue_callback(deployment_id)
            written = self._get(deployment_id)
            if written.schedule_id is not None:
                self._run_moved(written)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._kept_written.append(deployment_id)

    def _write(self, deployment_id: str, values: dict[str, Any]) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [_encode(name, value) for name, value in values.items()]
        self._db.execute(f"UPDATE deployments SET {columns} WHERE id = ?", (*params, deployment_id))

    def _delete(self, deployment_id: str) -> Deployment:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self._get(deployment_id)
            if current.status in IN_PROGRESS_STATUSES:
                raise Conflict(
                    f"deployment {deployment_id} is {current.status}; kill it before deleting it",
                    code="in_progress",
                )
            db.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))
            outbox.forget(db, deployment_id)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._count_move(current.status, None)
        self._pending.discard(deployment_id)
        return current

    def _with_status(self, statuses: tuple[str, ...]) -> list[Deployment]:
        marks = ", ".join("?" for _ in statuses)
        rows = self._db.execute(
            f"SELECT * FROM deployments WHERE status IN ({marks}) ORDER BY seq", statuses
        ).fetchall()
        # One whose final status waits for room is no longer what it was: nothing may start or await it.
        return [deployment for deployment in map(self._deployment, rows) if deployment.status in statuses]

    def _queue_heads(self, blocked: frozenset[str], after_seq: int, limit: int) -> list[Deployment]:
        # One whose final status waits for room is no longer queued: the next of its application is the head.
        kept = self._pending.ids()
        unkept = f" AND id NOT IN ({', '.join('?' for _ in kept)})" if kept else ""
        rows = self._db.execute(
            f"""SELECT d.* FROM deployments d JOIN (
                    SELECT MIN(seq) AS head FROM deployments WHERE status = 'queued'{unkept} GROUP BY application
                ) h ON d.seq = h.head
                WHERE d.seq > ? ORDER BY d.seq LIMIT ?""",
            (*kept, after_seq, limit + len(blocked)),
        ).fetchall()
        return [self._deployment(row) for row in rows if row["application"] not in blocked][:limit]

    def _status_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def _count_move(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self._counts[old] -= 1
        if new is not None:
            self._counts[new] += 1

    def _succeeded_releases(self, application: str) -> list[Deployment]:
        rows = self._db.execute(
            """SELECT * FROM deployments WHERE application = ? AND status = 'succeeded' AND release IS NOT NULL
               ORDER BY seq DESC""",
            (application,),
        ).fetchall()
        return [self._deployment(row) for row in rows]

    def _get_application(self, name: str) -> Application:
        row = self._db.execute("SELECT * FROM applications WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"application {name} not found (it has no release)")
        return Application(**dict(row))

    def _list_applications(self) -> list[Application]:
        return [Application(**dict(row)) for row in self._db.execute("SELECT * FROM applications ORDER BY name")]

    def _set_application(self, name: str, deployment_id: str, state: str, keep_since: bool) -> Application:
        now = utc_now()
        self._db.execute(
            f"""INSERT INTO applications (name, deployment_id, state, since, updated_at) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET deployment_id = excluded.deployment_id, state = excluded.state,
               {"" if keep_since else "since = excluded.since,"} updated_at = excluded.updated_at""",
            (name, deployment_id, state, now, now),
        )
        return self._get_application(name)


@dataclass(frozen=True)
class Application:
    """An application's current release: which deployment, and whether it runs."""

    name: str
    deployment_id: str
    state: str  # "running" or "stopped"
    since: str
    updated_at: str


def _transition_values(current: Deployment, status: str, fields: dict[str, Any]) -> dict[str, Any]:
    """What a move to `status` writes: the fields, the status, and the times it stamps."""
    now = utc_now()
    values = {**fields, "status": status, "updated_at": now}
    if status in IN_PROGRESS_STATUSES and current.started_at is None:
        values["started_at"] = now
    if status in FINAL_STATUSES:
        values["finished_at"] = now
        values.setdefault("pid", None)
        if current.started_at is None and status == "succeeded":
            values["started_at"] = now
    return values


def _advanced(schedule: Schedule, trigger: Trigger, stats: Any) -> Schedule:
    """The schedule after a trigger: its next due time and stats."""
    next_due = None if trigger.next_due is None else format_time(trigger.next_due)
    return dataclasses.replace(schedule, next_due_at=next_due, stats=stats)


def _rollback(db: sqlite3.Connection) -> None:
    """Ends the open transaction, if SQLite has not ended it already (it does on SQLITE_FULL).

    A ROLLBACK without a transaction raises, and would hide the error that matters.
    """
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _no_one() -> None:
    """Nobody to wake: no sender runs (a store used on its own)."""


def _nothing() -> None:
    """A store call that does nothing but write what is pending."""


def _encode(name: str, value: Any) -> Any:
    if name == "spec":
        return _spec_text(value)
    return json.dumps(value) if name in JSON_COLUMNS and value is not None else value


def _decode(name: str, value: Any) -> Any:
    if name == "spec":
        return _spec_of(value)
    if name in JSON_COLUMNS:
        return json.loads(value) if value else None
    return value


def _spec_text(spec: DeploymentSpec) -> str:
    """The spec as stored, made once per spec object (specs are immutable; a schedule's runs share one)."""
    text = spec.__dict__.get("_stored_text")
    if text is None:
        text = spec.__dict__["_stored_text"] = json.dumps(spec.to_dict())
    return text


@functools.lru_cache(maxsize=4096)
def _spec_of(text: str) -> DeploymentSpec:
    """One spec object per stored spec text: decoding, and the response JSON kept on the object
    (models.spec_json), are paid once per spec rather than on every read of its row."""
    return DeploymentSpec.from_dict(json.loads(text))


def _row_to_deployment(row: sqlite3.Row) -> Deployment:
    values = {item.name: _decode(item.name, row[item.name]) for item in FIELDS}
    return Deployment(**values, seq=row["seq"])
