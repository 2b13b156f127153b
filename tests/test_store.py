"""The SQLite store: durability, the one transition function, listing, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.errors import Conflict, DiskFull, NotFound, QueueFull
from agent.models import Deployment, DeploymentFilter, DeploymentSpec, new_deployment_id, utc_now
from agent.store import Store
from tests.tmpfs import fill, mounted_tmpfs


def make(application: str = "web") -> Deployment:
    now = utc_now()
    deployment_id = new_deployment_id()
    return Deployment(
        id=deployment_id, application=application, server="local", status="queued",
        created_at=now, updated_at=now, log_path=f"/tmp/{deployment_id}.log",
        spec=DeploymentSpec(application=application),
    )


@pytest.fixture
async def store(tmp_path: Path):
    store = Store(tmp_path / "agent.db")
    await store.open()
    yield store
    await store.close()


async def test_insert_is_on_disk_before_it_returns(store: Store, tmp_path: Path) -> None:
    """An inserted deployment is readable by another connection at once (committed, WAL)."""
    deployment, created = await store.insert(make())
    assert created
    other = sqlite3.connect(tmp_path / "agent.db")
    assert other.execute("SELECT status FROM deployments WHERE id = ?", (deployment.id,)).fetchone() == ("queued",)
    other.close()
    journal = sqlite3.connect(tmp_path / "agent.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


async def test_transition_checks_legality_and_stamps_times(store: Store) -> None:
    """Legal moves stamp started_at/finished_at/updated_at; illegal ones raise Conflict."""
    deployment, _ = await store.insert(make())
    building = await store.transition(deployment.id, "building")
    assert building.started_at is not None and building.updated_at >= deployment.updated_at
    done = await store.transition(deployment.id, "succeeded", exit_code=0)
    assert done.finished_at is not None and done.exit_code == 0
    with pytest.raises(Conflict):
        await store.transition(deployment.id, "building")
    with pytest.raises(Conflict):
        await store.transition(deployment.id, "failed")
    with pytest.raises(NotFound):
        await store.transition("dep_nope", "failed")


async def test_update_refuses_status(store: Store) -> None:
    """Status never changes outside transition()."""
    deployment, _ = await store.insert(make())
    with pytest.raises(ValueError):
        await store.update(deployment.id, status="failed")
    updated = await store.update(deployment.id, pid=42, error={"type": "x", "message": "y"})
    assert updated.pid == 42 and updated.error == {"type": "x", "message": "y"}


async def test_idempotency_and_queue_limit(store: Store) -> None:
    """A repeated key returns the first deployment; another body conflicts; a full queue is refused."""
    first, created = await store.insert(make(), idempotency_key="k", request_hash="h1")
    again, created_again = await store.insert(make(), idempotency_key="k", request_hash="h1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict):
        await store.insert(make(), idempotency_key="k", request_hash="h2")
    with pytest.raises(QueueFull):
        await store.insert(make(), max_queued=1)


async def test_list_pages_newest_first_with_filters(store: Store) -> None:
    """Pages follow each other without gaps; filters narrow by application and status."""
    ids = [(await store.insert(make("a" if i % 2 else "b")))[0].id for i in range(5)]
    page, next_seq = await store.list(DeploymentFilter(limit=2))
    assert [d.id for d in page] == ids[::-1][:2] and next_seq is not None
    rest, end = await store.list(DeploymentFilter(limit=10, after_seq=next_seq))
    assert [d.id for d in rest] == ids[::-1][2:] and end is None
    only_a, _ = await store.list(DeploymentFilter(application="a"))
    assert {d.id for d in only_a} == {ids[1], ids[3]}
    await store.transition(ids[0], "failed")
    failed, _ = await store.list(DeploymentFilter(status="failed"))
    assert [d.id for d in failed] == [ids[0]]


async def test_delete_refuses_in_progress(store: Store) -> None:
    """A building deployment cannot be deleted; a final one can."""
    deployment, _ = await store.insert(make())
    await store.transition(deployment.id, "building")
    with pytest.raises(Conflict):
        await store.delete(deployment.id)
    await store.transition(deployment.id, "cancelled")
    await store.delete(deployment.id)
    with pytest.raises(NotFound):
        await store.get(deployment.id)


async def test_sqlite_runs_off_the_event_loop(store: Store) -> None:
    """Store calls run on the store's own thread, never the event loop's."""
    loop_thread = threading.get_ident()
    seen: list[int] = []
    await store._call(lambda: seen.append(threading.get_ident()))
    assert seen and seen[0] != loop_thread
    results = await asyncio.gather(*(store.insert(make()) for _ in range(20)))
    assert len({d.id for d, _ in results}) == 20


# Written by an agent from before release columns and the derived schema: the first release's table.
OLD_SCHEMA = """
CREATE TABLE deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, application TEXT NOT NULL,
    server TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    started_at TEXT, finished_at TEXT, pid INTEGER, pid_started_at REAL, container_id TEXT, exit_code INTEGER,
    url TEXT, smoke_test TEXT, rollback_of TEXT, error TEXT, stage TEXT, log_path TEXT NOT NULL,
    spec TEXT NOT NULL, idempotency_key TEXT UNIQUE, request_hash TEXT
);
"""


async def test_a_database_of_an_earlier_agent_opens_and_reads_back(tmp_path: Path) -> None:
    """Rows written with the earlier table read back whole; fields added since get their columns on open."""
    path = tmp_path / "agent.db"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.execute(
        """INSERT INTO deployments (id, application, server, status, created_at, updated_at, log_path, spec,
                                    error, idempotency_key, request_hash)
           VALUES ('dep_old', 'web', 'local', 'failed', 't0', 't1', '/tmp/old.log', ?, ?, 'k', 'h')""",
        ('{"application": "web", "build": {"image": "local/busybox", "command": ["true"]}}',
         '{"type": "lost", "message": "gone"}'),
    )
    old.commit()
    old.close()
    store = Store(path)
    await store.open()
    try:
        deployment = await store.get("dep_old")
        assert deployment.error == {"type": "lost", "message": "gone"} and deployment.release is None
        assert deployment.spec.build is not None and deployment.spec.build.command == ("true",)
        updated = await store.update("dep_old", release={"kind": "container"}, release_image="img")
        assert updated.release == {"kind": "container"} and updated.release_image == "img"
        again, created = await store.insert(make(), idempotency_key="k", request_hash="h")
        assert not created and again.id == "dep_old"
    finally:
        await store.close()


# --- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
async def small_store(tmp_path: Path):
    """A store on a real 8 MiB tmpfs (unmounted afterwards), and that directory."""
    with mounted_tmpfs(tmp_path / "disk") as directory:
        store = Store(directory / "agent.db")
        await store.open()
        try:
            yield store, directory
        finally:
            await store.close()


def stored_status(path: Path, deployment_id: str) -> str:
    """The status in the file itself, read by another connection."""
    with contextlib.closing(sqlite3.connect(path)) as other:
        return other.execute("SELECT status FROM deployments WHERE id = ?", (deployment_id,)).fetchone()[0]


async def test_a_full_disk_is_disk_full_and_the_store_stays_whole(small_store: tuple[Store, Path]) -> None:
    """SQLITE_FULL is DiskFull (503 disk_full), nothing written before is lost, and room brings writes back."""
    store, directory = small_store
    kept, _ = await store.insert(make())
    fill(directory / "filler")
    with pytest.raises(DiskFull) as refused:
        for _ in range(1000):  # SQLite may have some room left in its own files
            await store.insert(make())
    assert refused.value.status == 503 and refused.value.error_type == "disk_full"
    assert (await store.get(kept.id)).status == "queued"
    with contextlib.closing(sqlite3.connect(directory / "agent.db")) as other:
        assert other.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    (directory / "filler").unlink()
    later, created = await store.insert(make())
    assert created and (await store.get(later.id)).status == "queued"


async def test_a_final_status_kept_by_a_full_disk_is_written_once_there_is_room(
    small_store: tuple[Store, Path],
) -> None:
    """A final status that does not fit is kept, counts as final, and reaches the file when space is freed."""
    store, directory = small_store
    stuck, _ = await store.insert(make())
    await store.transition(stuck.id, "building")
    fill(directory / "filler")
    error = {"type": "disk_full", "message": "no room"}
    ended = await store.transition(stuck.id, "failed", error=error)
    assert ended.status == "failed" and ended.error == error
    assert store.pending_statuses() == {stuck.id: "failed"}
    assert stored_status(directory / "agent.db", stuck.id) == "building"
    # Every read shows it final: nothing starts it, awaits it, or moves it elsewhere.
    shown = await store.get(stuck.id)
    assert shown.status == "failed" and shown.error == error and shown.finished_at is not None
    assert await store.with_status("building") == []
    assert (await store.status_counts())["failed"] == 1
    listed, _ = await store.list(DeploymentFilter(status="failed"))
    assert [item.id for item in listed] == [stuck.id]
    with pytest.raises(Conflict):
        await store.transition(stuck.id, "cancelled")
    (directory / "filler").unlink()
    # Written by the store's own retry, with no other call to prompt it.
    deadline = time.monotonic() + 5
    while stored_status(directory / "agent.db", stuck.id) != "failed":
        assert time.monotonic() < deadline, "the kept status was not written after space was freed"
        await asyncio.sleep(0.1)
    assert store.pending_statuses() == {}
    written = await store.get(stuck.id)
    assert written.status == "failed" and written.error == error and written.finished_at == shown.finished_at
    await store.delete(stuck.id)
    with pytest.raises(NotFound):
        await store.get(stuck.id)



async def test_a_kept_final_status_gets_its_callback_event_when_it_is_written(small_store: tuple[Store, Path]) -> None:
    """The event that reports a final status is written with it, even when a full disk delayed both."""
    import dataclasses
    import json

    from agent.models import CallbackSpec

    store, directory = small_store
    woken: list[int] = []
    store.on_callback_event = lambda: woken.append(1)
    base = make()
    called, _ = await store.insert(dataclasses.replace(
        base, spec=dataclasses.replace(base.spec, callback=CallbackSpec(url="http://127.0.0.1:9/hook"))))
    await store.transition(called.id, "building")
    fill(directory / "filler")
    await store.transition(called.id, "failed", error={"type": "disk_full", "message": "no room"})
    assert store.pending_statuses() == {called.id: "failed"}
    (directory / "filler").unlink()
    deadline = time.monotonic() + 5
    while store.pending_statuses():
        assert time.monotonic() < deadline, "the kept status was not written after space was freed"
        await asyncio.sleep(0.1)
    await store.get(called.id)  # a call after the write: the sender has been told
    with contextlib.closing(sqlite3.connect(directory / "agent.db")) as db:
        bodies = [json.loads(body) for (body,) in db.execute(
            "SELECT body FROM callback_outbox WHERE deployment_id = ? ORDER BY seq", (called.id,))]
    assert [body["deployment"]["status"] for body in bodies][-1] == "failed", bodies
    assert woken, "the callback sender was not woken"


async def test_status_counts_follow_every_write_and_survive_a_reopen(store: Store, tmp_path: Path) -> None:
    first, _ = await store.insert(make())
    second, _ = await store.insert(make("api"))
    await store.transition(first.id, "building")
    await store.transition(second.id, "cancelled")
    await store.delete(second.id)
    counts = await store.status_counts()
    assert counts["building"] == 1 and counts["queued"] == 0 and counts["cancelled"] == 0
    await store.close()
    reopened = Store(tmp_path / "agent.db")
    await reopened.open()
    assert (await reopened.status_counts())["building"] == 1
    await reopened.close()


async def test_queue_heads_are_each_applications_oldest_queued(store: Store) -> None:
    web1, _ = await store.insert(make("web"))
    await store.insert(make("web"))
    api1, _ = await store.insert(make("api"))
    job1, _ = await store.insert(make("job"))
    heads = await store.queue_heads(frozenset(), 0, 10)
    assert [d.id for d in heads] == [web1.id, api1.id, job1.id]
    assert [d.id for d in await store.queue_heads(frozenset({"web"}), 0, 10)] == [api1.id, job1.id]
    assert [d.id for d in await store.queue_heads(frozenset(), web1.seq, 1)] == [api1.id]


async def test_updated_since_newer_than_every_row_reads_the_index(store: Store) -> None:
    for _ in range(5):
        await store.insert(make())
    future = "2999-01-01T00:00:00.000Z"
    assert (await store.list(DeploymentFilter(updated_since=future))) == ([], None)
    page, _ = await store.list(DeploymentFilter(updated_since="2000-01-01T00:00:00.000Z", limit=2))
    assert len(page) == 2 and page[0].seq > page[1].seq


def with_metadata(metadata: dict, application: str = "web") -> Deployment:
    import dataclasses

    deployment = make(application)
    return dataclasses.replace(deployment, spec=dataclasses.replace(deployment.spec, metadata=metadata))


async def ids_where(store: Store, *pairs: tuple[str, str], **filters: object) -> list[str]:
    page, _ = await store.list(DeploymentFilter(metadata=tuple(pairs), **filters))  # type: ignore[arg-type]
    return [deployment.id for deployment in page]


async def test_the_metadata_filter_follows_every_write_of_the_metadata(store: Store) -> None:
    """Its index is kept by the database itself: inserts, PATCHed metadata and deletes all show at once."""
    first, _ = await store.insert(with_metadata({"tenant": "t1", "env": "prod"}))
    second, _ = await store.insert(with_metadata({"tenant": "t1", "env": "staging", "n": 7}, application="api"))
    third, _ = await store.insert(with_metadata({"tenant": "t2"}))
    assert await ids_where(store, ("tenant", "t1")) == [second.id, first.id]  # newest first
    assert await ids_where(store, ("tenant", "t1"), ("env", "prod")) == [first.id]
    assert await ids_where(store, ("tenant", "t1"), application="api") == [second.id]
    assert await ids_where(store, ("n", "7")) == []  # only string values match
    assert await ids_where(store, ("tenant", "none")) == []
    await store.set_metadata(third.id, {"tenant": "t1"})
    await store.set_metadata(first.id, {"tenant": "t3"})
    assert await ids_where(store, ("tenant", "t1")) == [third.id, second.id]
    await store.transition(second.id, "failed")
    await store.delete(second.id)
    assert await ids_where(store, ("tenant", "t1")) == [third.id]
    page, next_seq = await store.list(DeploymentFilter(metadata=(("tenant", "t1"),), limit=1))
    assert [d.id for d in page] == [third.id] and next_seq is None


async def test_a_database_from_before_the_metadata_index_is_indexed_when_opened(tmp_path: Path) -> None:
    store = Store(tmp_path / "old.db")
    await store.open()
    kept, _ = await store.insert(with_metadata({"tenant": "old"}))
    await store.close()
    with sqlite3.connect(tmp_path / "old.db") as db:  # as an older agent left it
        for trigger in ("deployment_metadata_inserted", "deployment_metadata_updated", "deployment_metadata_deleted"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE deployment_metadata")
    reopened = Store(tmp_path / "old.db")
    await reopened.open()
    try:
        assert await ids_where(reopened, ("tenant", "old")) == [kept.id]
    finally:
        await reopened.close()
