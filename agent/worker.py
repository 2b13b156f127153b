"""Carrying out one deployment: build, release and retention, and the one place it ends.

The worker only calls the deployment's target (agent.targets) and the release manager;
where the work runs is theirs to know. A failure of any kind ends the deployment `failed`
in one place; a kill or a shutdown is control flow (StopRequested, cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config import Config
from agent.disk import free_bytes, log_write_failure
from agent.errors import (
    AgentError,
    Conflict,
    DiskFull,
    ErrorType,
    Forbidden,
    NotFound,
    StopRequested,
    WorkLost,
    as_agent_error,
    error_object,
)
from agent.logs import DeploymentLog, LogPolicy
from agent.metrics import Metrics
from agent.models import FINAL_STATUSES, IN_PROGRESS_STATUSES, Deployment, parse_time
from agent.policy import authorize_spec
from agent.releases import ReleaseManager
from agent.store import Store
from agent.targets.base import Built, StopWork, Target, workspace_of
from agent.targets.resolver import Targets
from agent.workspace import remove_workspace

logger = structlog.get_logger("agent.engine")
# How often a deployment kept queued by a full disk looks for room again.
DISK_RETRY_S = 1.0


@dataclass
class RunningDeployment:
    """A deployment a worker is carrying out right now."""

    deployment_id: str
    application: str
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "kill" or "shutdown" once someone asked it to stop
    phase: str = "queued"
    # Stops the build's work wherever it runs (containers here or there, a remote process group).
    stop_work: StopWork | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the build's work runs and is known (started, or found again after a restart).
    work_known: asyncio.Event = field(default_factory=asyncio.Event)
    # A schedule's timeout_s, once it stopped the run (and the task doing so).
    timeout_s: float = 0.0
    stopping: asyncio.Task[None] | None = None


class Worker:
    """Carries out deployments the engine scheduled, and stops them when asked."""

    def __init__(
        self, config: Config, store: Store, targets: Targets, releases: ReleaseManager, metrics: Metrics
    ) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        self.releases = releases
        self.metrics = metrics
        # The open log writer of each deployment (set_status asks it whether its writes failed).
        self._logs: weakref.WeakValueDictionary[str, DeploymentLog] = weakref.WeakValueDictionary()

    async def carry_out(self, deployment: Deployment, running: RunningDeployment) -> None:
        """Builds, releases and prunes; ends the deployment with its final status, whatever happens."""
        spec = deployment.spec
        try:
            # The config in force now decides, not the one the request was accepted under.
            await asyncio.to_thread(authorize_spec, spec, self.config, None)
        except Forbidden as refusal:
            with self.open_log(deployment) as refused_log:
                refused_log.agent("done", f"deployment refused by the agent's policy: {refusal.message}")
            with contextlib.suppress(Conflict, NotFound):
                await self.set_status(deployment.id, "failed", **refusal.failure_fields())
            return
        first = "building" if spec.build else ("deploying" if spec.run else "succeeded")
        try:
            stage = "source" if spec.build else ("release" if spec.run else None)
            await self.set_status(deployment.id, first, stage=stage)
        except (Conflict, NotFound):
            # Killed or deleted between the scheduler's read and now: nothing to run.
            return
        if first == "succeeded":
            return
        await self._carry_on(deployment, running, resumed=False)

    async def resume(self, deployment: Deployment, running: RunningDeployment) -> None:
        """After a restart: takes an interrupted build back and carries the deployment on from there, as carry_out does.

        A build whose work vanished while the agent was away ends `failed` with `lost`. A rollout
        that goes on by itself (a swarm update) is watched to its end instead.
        """
        if deployment.status == "deploying":
            await self._watch_rollout(deployment, running)
            return
        await self._carry_on(deployment, running, resumed=True)

    async def _watch_rollout(self, deployment: Deployment, running: RunningDeployment) -> None:
        target = self.targets.for_deployment(deployment)
        log = self.open_log(deployment)
        running.phase = "deploying"
        running.work_known.set()
        try:
            fields = await self.releases.resume_rollout(deployment, target, log)
            log.agent("done", "deployment succeeded")
            await self.set_status(deployment.id, "succeeded", **fields)
        except (asyncio.CancelledError, StopRequested):
            await self._end_stopped(deployment, running, log)
        except Exception as exc:  # noqa: BLE001 - any surprise still ends the deployment
            await self._end_failed(deployment, running, log, exc)
        finally:
            log.close()

    async def _carry_on(self, deployment: Deployment, running: RunningDeployment, *, resumed: bool) -> None:
        """Build (or, `resumed`, the interrupted build taken back), release, retention, final status."""
        spec = deployment.spec
        target = self.targets.for_deployment(deployment)
        log = self.open_log(deployment)
        started = time.monotonic()
        outcome: str = "failed"
        pruned = False
        deadline = self._enforce_run_timeout(deployment, running)
        try:
            if not resumed:
                log.agent("queue", f"deployment {deployment.id} of {deployment.application} started")
            fields: dict[str, Any] = {"pid": None, "stage": None}
            image = deployment.release_image
            if spec.build is not None:
                running.phase = "building"
                watch = _Watch(self.store, deployment.id, running)
                if resumed:
                    built = await self._take_back(deployment, target, log, watch)
                else:
                    built = await target.build(deployment, log, watch)
                if built.image is not None:
                    await self.store.update(deployment.id, release_image=built.image)
                fields, image = {"exit_code": built.exit_code, "pid": None, "stage": None}, built.image
            if spec.run is not None:
                if spec.build is not None:
                    await self.set_status(deployment.id, "deploying", stage="release", pid=None)
                running.phase = "deploying"
                _raise_if_stopped(running)
                fields = {**fields, **await self.releases.deploy(deployment, target, log, image)}
                # In service: a kill from here on is too late (the release manager's rule), so
                # stopping must not cancel the last steps either.
                running.phase = "settling"
                # Settle retention before reporting success, so a poller sees the final state.
                await self._prune_quietly(deployment, target, log, promoted=True, image=fields["release_image"])
                pruned = True
            log.agent("done", "deployment succeeded")
            await self.set_status(deployment.id, "succeeded", **fields)
            outcome = "succeeded"  # only once recorded: a full disk may still refuse it
        except (asyncio.CancelledError, StopRequested):
            outcome = await self._end_stopped(deployment, running, log)
        except Exception as exc:  # noqa: BLE001 - any surprise still ends the deployment, never leaves it hanging
            outcome = await self._end_failed(deployment, running, log, exc)
        finally:
            if deadline is not None:
                deadline.cancel()
            if spec.run is not None and not pruned:
                await self._prune_quietly(deployment, target, log)
            if spec.build is not None:
                await target.finish_build(deployment, kept=spec.run is not None and outcome == "succeeded")
            log.close()
            if spec.build is not None:
                self.metrics.observe_build(time.monotonic() - started, outcome)
            await remove_workspace(workspace_of(self.config, deployment.id))

    def _enforce_run_timeout(self, deployment: Deployment, running: RunningDeployment) -> asyncio.TimerHandle | None:
        """A schedule's `timeout_s`: the run is stopped and fails once it has run that long (counted from
        its real start, across restarts)."""
        timeout_s = (deployment.schedule_run or {}).get("timeout_s")
        if not timeout_s:
            return None
        ran_s = 0.0
        if deployment.started_at is not None:
            ran_s = max(0.0, time.time() - parse_time(deployment.started_at).timestamp())
        loop = asyncio.get_running_loop()

        def time_out() -> None:
            running.timeout_s = float(timeout_s)
            running.stopping = loop.create_task(self.stop(running, "timeout"), name=f"timeout-{deployment.id}")

        return loop.call_later(max(0.0, float(timeout_s) - ran_s), time_out)

    async def _take_back(self, deployment: Deployment, target: Target, log: DeploymentLog, watch: _Watch) -> Built:
        """The interrupted build taken back; started afresh if its work had not started; WorkLost if it vanished."""
        built = await target.reattach_build(deployment, log, watch)
        if built is not None:
            return built
        if deployment.container_id is not None or deployment.pid is not None:
            raise WorkLost("the build container vanished while the agent was away")
        # Stopped while the source was prepared: nothing ran yet, so the build starts over.
        log.agent("recovery", "the agent stopped before this build started; starting it now")
        await remove_workspace(workspace_of(self.config, deployment.id))
        return await target.build(deployment, log, watch)

    async def _prune_quietly(
        self, deployment: Deployment, target: Target, log: DeploymentLog, *, promoted: bool = False,
        image: str | None = None,
    ) -> None:
        # Retention is housekeeping: its failure must not change how the deployment ended.
        try:
            await self.releases.prune(deployment, target, log, promoted=promoted, image=image)
        except AgentError as exc:
            logger.warning("pruning old releases failed", application=deployment.application, error=exc.message)

    async def _end_failed(
        self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog, exc: Exception
    ) -> str:
        """A deployment whose work raised: `failed` saying why, unless a stop was asked meanwhile."""
        if running.stop_reason is not None:
            # Asked to stop, its work then failed (e.g. "container is marked for removal"): the stop's doing.
            logger.info("the work failed after a stop was asked", error=as_agent_error(exc).message)
            return await self._end_stopped(deployment, running, log)
        if not isinstance(exc, AgentError):
            logger.exception("deployment crashed")
        failure = as_agent_error(exc)
        log.agent("done", f"deployment failed: {failure.message}")
        await self.set_status(deployment.id, "failed", **failure.failure_fields())
        return "failed"

    async def _end_stopped(self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog) -> str:
        """A deployment that was asked to stop: cancelled on a kill, failed on a shutdown.

        One the agent detached from keeps its status and gets no "done" line: it goes on
        without the agent, and the next start re-adopts it.
        """
        if running.stop_reason == "detach":
            return "detached"
        if running.stop_reason == "kill":
            log.agent("done", "deployment cancelled: killed on request")
            await self.end(deployment.id, "cancelled", "cancelled", "killed on request")
            return "cancelled"
        if running.stop_reason == "timeout":
            message = f"the run passed its schedule's timeout_s ({running.timeout_s:g} s) and was stopped"
            log.agent("done", f"deployment failed: {message}")
            await self.end(deployment.id, "failed", "timeout", message)
            return "failed"
        message = "the agent shut down before this deployment finished"
        log.agent("done", f"deployment failed: {message}")
        await self.end(deployment.id, "failed", "agent_shutdown", message)
        return "failed"

    async def stop(self, running: RunningDeployment, reason: str) -> None:
        """Stops a running deployment's work (SIGTERM, grace, SIGKILL) and waits for its task to end."""
        if running.stop_reason is None:
            running.stop_reason = reason
        logger.info("stopping deployment", deployment_id=running.deployment_id, reason=reason)
        if running.stop_work is not None:
            try:
                await running.stop_work()
            except AgentError as exc:
                logger.warning("stopping the build's work failed", error=exc.message)
        if running.phase in ("queued", "deploying") and running.task is not None and not running.done.is_set():
            # Waiting for disk room (nothing of it runs yet), or a release being checked: cancelling
            # the work is the stop (a release's undo removes it and restores the previous one).
            running.task.cancel()
            await running.done.wait()
        if running.task is not None and not running.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(running.done.wait()), timeout=2)
            if not running.done.is_set():
                # Still busy outside a container (copying, cloning): cancel the work itself.
                running.task.cancel()
                await running.done.wait()

    async def set_status(self, deployment_id: str, status: str, **fields: Any) -> Deployment:
        """Every status change of the engine passes here: store, metrics, daemon log.

        A full disk loses nothing: a deployment not started yet stays queued until state_dir has
        room, and one whose open log could not be written goes no further than `failed` disk_full
        (DiskFull instead of a release or success). A final status the store cannot write yet, it
        writes once there is room.
        """
        log = self._logs.get(deployment_id)
        error = log.write_error if log is not None and not log.closed else None
        if error is not None and status in ("deploying", "succeeded", "failed"):
            failure = log_write_failure(error)
            if status != "failed":
                raise failure
            if (fields.get("error") or {}).get("type") != "disk_full":
                fields = {**fields, **failure.failure_fields()}
        if status in IN_PROGRESS_STATUSES:
            deployment = await self._leave_queue_when_room(deployment_id, status, fields)
        else:
            deployment = await self.store.transition(deployment_id, status, **fields)
        if status in FINAL_STATUSES:
            self.metrics.count_finished(status)
            if deployment.spec.run is not None and (status == "succeeded" or deployment.stage in ("release", "health")):
                self.metrics.count_release(status)
            if deployment.smoke_test is not None:  # set once its release's health check ran
                self.metrics.count_health_check(bool(deployment.smoke_test.get("passed")))
        logger.info("status changed", deployment_id=deployment_id, status=status, error=fields.get("error"))
        return deployment

    async def end(self, deployment_id: str, status: str, error_type: ErrorType, message: str) -> Deployment:
        """Ends a deployment that did not fail on its own (killed, shut down, interrupted)."""
        return await self.set_status(deployment_id, status, error=error_object(error_type, message))

    def open_log(self, deployment: Deployment) -> DeploymentLog:
        """A writer of the deployment's log, held to its policy; its failed writes fail the deployment (set_status)."""
        log = DeploymentLog(
            Path(deployment.log_path), LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)
        )
        self._logs[deployment.id] = log
        return log

    async def _leave_queue_when_room(self, deployment_id: str, status: str, fields: dict[str, Any]) -> Deployment:
        """Moves to an in-progress status; out of `queued` only while state_dir has room, else it waits queued."""
        waiting = False
        while True:
            queued = (await self.store.get(deployment_id)).status == "queued"
            if not (queued and await asyncio.to_thread(self._disk_low)):
                try:
                    return await self.store.transition(deployment_id, status, **fields)
                except DiskFull:
                    if not queued:
                        raise
            if not waiting:
                logger.warning("the disk is full: the deployment stays queued until there is room")
                waiting = True
            await asyncio.sleep(DISK_RETRY_S)

    def _disk_low(self) -> bool:
        minimum = self.config.agent.min_free_bytes
        free = free_bytes(self.config.agent.state_dir) if minimum else None
        return free is not None and free < minimum



class _Watch:
    """The engine's side of a running build: its stage, where its work runs, and how to stop it."""

    def __init__(self, store: Store, deployment_id: str, running: RunningDeployment) -> None:
        self._store = store
        self._deployment_id = deployment_id
        self._running = running

    def raise_if_stopped(self) -> None:
        _raise_if_stopped(self._running)

    async def building(self) -> None:
        self.raise_if_stopped()
        await self._store.update(self._deployment_id, stage="build")

    def stop_with(self, stop: StopWork) -> None:
        self._running.stop_work = stop

    async def started(
        self, *, container_id: str | None = None, pid: int | None = None, pid_started_at: float | None = None
    ) -> None:
        await self._store.update(
            self._deployment_id, container_id=container_id, pid=pid, pid_started_at=pid_started_at
        )
        self._running.work_known.set()
        if self._running.stop_reason is not None and self._running.stop_work is not None:
            # Killed while the work was being started: stop it now.
            await self._running.stop_work()


def _raise_if_stopped(running: RunningDeployment) -> None:
    if running.stop_reason is not None:
        raise StopRequested()
