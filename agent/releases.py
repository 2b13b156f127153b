"""Releases: start a deployment's release, check it, promote it, and keep the old one until then.

The previous release of an application is stopped only after the new one
passes its health check. With a fixed host port the two cannot overlap: the old
one is stopped first and started again if the new one fails. Where a release runs
is its target's business (agent.targets); this module only calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import structlog

from agent.config import Config
from agent.errors import AgentError, Conflict, NotFound, ReleaseUnhealthy
from agent.health import HealthTarget, check_release
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment
from agent.runtimes.base import ReleaseHandle
from agent.store import Application, Store
from agent.targets.base import Target
from agent.targets.resolver import Targets

logger = structlog.get_logger("agent.releases")

STAGE = "release"
LAST_OUTPUT_LINES = 10
REMOTE_RETRY_S = 5.0
MAX_REMOTE_RETRY_S = 60.0


@dataclass(frozen=True)
class _Release:
    """A deployment and the release it started."""

    deployment: Deployment
    handle: ReleaseHandle


class ReleaseManager:
    """Puts releases into service and takes them out, one application at a time."""

    def __init__(self, config: Config, store: Store, targets: Targets) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        # One lock per application, kept only while someone holds or waits for it.
        self._locks: dict[str, _HeldLock] = {}
        self._remote_reconciler: asyncio.Task[None] | None = None

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

    def _log_policy(self, deployment: Deployment) -> LogPolicy:
        """The deployment's log policy, for writers (and release followers) opened here."""
        return LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)

    # --- deploying -------------------------------------------------------------------------

    async def deploy(
        self, deployment: Deployment, target: Target, log: DeploymentLog, image: str | None
    ) -> dict[str, Any]:
        """Starts, checks and promotes the release on `target`; returns the deployment's fields on success."""
        run = deployment.spec.run
        assert run is not None
        async with self.lock(deployment.application):
            spec = await target.prepare_release(deployment, log, image)
            previous = await self._current_release(deployment.application)
            fixed_port = target.fixed_port(run)
            stopped_previous = False
            if previous is not None and fixed_port is not None and fixed_port in previous.handle.ports.values():
                log.agent(
                    STAGE, f"stopping the previous release {previous.deployment.id} to free host port {fixed_port}"
                )
                await self.targets.for_deployment(previous.deployment).stop_release(previous.handle)
                stopped_previous = True
            handle: ReleaseHandle | None = None
            try:
                handle = await target.start_release(spec, log)
                url = target.url_of(handle, spec.ports[0] if spec.ports else None, spec.bind)
                await self.store.update(
                    deployment.id, release=handle.to_dict(), pid=handle.pid, pid_started_at=handle.pid_started_at,
                    container_id=handle.container_id, url=url, stage="health",
                )
                log.agent(STAGE, f"release started{f' at {url}' if url else ''}")
                started = handle
                smoke_test = await check_release(
                    deployment.spec.health_check,
                    await self._health_target(target, handle, deployment),
                    lambda: target.release_state(started),
                    log,
                )
            except BaseException as exc:
                # Read the dying release's last output before removing it.
                failure = await self._explain(exc, target, handle, log) if isinstance(exc, ReleaseUnhealthy) else None
                await asyncio.shield(self._undo(deployment, target, handle, previous, stopped_previous, log))
                if failure is not None:
                    raise failure from None
                raise
            await target.promote(handle)
            # Switch first, then drain: clients that looked up the old URL a moment ago still get answers.
            await self.store.set_application(deployment.application, deployment.id, "running")
            log.agent(STAGE, "the new release is in service")
            if previous is not None:
                await self._retire(previous, drain=not stopped_previous, log=log)
            return {
                "pid": handle.pid, "pid_started_at": handle.pid_started_at, "container_id": handle.container_id,
                "url": url, "smoke_test": smoke_test, "release": handle.to_dict(), "release_image": spec.image or image,
                "stage": None,
            }

    async def _retire(self, previous: _Release, *, drain: bool, log: DeploymentLog) -> None:
        """Removes the release the new one replaced, after letting it drain."""
        old = previous.deployment
        if drain and self.config.releases.drain_s:
            log.agent(STAGE, f"draining the previous release {old.id} for {self.config.releases.drain_s:g}s")
            await asyncio.sleep(self.config.releases.drain_s)
        log.agent(STAGE, f"removing the previous release {old.id}")
        await self.targets.for_deployment(old).remove_release(previous.handle)
        await self.store.update(old.id, pid=None)

    async def _undo(
        self,
        deployment: Deployment,
        target: Target,
        handle: ReleaseHandle | None,
        previous: _Release | None,
        stopped_previous: bool,
        log: DeploymentLog,
    ) -> None:
        """Removes a release that will not be promoted and brings back the one it displaced."""
        if handle is not None:
            await target.remove_release(handle)
            await self.store.update(deployment.id, pid=None, stage=None)
            log.agent(STAGE, "the new release was stopped and removed")
        if previous is not None and stopped_previous:
            log.agent(STAGE, f"starting the previous release {previous.deployment.id} again")
            await self.resume(previous.deployment, previous.handle)
        elif previous is not None:
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
        try:
            app = await self.store.get_application(application)
            current = await self.store.get(app.deployment_id)
        except NotFound:
            return None
        if app.state != "running" or current.release is None:
            return None
        return _Release(current, ReleaseHandle.from_dict(current.release))

    # --- applications ----------------------------------------------------------------------

    async def resume(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseHandle:
        """Starts a stopped release of `deployment` again and records its new handle."""
        target = self.targets.for_deployment(deployment)
        with DeploymentLog(Path(deployment.log_path), self._log_policy(deployment)) as log:
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
        """Keeps the release images (and release files) of the application's last N succeeded releases.

        Images are pruned where `deployment` runs (`target`). With `promoted`, `deployment`
        (releasing `image`) was just put into service and counts first, although its status is
        not `succeeded` yet.
        """
        application = deployment.application
        releases = [_Kept(d, d.release_image) for d in await self.store.succeeded_releases(application)]
        if promoted:
            releases = [_Kept(deployment, image)] + [r for r in releases if r.deployment.id != deployment.id]
        keep = releases[: self.config.releases.retention]
        try:
            current = (await self.store.get_application(application)).deployment_id
        except NotFound:
            current = None
        kept_images = {r.image for r in keep if r.image}
        kept_images |= {r.image for r in releases if r.deployment.id == current and r.image}
        recorded = {r.image for r in releases if r.image}
        removed = await target.prune_images(application, kept_images, recorded)
        kept_ids = {r.deployment.id for r in keep} | {current}
        # A rollback runs from its target's files: those stay while either is kept.
        kept_origins = {r.origin for r in releases if r.deployment.id in kept_ids}
        for old in releases[len(keep):]:
            if old.deployment.id not in kept_ids:
                await self.targets.for_deployment(old.deployment).remove_release_files(old.deployment, kept_origins)
        if removed and log is not None:
            log.agent(STAGE, f"pruned {len(removed)} old release image(s): {', '.join(removed)}")
        return removed

    # --- after a restart -------------------------------------------------------------------

    async def reconcile(self, interrupted: list[Deployment]) -> set[str]:
        """Removes releases of interrupted deployments and makes sure current releases serve.

        Returns the deployments of the current releases. Releases whose place may be away (a
        remote server) are settled in the background: it must not hold up this host's deployments.
        """
        for deployment in interrupted:
            if deployment.release is None:
                continue
            target = self.targets.for_deployment(deployment)
            try:
                await target.remove_release(ReleaseHandle.from_dict(deployment.release), immediately=True)
            except AgentError as exc:
                if not target.may_be_away:
                    raise  # Docker down here: reconciliation is retried as a whole
                logger.warning("could not remove the release of an interrupted deployment",
                               deployment_id=deployment.id, server=deployment.server, error=exc.message)
        current: set[str] = set()
        later: list[str] = []
        for app in await self.store.list_applications():
            current.add(app.deployment_id)
            deployment = await self.store.get(app.deployment_id)
            if app.state != "running" or deployment.release is None:
                continue
            if self.targets.for_deployment(deployment).may_be_away:
                later.append(app.name)
                continue
            await self._settle_current(deployment)
        if later and self._remote_reconciler is None:
            self._remote_reconciler = asyncio.create_task(self._reconcile_later(later), name="remote-reconcile")
        return current

    async def _reconcile_later(self, applications: list[str]) -> None:
        """Settles the current release of each application, retrying those whose server is away."""
        delay = REMOTE_RETRY_S
        pending = list(applications)
        while pending:
            failed: list[str] = []
            for name in pending:
                try:
                    async with self.lock(name):
                        app = await self.store.get_application(name)
                        deployment = await self.store.get(app.deployment_id)
                        if app.state == "running" and deployment.release is not None:
                            await self._settle_current(deployment)
                except AgentError as exc:
                    logger.warning("could not check a remote release; retrying", application=name,
                                   error=exc.message, retry_in_s=delay)
                    failed.append(name)
            pending = failed
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_REMOTE_RETRY_S)

    async def _settle_current(self, deployment: Deployment) -> None:
        """Starts a current release that is not running again, or follows its output once more."""
        handle = ReleaseHandle.from_dict(deployment.release or {})
        target = self.targets.for_deployment(deployment)
        state = await target.release_state(handle)
        if not state.running:
            logger.warning("current release is not running; starting it again", application=deployment.application)
            await self.resume(deployment, handle)
            return
        current = await target.reattach_release(deployment, handle, self._log_policy(deployment))
        if current != handle:
            port = deployment.spec.run.port if deployment.spec.run else None
            await self.store.update(
                deployment.id, release=current.to_dict(), pid=current.pid,
                url=target.url_of(current, port, _bind_of(deployment)),
            )

    async def close(self) -> None:
        """Stops the background reconciliation of remote releases."""
        if self._remote_reconciler is not None:
            self._remote_reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remote_reconciler
            self._remote_reconciler = None


@dataclass
class _HeldLock:
    """An application's lock and how many tasks hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True)
class _Kept:
    """A release retention counts: its deployment and the image it runs from."""

    deployment: Deployment
    image: str | None

    @property
    def origin(self) -> str:
        """The deployment whose release files this release runs from (itself, or a rollback's target)."""
        return self.deployment.release_from or self.deployment.id


def _bind_of(deployment: Deployment) -> str | None:
    """The host address the deployment's release was asked to listen on (its url reports a wildcard)."""
    return deployment.spec.run.bind if deployment.spec.run else None
