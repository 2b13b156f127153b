"""Carrying out one deployment: build, release and retention, and the one place it ends.

The worker only calls the deployment's target (agent.targets) and the release manager;
where the work runs is theirs to know. A failure of any kind ends the deployment `failed`
in one place; a kill or a shutdown is control flow (StopRequested, cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config import Config
from agent.errors import (
    AgentError,
    Conflict,
    ErrorType,
    Forbidden,
    NotFound,
    StopRequested,
    as_agent_error,
    error_object,
)
from agent.logs import DeploymentLog, LogPolicy
from agent.metrics import Metrics
from agent.models import FINAL_STATUSES, Deployment
from agent.policy import authorize_spec
from agent.releases import ReleaseManager
from agent.store import Store
from agent.targets.base import StopWork, Target, workspace_of
from agent.targets.resolver import Targets
from agent.workspace import remove_workspace

logger = structlog.get_logger("agent.engine")


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
        target = self.targets.for_deployment(deployment)
        log = self.open_log(deployment)
        started = time.monotonic()
        outcome: str = "failed"
        pruned = False
        try:
            log.agent("queue", f"deployment {deployment.id} of {deployment.application} started")
            fields: dict[str, Any] = {"pid": None, "stage": None}
            image = deployment.release_image
            if spec.build is not None:
                running.phase = "building"
                built = await target.build(deployment, log, _Watch(self.store, deployment.id, running))
                if built.image is not None:
                    await self.store.update(deployment.id, release_image=built.image)
                fields, image = {"exit_code": built.exit_code, "pid": None, "stage": None}, built.image
            if spec.run is not None:
                if spec.build is not None:
                    await self.set_status(deployment.id, "deploying", stage="release", pid=None)
                running.phase = "deploying"
                _raise_if_stopped(running)
                fields = {**fields, **await self.releases.deploy(deployment, target, log, image)}
                # Settle retention before reporting success, so a poller sees the final state.
                await self._prune_quietly(deployment, target, log, promoted=True, image=fields["release_image"])
                pruned = True
            outcome = "succeeded"
            log.agent("done", "deployment succeeded")
            await self.set_status(deployment.id, "succeeded", **fields)
        except (asyncio.CancelledError, StopRequested):
            outcome = await self._end_stopped(deployment, running, log)
        except Exception as exc:  # noqa: BLE001 - any surprise still ends the deployment, never leaves it hanging
            if not isinstance(exc, AgentError):
                logger.exception("deployment crashed")
            failure = as_agent_error(exc)
            log.agent("done", f"deployment failed: {failure.message}")
            await self.set_status(deployment.id, "failed", **failure.failure_fields())
        finally:
            if spec.run is not None and not pruned:
                await self._prune_quietly(deployment, target, log)
            if spec.build is not None:
                await target.finish_build(deployment, kept=spec.run is not None and outcome == "succeeded")
            log.close()
            if spec.build is not None:
                self.metrics.observe_build(time.monotonic() - started, outcome)
            await remove_workspace(workspace_of(self.config, deployment.id))

    async def _prune_quietly(
        self, deployment: Deployment, target: Target, log: DeploymentLog, *, promoted: bool = False,
        image: str | None = None,
    ) -> None:
        # Retention is housekeeping: its failure must not change how the deployment ended.
        try:
            await self.releases.prune(deployment, target, log, promoted=promoted, image=image)
        except AgentError as exc:
            logger.warning("pruning old releases failed", application=deployment.application, error=exc.message)

    async def _end_stopped(self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog) -> str:
        """A deployment that was asked to stop: cancelled on a kill, failed on a shutdown."""
        if running.stop_reason == "kill":
            log.agent("done", "deployment cancelled: killed on request")
            await self.end(deployment.id, "cancelled", "cancelled", "killed on request")
            return "cancelled"
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
        if running.phase == "deploying" and running.task is not None and not running.done.is_set():
            # A release being checked: cancelling the work removes it and restores the previous one.
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
        """Every status change of the engine passes here: store, metrics, daemon log."""
        deployment = await self.store.transition(deployment_id, status, **fields)
        if status in FINAL_STATUSES:
            self.metrics.count_finished(status)
        logger.info("status changed", deployment_id=deployment_id, status=status, error=fields.get("error"))
        return deployment

    async def end(self, deployment_id: str, status: str, error_type: ErrorType, message: str) -> Deployment:
        """Ends a deployment that did not fail on its own (killed, shut down, interrupted)."""
        return await self.set_status(deployment_id, status, error=error_object(error_type, message))

    def open_log(self, deployment: Deployment) -> DeploymentLog:
        """A writer of the deployment's log, held to its policy."""
        return DeploymentLog(
            Path(deployment.log_path), LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)
        )



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
        if self._running.stop_reason is not None and self._running.stop_work is not None:
            # Killed while the work was being started: stop it now.
            await self._running.stop_work()


def _raise_if_stopped(running: RunningDeployment) -> None:
    if running.stop_reason is not None:
        raise StopRequested()
