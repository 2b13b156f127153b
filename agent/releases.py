"""Releases: start a deployment's release, check it, promote it, and keep the old one until then.

The previous release of an application is stopped only after the new one
passes its health check. With a fixed host port the two cannot overlap: the old
one is stopped first and started again if the new one fails. Where a release runs
is its target's business (agent.targets); this module only calls it.

Kill and crash follow one rule, the switch (the application pointing at the new
deployment) plus draining being the line. A kill before the previous release has
drained undoes everything: the application points at the previous deployment again
and the new release is removed (`cancelled`). After it only cleanup is left, which
a kill does not interrupt (the deployment succeeds). A crash before the switch
removes the new release after the restart (`failed`, `agent_restarted`); a crash
after it keeps the new release running untouched, finishes the cleanup, and the
deployment `succeeded`. That recovery after a restart is agent.release_recovery's,
retention agent.retention's; both use this module's steps and per-application lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable

import structlog

from agent.config import Config
from agent.disk import log_write_failure
from agent.errors import AgentError, Conflict, NotFound, ReleaseUnhealthy
from agent.health import HealthTarget, check_release
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment
from agent.runtimes.base import ReleaseHandle
from agent.release_recovery import Reconciled, ReleaseRecovery
from agent.retention import Retention
from agent.store import Application, Store
from agent.targets.base import Target
from agent.targets.resolver import Targets

logger = structlog.get_logger("agent.releases")

STAGE = "release"
LAST_OUTPUT_LINES = 10


@dataclass(frozen=True)
class _Release:
    """A deployment and the release it started."""

    deployment: Deployment
    handle: ReleaseHandle
    running: bool = True  # False: the application was stopped


class ReleaseManager:
    """Puts releases into service and takes them out, one application at a time."""

    def __init__(self, config: Config, store: Store, targets: Targets) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        # One lock per application, kept only while someone holds or waits for it.
        self._locks: dict[str, _HeldLock] = {}
        self.retention = Retention(config, store, targets)
        self.recovery = ReleaseRecovery(self)

    @contextlib.asynccontextmanager
    async def lock(self, application: str) -> AsyncIterator[None]:
        """Holds the application's lock; it is dropped again once nobody holds or waits for it."""
        held = self._locks.get(application)
        if held is None:
            held = self._locks[application] = _HeldLock()
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if held.users == 0 and self._locks.get(application) is held:
                del self._locks[application]

    def is_locked(self, application: str) -> bool:
        held = self._locks.get(application)
        return held is not None and held.lock.locked()

    def log_policy(self, deployment: Deployment) -> LogPolicy:
        """The deployment's log policy, for writers (and release followers) opened here."""
        return LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)

    # --- deploying -------------------------------------------------------------------------

    async def deploy(
        self, deployment: Deployment, target: Target, log: DeploymentLog, image: str | None
    ) -> dict[str, Any]:
        """Starts, checks and promotes the release on `target`; returns the deployment's fields on success.

        A kill (this task cancelled) is honoured until the previous release has drained: the new
        release is removed, the application points at the previous one again, which keeps serving
        (or starts again when it made room for a fixed port), and the cancellation goes on. After
        that point only cleanup remains, and it is finished whatever arrives: the previous release
        (running or stopped) is removed, retention is settled, and the deployment succeeds; a kill
        then is too late, like one after the final status.
        """
        run = deployment.spec.run
        assert run is not None
        async with self.lock(deployment.application):
            spec = await target.prepare_release(deployment, log, image)
            previous = await self._current_release(deployment.application)
            fixed_port = target.fixed_port(run)
            holds_port = previous is not None and previous.running and fixed_port in previous.handle.ports.values()
            # Only a serving previous release drains; the switch to the new one is undone with it.
            serving = previous if previous is not None and previous.running and not holds_port else None
            handle: ReleaseHandle | None = None
            switched = False
            try:
                if holds_port:
                    assert previous is not None
                    log.agent(
                        STAGE, f"stopping the previous release {previous.deployment.id} to free host port {fixed_port}"
                    )
                    if await _to_the_end(self.targets.for_deployment(previous.deployment).stop_release(previous.handle)):
                        raise asyncio.CancelledError()  # killed meanwhile: the undo starts it again
                handle = await target.start_release(spec, log)
                url = target.url_of(handle, spec.ports[0] if spec.ports else None, spec.bind)
                await self.store.update(
                    deployment.id, release=handle.to_dict(), pid=handle.pid, pid_started_at=handle.pid_started_at,
                    container_id=handle.container_id, url=url, stage="health",
                )
                log.agent(STAGE, f"release started{f' at {url}' if url else ''}")
                started = handle
                if target.checks_health_itself:
                    smoke_test = await target.converge(deployment, handle, log)
                else:
                    smoke_test = await check_release(
                        deployment.spec.health_check,
                        await self._health_target(target, handle, deployment),
                        lambda: target.release_state(started),
                        log,
                    )
                if log.write_error is not None:
                    # The log could not be written (a full disk): nothing goes into service unrecorded.
                    raise log_write_failure(log.write_error)
                await target.promote(handle)
                # Kept now: a restart that finds the release already in service ends it with these.
                await self.store.update(deployment.id, smoke_test=smoke_test, release_image=spec.image or image)
                if serving is not None:
                    # Switch first, then drain: clients that looked up the old URL a moment ago still get answers.
                    switched = True
                    await self._switch(deployment, log)
                    await self._drain(serving, log)
            except BaseException as exc:
                try:
                    # Read the dying release's last output before removing it.
                    failure = await self._explain(exc, target, handle, log) if isinstance(exc, ReleaseUnhealthy) else None
                finally:
                    await _to_the_end(self._undo(deployment, target, handle, previous, holds_port, switched, log))
                if failure is not None:
                    raise failure from None
                raise
            await self._finish_uninterrupted(
                self._finish(deployment, target, previous, switched=switched, log=log, image=spec.image or image)
            )
            return {
                "pid": handle.pid, "pid_started_at": handle.pid_started_at, "container_id": handle.container_id,
                "url": url, "smoke_test": smoke_test, "release": handle.to_dict(), "release_image": spec.image or image,
                "stage": None,
            }

    async def resume_rollout(self, deployment: Deployment, target: Target, log: DeploymentLog) -> dict[str, Any]:
        """After a restart: watches a rollout its orchestrator carries on by itself (a swarm update) to its
        end, then switches and finishes as `deploy` does; a failure or a kill meanwhile is undone as there."""
        assert deployment.release is not None
        handle = ReleaseHandle.from_dict(deployment.release)
        async with self.lock(deployment.application):
            previous = await self._current_release(deployment.application)
            serving = previous if previous is not None and previous.running else None
            log.agent("recovery", "the agent restarted during the rollout; watching it to its end")
            switched = False
            try:
                smoke_test = await target.converge(deployment, handle, log)
                await target.promote(handle)
                await self.store.update(deployment.id, smoke_test=smoke_test)
                if serving is not None:
                    switched = True
                    await self._switch(deployment, log)
                    await self._drain(serving, log)
            except BaseException:
                await _to_the_end(self._undo(deployment, target, handle, previous, False, switched, log))
                raise
            image = deployment.release_image
            await self._finish_uninterrupted(
                self._finish(deployment, target, previous, switched=switched, log=log, image=image)
            )
            now = await self.store.get(deployment.id)
            return {"pid": None, "container_id": None, "url": now.url, "smoke_test": smoke_test,
                    "release": handle.to_dict(), "release_image": image, "stage": None}

    async def _finish_uninterrupted(self, work: Awaitable[None]) -> None:
        """Finishes `work` even when this task is cancelled meanwhile; such a cancellation is then spent."""
        cancels = await _to_the_end(work)
        task = asyncio.current_task()
        for _ in range(cancels):
            if task is not None:
                task.uncancel()
        if cancels:
            logger.info("a stop request arrived after the release was put into service; it was finished instead")

    async def _switch(self, deployment: Deployment, log: DeploymentLog) -> None:
        await self.store.set_application(deployment.application, deployment.id, "running")
        log.agent(STAGE, "the new release is in service")

    async def _drain(self, previous: _Release, log: DeploymentLog) -> None:
        if self.config.releases.drain_s:
            log.agent(STAGE, f"draining the previous release {previous.deployment.id} for {self.config.releases.drain_s:g}s")
            await asyncio.sleep(self.config.releases.drain_s)

    async def _finish(
        self, deployment: Deployment, target: Target, previous: _Release | None, *, switched: bool,
        log: DeploymentLog, image: str | None,
    ) -> None:
        """What remains once nothing is undone: the switch, removing the previous release, retention."""
        if not switched:
            await self._switch(deployment, log)
        if previous is not None:
            try:
                await self.remove_replaced(previous.deployment, previous.handle, log)
            except AgentError as exc:
                # The new release serves: failing now would misreport that. A restart's sweep retries.
                log.agent(STAGE, f"could not remove the previous release {previous.deployment.id}: {exc.message}")
                logger.warning("removing the previous release failed", deployment_id=previous.deployment.id,
                               error=exc.message)
        await self.retention.settle(deployment, target, log, image)

    async def remove_replaced(self, old: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> None:
        """Removes the release of `old`, a deployment the application no longer points at."""
        log.agent(STAGE, f"removing the previous release {old.id}")
        await self.targets.for_deployment(old).remove_release(handle)
        await self.store.update(old.id, pid=None)

    async def _undo(
        self,
        deployment: Deployment,
        target: Target,
        handle: ReleaseHandle | None,
        previous: _Release | None,
        stopped_previous: bool,
        switched: bool,
        log: DeploymentLog,
    ) -> None:
        """Points the application back at the previous release, removes the new one, brings back what it displaced."""
        if switched and previous is not None:
            await self.store.set_application(deployment.application, previous.deployment.id, "running")
        if handle is not None:
            await target.remove_release(handle)
            await self.store.update(deployment.id, pid=None, stage=None)
            log.agent(STAGE, "the new release was stopped and removed")
        if previous is not None and stopped_previous:
            log.agent(STAGE, f"starting the previous release {previous.deployment.id} again")
            await self.resume(previous.deployment, previous.handle)
        elif previous is not None and previous.running:
            log.agent(STAGE, f"the previous release {previous.deployment.id} keeps serving")

    async def _health_target(
        self, target: Target, handle: ReleaseHandle, deployment: Deployment
    ) -> HealthTarget | None:
        health = deployment.spec.health_check
        run = deployment.spec.run
        if health is None or run is None:
            return None
        port = health.port or run.port or (next(iter(handle.ports)) if handle.ports else None)
        if port is None:
            return None
        return await target.health_target(handle, port, run)

    async def _explain(
        self, failure: ReleaseUnhealthy, target: Target, handle: ReleaseHandle | None, log: DeploymentLog
    ) -> ReleaseUnhealthy:
        """The failure with the dead release's last output, masked like the deployment's log."""
        message = failure.message
        if failure.died and handle is not None:
            lines = await target.last_output(handle, LAST_OUTPUT_LINES)
            if lines:
                message += "; last output: " + " | ".join(line.strip() for line in lines[-5:])
        # The last output comes from the runtime's own record, unmasked.
        return failure.with_message(log.mask(message))

    async def _current_release(self, application: str) -> _Release | None:
        """The application's current release, running or stopped (a stopped one is replaced too)."""
        try:
            app = await self.store.get_application(application)
            current = await self.store.get(app.deployment_id)
        except NotFound:
            return None
        if current.release is None:
            return None
        return _Release(current, ReleaseHandle.from_dict(current.release), running=app.state == "running")

    # --- applications ----------------------------------------------------------------------

    async def resume(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseHandle:
        """Starts a stopped release of `deployment` again and records its new handle."""
        target = self.targets.for_deployment(deployment)
        with DeploymentLog(Path(deployment.log_path), self.log_policy(deployment)) as log:
            new_handle = await target.resume_release(deployment, handle, log)
        await target.promote(new_handle)
        await self.store.update(
            deployment.id, release=new_handle.to_dict(), pid=new_handle.pid, pid_started_at=new_handle.pid_started_at,
            container_id=new_handle.container_id,
            url=target.url_of(new_handle, next(iter(handle.ports), None), _bind_of(deployment)),
        )
        return new_handle

    async def stop_application(self, name: str) -> Application:
        # NotFound first: an unknown name must leave no state behind.
        await self.store.get_application(name)
        if self.is_locked(name):
            raise Conflict(f"a deployment of {name} is being put into service; try again when it is done")
        async with self.lock(name):
            app = await self.store.get_application(name)
            if app.state != "running":
                raise Conflict(f"application {name} is already stopped", code="already_stopped")
            deployment = await self.store.get(app.deployment_id)
            if deployment.release is not None:
                handle = ReleaseHandle.from_dict(deployment.release)
                await self.targets.for_deployment(deployment).stop_release(handle)
            await self.store.update(deployment.id, pid=None)
            logger.info("application stopped", application=name, deployment_id=deployment.id)
            return await self.store.set_application(name, deployment.id, "stopped")

    async def start_application(self, name: str) -> Application:
        await self.store.get_application(name)
        if self.is_locked(name):
            raise Conflict(f"a deployment of {name} is being put into service; try again when it is done")
        async with self.lock(name):
            app = await self.store.get_application(name)
            if app.state == "running":
                raise Conflict(f"application {name} is already running", code="already_running")
            deployment = await self.store.get(app.deployment_id)
            if deployment.release is None:
                raise Conflict(f"application {name} has no release to start")
            await self.resume(deployment, ReleaseHandle.from_dict(deployment.release))
            logger.info("application started", application=name, deployment_id=deployment.id)
            return await self.store.set_application(name, deployment.id, "running")

    # --- rollback and retention ------------------------------------------------------------

    async def check_rollback_target(self, target: Deployment) -> None:
        """Raises Conflict unless `target` left a release that can be brought back."""
        if target.status != "succeeded" or target.spec.run is None or target.release is None:
            raise Conflict(
                f"deployment {target.id} never put a release into service ({target.status}); nothing to roll back to",
                code="no_release",
            )
        if not await self.targets.for_deployment(target).can_bring_back(target):
            raise Conflict(
                f"the release of {target.id} was pruned (retention keeps the last "
                f"{self.config.releases.retention} releases of {target.application}); it cannot be rolled back to",
                code="release_pruned",
            )

    async def prune(
        self, deployment: Deployment, target: Target, log: DeploymentLog | None = None, *, promoted: bool = False,
        image: str | None = None,
    ) -> list[str]:
        """Keeps the release images and files of the application's last N releases (agent.retention)."""
        return await self.retention.prune(deployment, target, log, promoted=promoted, image=image)

    # --- after a restart -------------------------------------------------------------------

    async def reconcile(self, interrupted: list[Deployment]) -> Reconciled:
        """Settles interrupted deployments' releases and makes current ones serve (agent.release_recovery)."""
        return await self.recovery.reconcile(interrupted)

    async def close(self) -> None:
        """Stops the background reconciliation of remote releases."""
        await self.recovery.close()


@dataclass
class _HeldLock:
    """An application's lock and how many tasks hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


async def _to_the_end(work: Awaitable[object]) -> int:
    """Awaits `work` to its end even when this task is cancelled meanwhile; returns how often it was.

    The caller decides what such a cancellation means: `deploy` re-raises its own exception after
    an undo, and spends the cancellations that arrive once only cleanup is left.
    """
    task = asyncio.ensure_future(work)
    cancels = 0
    while True:
        try:
            await asyncio.shield(task)
            return cancels
        except asyncio.CancelledError:
            if task.cancelled():
                raise  # the work itself was cancelled, not this task
            cancels += 1


def _bind_of(deployment: Deployment) -> str | None:
    """The host address the deployment's release was asked to listen on (its url reports a wildcard)."""
    return deployment.spec.run.bind if deployment.spec.run else None
