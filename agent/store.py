"""The durable store: one SQLite file (WAL), the single source of truth.

SQLite blocks, so one dedicated thread owns the connection and every call is
handed to it; the event loop never touches the database. `transition` is the
only function that changes a deployment's status.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent.errors import Conflict, NotFound, QueueFull
from agent.models import (
    FINAL_STATUSES,
    IN_PROGRESS_STATUSES,
    STATUSES,
    TRANSITIONS,
    Deployment,
    DeploymentFilter,
    DeploymentSpec,
    utc_now,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    application     TEXT NOT NULL,
    server          TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    pid             INTEGER,
    pid_started_at  REAL,
    container_id    TEXT,
    exit_code       INTEGER,
    url             TEXT,
    smoke_test      TEXT,
    rollback_of     TEXT,
    error           TEXT,
    stage           TEXT,
    log_path        TEXT NOT NULL,
    spec            TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT,
    release         TEXT,
    release_image   TEXT,
    release_from    TEXT
);
CREATE INDEX IF NOT EXISTS deployments_status ON deployments (status, seq);
CREATE INDEX IF NOT EXISTS deployments_application ON deployments (application, seq);
CREATE INDEX IF NOT EXISTS deployments_updated ON deployments (updated_at);
CREATE TABLE IF NOT EXISTS applications (
    name            TEXT PRIMARY KEY,
    deployment_id   TEXT NOT NULL,
    state           TEXT NOT NULL,
    since           TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
"""

# Columns added after the first release; databases created before get them on open.
ADDED_COLUMNS = {"release": "TEXT", "release_image": "TEXT", "release_from": "TEXT"}

# Columns other than status that callers may set; JSON ones are encoded on the way in.
UPDATABLE = frozenset(
    {
        "pid", "pid_started_at", "container_id", "exit_code", "url", "smoke_test", "error", "stage", "rollback_of",
        "release", "release_image", "release_from",
    }
)
JSON_COLUMNS = frozenset({"smoke_test", "error", "release"})


