"""Schedules: the requests on them, and the loop that triggers them on the engine's event loop.

The loop sleeps until the earliest time a schedule or a retry falls due (one indexed query),
or until a change wakes it (a schedule created, changed or resumed, a run ended); a thousand
idle schedules cost one sleeping task. A trigger writes its run (an ordinary queued
deployment with `schedule_id`) and the schedule's next due time in one transaction, then
wakes the engine's queue. What a trigger and a finished run do to a schedule is in
agent.schedule_outcomes; the times are in agent.schedule_times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from typing import Any, Callable, Mapping

import structlog

from agent.config import Config
from agent.errors import AgentError, Conflict
from agent.models import Deployment, DeploymentFilter, DeploymentSpec, format_time, new_id, parse_time
from agent.schedule_models import Schedule, ScheduleFilter, timing_rule
from agent.schedule_specs import ScheduleRequest, parse_schedule_config, timing_dict
from agent.schedule_times import next_time
from agent.store import Store

logger = structlog.get_logger("agent.schedules")
# The loop looks at the clock at least this often: a wall clock set forward is noticed within it.
MAX_SLEEP_S = 60.0
# Schedules fired in one transaction (one fsync) at most; more due at once take several.
FIRE_BATCH = 1000

Clock = Callable[[], dt.datetime]
NewRecord = Callable[..., Deployment]


def wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Schedules:
    """Creates, changes and triggers schedules; their runs go into the engine's queue."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        new_record: NewRecord,
        wake_queue: Callable[[], None],
        clock: Clock = wall_clock,
    ) -> None:
        self.store = store
        self._config = config
        self._new_record = new_record
        self._wake_queue = wake_queue
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._specs: dict[tuple[str, str], DeploymentSpec] = {}
        store.on_schedule_event = self._wakeup.set

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the trigger loop; its first pass handles what fell due while the agent was down."""
        if self._task is None:
            self._task = asyncio.create_task(self._trigger_forever(), name="schedules")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def now(self) -> dt.datetime:
        """The time on this loop's clock (upcoming_runs_at are the ones after it)."""
        return self._clock()

    # --- requests --------------------------------------------------------------------------

    async def create(
        self, request: ScheduleRequest, template: Mapping[str, Any], *, idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[Schedule, bool]:
        """Stores a new, active schedule; `template` is its validated deployment request (without application)."""
        now = self._clock()
        stamp = format_time(now)
        timing = timing_dict(request.schedule)
        schedule = Schedule(
            id=new_id("sch_"),
            name=request.name or request.application,
            application=request.application,
            timing=timing,
            template=dict(template),
            config=dataclasses.asdict(request.config),
            metadata=dict(request.metadata),
            status="active",
            created_at=stamp,
            updated_at=stamp,
            anchor_at=stamp,
            next_due_at=_due_text(timing, stamp, now),
        )
        stored, created = await self.store.create_schedule(schedule, idempotency_key, request_hash)
        if created:
            logger.info("schedule created", schedule_id=stored.id, application=stored.application,
                        next_due_at=stored.next_due_at)
            self._wakeup.set()
        return stored, created

    async def get(self, schedule_id: str) -> Schedule:
        return await self.store.get_schedule(schedule_id)

    async def list(self, query: ScheduleFilter) -> tuple[list[Schedule], int | None]:
        return await self.store.list_schedules(query)

    async def update(
        self,
        schedule_id: str,
        *,
        name: str | None = None,
        timing: Mapping[str, Any] | None = None,
        template: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Schedule:
        """Replaces what is given (config members are merged); a new `schedule` starts its timing afresh now."""
        current = await self.store.get_schedule(schedule_id)
        merged = None if config is None else dataclasses.asdict(parse_schedule_config(current.config, config))
        now = self._clock()
        stamp = format_time(now)

        def change(schedule: Schedule) -> Schedule:
            _refuse_if_archived(schedule, "changed")
            changed = dataclasses.replace(
                schedule,
                name=schedule.name if name is None else name,
                template=schedule.template if template is None else dict(template),
                config=schedule.config if merged is None else merged,
                metadata=schedule.metadata if metadata is None else dict(metadata),
                updated_at=stamp,
            )
            if timing is not None:
                changed = dataclasses.replace(changed, timing=dict(timing), anchor_at=stamp)
                if changed.triggers:
                    changed = dataclasses.replace(changed, next_due_at=_due_text(changed.timing, stamp, now))
            return changed

        return await self._change(schedule_id, change, "schedule changed")

    async def pause(self, schedule_id: str) -> Schedule:
        """Stops its triggers (runs in progress go on); pausing a paused schedule changes nothing."""
        stamp = format_time(self._clock())

        def change(schedule: Schedule) -> Schedule:
            _refuse_if_archived(schedule, "paused")
            if schedule.status == "paused":
                return schedule
            return dataclasses.replace(schedule, status="paused", paused_reason=f"paused on request at {stamp}",
                                       paused_at=stamp, next_due_at=None, updated_at=stamp)

        return await self._change(schedule_id, change, "schedule paused")

    async def resume(self, schedule_id: str) -> Schedule:
        """Makes it trigger again from now on (what fell while it was paused is not run); failures count afresh."""
        now = self._clock()
        stamp = format_time(now)

        def change(schedule: Schedule) -> Schedule:
            _refuse_if_archived(schedule, "resumed")
            if schedule.status == "active":
                return schedule
            return dataclasses.replace(
                schedule, status="active", paused_reason=None, paused_at=None, updated_at=stamp,
                next_due_at=_due_text(schedule.timing, schedule.anchor_at, now),
                stats=dataclasses.replace(schedule.stats, consecutive_failures=0),
            )

        return await self._change(schedule_id, change, "schedule resumed")

    async def archive(self, schedule_id: str) -> Schedule:
        """No more runs (runs in progress go on); it and its runs are kept. Archiving again changes nothing."""
        stamp = format_time(self._clock())

        def change(schedule: Schedule) -> Schedule:
            if schedule.is_archived:
                return schedule
            return dataclasses.replace(schedule, archived_at=stamp, next_due_at=None, updated_at=stamp)

        return await self._change(schedule_id, change, "schedule archived")

    async def trigger(
        self, schedule_id: str, *, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> tuple[Deployment, bool]:
        """Starts a run now, whatever its timing, status and runs in progress (an operator's explicit request)."""
        run, created = await self.store.trigger_schedule(
            schedule_id, self._make_run, idempotency_key, request_hash, self._config().agent.max_queued
        )
        if created:
            logger.info("schedule triggered on request", schedule_id=schedule_id, deployment_id=run.id)
            self._wake_queue()
        return run, created

    async def runs(self, schedule_id: str, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        """Its runs, newest first: the deployments with its schedule_id."""
        await self.store.get_schedule(schedule_id)
        return await self.store.list(dataclasses.replace(query, schedule_id=schedule_id))

    async def _change(self, schedule_id: str, change: Callable[[Schedule], Schedule], event: str) -> Schedule:
        changed = await self.store.change_schedule(schedule_id, change)
        logger.info(event, schedule_id=schedule_id, status=changed.status, next_due_at=changed.next_due_at)
        self._wakeup.set()
        return changed

    def _spec_of(self, schedule: Schedule) -> DeploymentSpec:
        """The spec of its runs, one object per version of the schedule (its stored text is then made once)."""
        key = (schedule.id, schedule.updated_at)
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) >= 4096:
                self._specs.clear()
            spec = self._specs[key] = DeploymentSpec.from_dict({**schedule.template, "application": schedule.application})
        return spec

    # --- triggering ------------------------------------------------------------------------

    async def _trigger_forever(self) -> None:
        after_downtime = True
        while True:
            try:
                await self.fire_due(after_downtime=after_downtime)
                after_downtime = False
                delay = await self._until_next_due()
            except AgentError as exc:  # a full disk, say: nothing was written, the trigger is still due
                logger.warning("triggering schedules failed; trying again in a second", error=exc.message)
                delay = 1.0
            except Exception:  # noqa: BLE001 - the loop must outlive a bad pass
                logger.exception("triggering schedules failed; trying again in a second")
                delay = 1.0
            if delay > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)

    async def fire_due(self, *, after_downtime: bool = False) -> None:
        """Fires what is due now (with `after_downtime`, what fell before now follows `missed`), and due retries."""
        now = self._clock()
        max_queued = self._config().agent.max_queued
        while True:
            runs = await self.store.fire_due_schedules(
                now, self._make_run, after_downtime=after_downtime, limit=FIRE_BATCH, max_queued=max_queued
            )
            if runs:
                logger.info("schedules triggered", runs=len(runs))
                self._wake_queue()
            if len(runs) < FIRE_BATCH:
                break
        retries = await self.store.fire_due_retries(now, self._make_run, FIRE_BATCH)
        if retries:
            logger.info("failed runs retried", runs=len(retries))
            self._wake_queue()

    async def _until_next_due(self) -> float:
        due = await self.store.next_schedule_due()
        if due is None:
            return MAX_SLEEP_S
        return min(MAX_SLEEP_S, (parse_time(due) - self._clock()).total_seconds())

    def _make_run(
        self, schedule: Schedule, reason: str, scheduled_for: dt.datetime | None, attempt: int, retry_of: str | None
    ) -> Deployment:
        """The queued deployment of one run (on the store thread, inside the trigger's transaction)."""
        spec = self._spec_of(schedule)
        return self._new_record(
            spec,
            schedule_id=schedule.id,
            retry_of=retry_of,
            schedule_run={
                "reason": reason,
                "attempt": attempt,
                "scheduled_for": None if scheduled_for is None else format_time(scheduled_for),
                "timeout_s": schedule.config.get("timeout_s"),
            },
        )


def _due_text(timing: Mapping[str, Any], anchor_at: str, now: dt.datetime) -> str | None:
    following = next_time(timing_rule(timing, parse_time(anchor_at)), now)
    return None if following is None else format_time(following)


def _refuse_if_archived(schedule: Schedule, what: str) -> None:
    if schedule.is_archived:
        raise Conflict(f"schedule {schedule.id} is archived ({schedule.archived_at}); it cannot be {what}",
                       code="archived")
