"""Schedules over a real SQLite store, with a clock the test moves: triggers, skips, retries, pauses, downtime."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from agent.config import Config
from agent.errors import Conflict, NotFound
from agent.models import Deployment, DeploymentFilter, DeploymentSpec, format_time, new_deployment_id
from agent.schedule_specs import parse_schedule_request
from agent.schedules import Schedules
from agent.store import Store

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + dt.timedelta(seconds=seconds)


def new_record(spec: DeploymentSpec, **fields: Any) -> Deployment:
    deployment_id = new_deployment_id()
    now = format_time(dt.datetime.now(UTC))
    return Deployment(id=deployment_id, application=spec.application, server=spec.server, status="queued",
                      created_at=now, updated_at=now, log_path=f"/tmp/{deployment_id}.log", spec=spec, **fields)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "state.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def schedules_on(store: Store, clock: Clock) -> Schedules:
    woken: list[int] = []
    return Schedules(store, lambda: Config(), new_record, lambda: woken.append(1), clock)


async def create(schedules: Schedules, every_s: int = 60, **config: Any) -> str:
    body = {"application": "jobs", "schedule": {"type": "interval", "every_s": every_s}, "template": {},
            "config": config}
    created, _ = await schedules.create(parse_schedule_request(body), {"metadata": {"from": "template"}})
    return created.id


async def runs_of(store: Store, schedule_id: str) -> list[Deployment]:
    page, _ = await store.list(DeploymentFilter(schedule_id=schedule_id, limit=500))
    return page


async def fail(store: Store, run: Deployment) -> None:
    await store.transition(run.id, "building")
    await store.transition(run.id, "failed", error={"type": "build_failed", "message": "build command exited with code 1"})


async def test_a_due_schedule_starts_one_queued_run_and_moves_on(store: Store, clock: Clock) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules)
    clock.at(59.9)
    await schedules.fire_due()
    assert await runs_of(store, schedule_id) == []
    clock.at(60.01)
    await schedules.fire_due()
    (run,) = await runs_of(store, schedule_id)
    assert run.status == "queued" and run.schedule_id == schedule_id and run.application == "jobs"
    assert run.schedule_run == {"reason": "schedule", "attempt": 1, "scheduled_for": format_time(T0 + dt.timedelta(seconds=60)),
                                "timeout_s": None}
    assert dict(run.spec.metadata) == {"from": "template"}
    schedule = await schedules.get(schedule_id)
    assert schedule.next_due_at == format_time(T0 + dt.timedelta(seconds=120))
    assert (schedule.stats.total_runs, schedule.stats.last_status, schedule.stats.last_run_id) == (1, "queued", run.id)


async def test_a_trigger_while_max_concurrent_runs_are_in_progress_is_skipped_and_counted(store: Store, clock: Clock) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules, max_concurrent=1)
    clock.at(60)
    await schedules.fire_due()
    clock.at(120)
    await schedules.fire_due()  # the first run is still queued
    assert len(await runs_of(store, schedule_id)) == 1
    assert (await schedules.get(schedule_id)).stats.skipped_runs == 1
    (first,) = await runs_of(store, schedule_id)
    await store.transition(first.id, "succeeded")
    clock.at(180)
    await schedules.fire_due()
    assert len(await runs_of(store, schedule_id)) == 2


async def test_a_slow_run_does_not_shift_later_triggers(store: Store, clock: Clock) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules, max_concurrent=5)
    for seconds in (60.5, 120.9, 180.2):  # the loop wakes late by varying amounts, runs never finish
        clock.at(seconds)
        await schedules.fire_due()
    planned = [run.schedule_run["scheduled_for"] for run in reversed(await runs_of(store, schedule_id))]
    assert planned == [format_time(T0 + dt.timedelta(seconds=s)) for s in (60, 120, 180)]


async def test_a_failed_run_is_retried_as_a_new_run_linked_to_it(store: Store, clock: Clock) -> None:
    # The store stamps a run's end with the real time: the test's clock starts there too.
    clock.now = start = dt.datetime.now(UTC)
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules, every_s=3600, max_retries=1, retry_backoff_s=1.0)
    clock.now = start + dt.timedelta(seconds=3600)
    await schedules.fire_due()
    (first,) = await runs_of(store, schedule_id)
    await fail(store, first)
    await schedules.fire_due()  # the retry is due a second after the failure, long before this clock's now
    retry, _ = await runs_of(store, schedule_id)
    assert retry.retry_of == first.id and retry.schedule_run["attempt"] == 2 and retry.schedule_run["reason"] == "retry"
    await fail(store, retry)
    clock.now += dt.timedelta(seconds=30)
    await schedules.fire_due()
    assert len(await runs_of(store, schedule_id)) == 2  # max_retries = 1: no third attempt
    stats = (await schedules.get(schedule_id)).stats
    assert (stats.total_runs, stats.total_failures, stats.consecutive_failures) == (2, 2, 2)


async def test_a_run_waiting_for_its_retry_is_still_in_progress_for_max_concurrent(store: Store, clock: Clock) -> None:
    """A trigger between a failure and its retry is skipped: the run and its retry never overlap the next run."""
    clock.now = start = dt.datetime.now(UTC)
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules, every_s=60, max_concurrent=1, max_retries=1, retry_backoff_s=200.0)
    clock.now = start + dt.timedelta(seconds=60)
    await schedules.fire_due()
    (first,) = await runs_of(store, schedule_id)
    await fail(store, first)
    clock.now = start + dt.timedelta(seconds=120)
    await schedules.fire_due()  # the retry is due at about start + 200
    assert [run.id for run in await runs_of(store, schedule_id)] == [first.id]
    assert (await schedules.get(schedule_id)).stats.skipped_runs == 1
    clock.now = start + dt.timedelta(seconds=205)
    await schedules.fire_due()
    retry, _ = await runs_of(store, schedule_id)
    assert retry.retry_of == first.id


async def test_the_schedule_pauses_itself_after_consecutive_failures_and_resumes_afresh(
    store: Store, clock: Clock
) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules, pause_after_failures=2, max_concurrent=5)
    for index in (1, 2):
        clock.at(60 * index)
        await schedules.fire_due()
        await fail(store, (await runs_of(store, schedule_id))[0])
    paused = await schedules.get(schedule_id)
    assert paused.status == "paused" and paused.next_due_at is None and paused.paused_at is not None
    assert "2 consecutive failed runs" in (paused.paused_reason or "")
    assert paused.to_json(clock())["upcoming_runs_at"] == []
    clock.at(600)
    await schedules.fire_due()
    assert len(await runs_of(store, schedule_id)) == 2
    resumed = await schedules.resume(schedule_id)
    assert resumed.status == "active" and resumed.paused_reason is None and resumed.stats.consecutive_failures == 0
    assert resumed.next_due_at == format_time(T0 + dt.timedelta(seconds=660))  # from now on, on the grid


@pytest.mark.parametrize(("policy", "runs"), [("skip", 0), ("run_once", 1)])
async def test_triggers_that_fell_while_the_agent_was_down_follow_missed(
    store: Store, clock: Clock, policy: str, runs: int
) -> None:
    schedule_id = await create(schedules_on(store, clock), missed=policy)
    clock.at(60 * 30 + 10)  # down for half an hour: 30 triggers fell
    restarted = schedules_on(store, clock)
    await restarted.fire_due(after_downtime=True)
    found = await runs_of(store, schedule_id)
    assert len(found) == runs
    if runs:
        assert found[0].schedule_run["reason"] == "missed"
    schedule = await restarted.get(schedule_id)
    assert schedule.stats.missed_runs == 30
    assert schedule.next_due_at == format_time(T0 + dt.timedelta(seconds=60 * 31))


async def test_trigger_runs_now_even_when_paused_and_archive_stops_everything(store: Store, clock: Clock) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules)
    await schedules.pause(schedule_id)
    run, created = await schedules.trigger(schedule_id, idempotency_key="k", request_hash="h")
    again, created_again = await schedules.trigger(schedule_id, idempotency_key="k", request_hash="h")
    assert created and not created_again and again.id == run.id
    assert run.schedule_run["reason"] == "manual"
    await schedules.archive(schedule_id)
    archived = await schedules.get(schedule_id)
    assert archived.archived_at is not None and archived.next_due_at is None
    with pytest.raises(Conflict):
        await schedules.trigger(schedule_id)
    with pytest.raises(Conflict):
        await schedules.resume(schedule_id)
    with pytest.raises(NotFound):
        await schedules.get("sch_missing")


async def test_changing_the_timing_starts_it_afresh(store: Store, clock: Clock) -> None:
    schedules = schedules_on(store, clock)
    schedule_id = await create(schedules)
    clock.at(30)
    changed = await schedules.update(schedule_id, timing={"type": "cron", "expression": "0 13 * * *", "timezone": "UTC"},
                                     config={"max_retries": 3})
    assert changed.next_due_at == "2026-06-01T13:00:00.000Z"
    assert changed.config["max_retries"] == 3 and changed.config["max_concurrent"] == 1  # merged
    assert [format_time(t) for t in changed.upcoming(clock())][:2] == ["2026-06-01T13:00:00.000Z",
                                                                       "2026-06-02T13:00:00.000Z"]