class Store:
    """Async facade over one SQLite connection living on its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._connection is not None:
            await self._call(self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=True)

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
        return await self._call(self._insert, deployment, idempotency_key, request_hash, max_queued)

    async def get(self, deployment_id: str) -> Deployment:
        return await self._call(self._get, deployment_id)

    async def list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        """A page of deployments, newest first, and the seq to continue after (None at the end)."""
        return await self._call(self._list, query)

    async def transition(self, deployment_id: str, status: str, **fields: Any) -> Deployment:
        """The one way a status changes: checks the move is legal, stamps the times, writes atomically."""
        return await self._call(self._transition, deployment_id, status, fields)

    async def update(self, deployment_id: str, **fields: Any) -> Deployment:
        """Sets fields other than status (pid, container_id, ...) and stamps updated_at."""
        return await self._call(self._update, deployment_id, fields)

    async def delete(self, deployment_id: str) -> Deployment:
        """Removes a record that is not in progress; returns what was removed."""
        return await self._call(self._delete, deployment_id)

    async def with_status(self, *statuses: str) -> list[Deployment]:
        """Deployments in any of these statuses, oldest first."""
        return await self._call(self._with_status, statuses)

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

    # --- the store thread ------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args))

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
        connection.executescript(SCHEMA)
        present = {row["name"] for row in connection.execute("PRAGMA table_info(deployments)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                connection.execute(f"ALTER TABLE deployments ADD COLUMN {column} {kind}")
        self._connection = connection

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
                row = db.execute(
                    "SELECT * FROM deployments WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    db.execute("ROLLBACK")
                    if row["request_hash"] != request_hash:
                        raise Conflict(
                            "Idempotency-Key was already used with a different request body",
                            code="idempotency_key_reused",
                            details={"deployment_id": row["id"]},
                        )
                    return _row_to_deployment(row), False
            if max_queued is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM deployments WHERE status = 'queued'").fetchone()
                if queued >= max_queued:
                    db.execute("ROLLBACK")
                    raise QueueFull(f"the queue is full: {queued} deployments are waiting (max_queued={max_queued})")
            cursor = db.execute(
                """INSERT INTO deployments (id, application, server, status, created_at, updated_at, log_path,
                                            spec, rollback_of, idempotency_key, request_hash, release_image,
                                            release_from)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    deployment.id,
                    deployment.application,
                    deployment.server,
                    deployment.status,
                    deployment.created_at,
                    deployment.updated_at,
                    deployment.log_path,
                    json.dumps(deployment.spec.to_dict()),
                    deployment.rollback_of,
                    idempotency_key,
                    request_hash,
                    deployment.release_image,
                    deployment.release_from,
                ),
            )
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
        row = db.execute("SELECT * FROM deployments WHERE seq = ?", (cursor.lastrowid,)).fetchone()
        return _row_to_deployment(row), True

    def _get(self, deployment_id: str) -> Deployment:
        row = self._db.execute("SELECT * FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        if row is None:
            raise NotFound(f"deployment {deployment_id} not found")
        return _row_to_deployment(row)

    def _list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("application", "server", "status"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.updated_since is not None:
            clauses.append("updated_at >= ?")
            params.append(query.updated_since)
        if query.after_seq is not None:
            clauses.append("seq < ?")
            params.append(query.after_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT * FROM deployments {where} ORDER BY seq DESC LIMIT ?", (*params, query.limit + 1)
        ).fetchall()
        page = [_row_to_deployment(row) for row in rows[: query.limit]]
        next_seq = page[-1].seq if len(rows) > query.limit else None
        return page, next_seq

    def _transition(self, deployment_id: str, status: str, fields: dict[str, Any]) -> Deployment:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self._get(deployment_id)
            if status not in TRANSITIONS[current.status]:
                raise Conflict(
                    f"deployment {deployment_id} is {current.status}; it cannot become {status}",
                    code="illegal_transition",
                )
            now = utc_now()
            values = dict(fields)
            values["status"] = status
            values["updated_at"] = now
            if status in IN_PROGRESS_STATUSES and current.started_at is None:
                values["started_at"] = now
            if status in FINAL_STATUSES:
                values["finished_at"] = now
                values.setdefault("pid", None)
                if current.started_at is None and status == "succeeded":
                    values["started_at"] = now
            self._write(deployment_id, values)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self._get(deployment_id)

    def _update(self, deployment_id: str, fields: dict[str, Any]) -> Deployment:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)} with update(); status goes through transition()")
        self._get(deployment_id)
        self._write(deployment_id, {**fields, "updated_at": utc_now()})
        return self._get(deployment_id)

    def _write(self, deployment_id: str, values: dict[str, Any]) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in values.items()]
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
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return current

    def _with_status(self, statuses: tuple[str, ...]) -> list[Deployment]:
        marks = ", ".join("?" for _ in statuses)
        rows = self._db.execute(
            f"SELECT * FROM deployments WHERE status IN ({marks}) ORDER BY seq", statuses
        ).fetchall()
        return [_row_to_deployment(row) for row in rows]

    def _status_counts(self) -> dict[str, int]:
        counts = {status: 0 for status in STATUSES}
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM deployments GROUP BY status"):
            counts[status] = count
        return counts


    def _succeeded_releases(self, application: str) -> list[Deployment]:
        rows = self._db.execute(
            """SELECT * FROM deployments WHERE application = ? AND status = 'succeeded' AND release IS NOT NULL
               ORDER BY seq DESC""",
            (application,),
        ).fetchall()
        return [_row_to_deployment(row) for row in rows]

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


def _row_to_deployment(row: sqlite3.Row) -> Deployment:
    return Deployment(
        id=row["id"],
        application=row["application"],
        server=row["server"],
        status=row["status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        log_path=row["log_path"],
        spec=DeploymentSpec.from_dict(json.loads(row["spec"])),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        pid=row["pid"],
        pid_started_at=row["pid_started_at"],
        container_id=row["container_id"],
        exit_code=row["exit_code"],
        url=row["url"],
        smoke_test=json.loads(row["smoke_test"]) if row["smoke_test"] else None,
        rollback_of=row["rollback_of"],
        error=json.loads(row["error"]) if row["error"] else None,
        stage=row["stage"],
        release=json.loads(row["release"]) if row["release"] else None,
        release_image=row["release_image"],
        release_from=row["release_from"],
        seq=row["seq"],
    )
