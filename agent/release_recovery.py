"""Release recovery: after a restart, settle the releases a previous run left behind.

An interrupted deployment the application already points at was put into service:
its release keeps running and what `deploy` had left is finished. Any other
interrupted release is removed. Current releases are started again or followed
once more; those that may be away (a remote server) in the background, retried
until their server answers. The steps themselves are the ReleaseManager's, which
owns this object.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable

import structlog

from agent.errors import AgentError
from agent.logs import DeploymentLog
from agent.models import Deployment
from agent.runtimes.base import ReleaseHandle
from agent.store import Application

if TYPE_CHECKING:
    from agent.releases import ReleaseManager

# The release manager's logger: these events were always its own.
logger = structlog.get_logger("agent.releases")

REMOTE_RETRY_S = 5.0
MAX_REMOTE_RETRY_S = 60.0


@dataclass(frozen=True)
class Reconciled:
    """What reconciliation after a restart found and settled."""

    current: set[str]  # the deployments of the applications' current releases
    # Interrupted deployments the application already pointed at, now finished: id → their final fields.
    promoted: dict[str, dict[str, Any]]


class ReleaseRecovery:
    """Settles interrupted and current releases after a restart, with the release manager's steps."""

    def __init__(self, releases: ReleaseManager) -> None:
        self.releases = releases
        self.store = releases.store
        self.targets = releases.targets
        self._remote_reconciler: asyncio.Task[None] | None = None

    async def reconcile(self, interrupted: list[Deployment]) -> Reconciled:
        """Settles the releases of interrupted deployments and makes sure current releases serve.

        An interrupted deployment the application already points at was put into service: its
        release keeps running untouched, and what `deploy` had left (removing the replaced
        release, retention) is finished here; the engine ends it `succeeded`. Any other
        interrupted release is removed, and the previous one keeps serving. Releases whose place
        may be away (a remote server) are settled in the background: it must not hold up this
        host's deployments.
        """
        apps = {app.name: app for app in await self.store.list_applications()}
        promoted = [d for d in interrupted if d.release is not None and d.id == _current_id(apps, d.application)]
        promoted_ids = {d.id for d in promoted}
        for deployment in interrupted:
            if deployment.release is not None and deployment.id not in promoted_ids:
                await self._quietly_if_away(
                    deployment, "could not remove the release of an interrupted deployment",
                    self.targets.for_deployment(deployment).remove_release(
                        ReleaseHandle.from_dict(deployment.release), immediately=True
                    ),
                )
        later: list[str] = []
        for app in apps.values():
            deployment = await self.store.get(app.deployment_id)
            if app.state != "running" or deployment.release is None:
                continue
            if self.targets.for_deployment(deployment).may_be_away:
                later.append(app.name)
                continue
            await self._settle_current(deployment)
        if later and self._remote_reconciler is None:
            self._remote_reconciler = asyncio.create_task(self._reconcile_later(later), name="remote-reconcile")
        finished = {deployment.id: await self._finish_promoted(deployment) for deployment in promoted}
        return Reconciled({app.deployment_id for app in apps.values()}, finished)

    async def _finish_promoted(self, deployment: Deployment) -> dict[str, Any]:
        """Finishes an interrupted deployment already in service; returns the fields it succeeds with."""
        target = self.targets.for_deployment(deployment)
        with DeploymentLog(Path(deployment.log_path), self.releases.log_policy(deployment)) as log:
            log.agent("recovery", "the agent stopped after this release was put into service; it keeps serving, "
                                  "and what was left of the deployment is finished now")
            # The release it replaced, and any other of the application still running (pid kept until removed).
            for old in await self.store.succeeded_releases(deployment.application):
                if old.id != deployment.id and old.pid is not None and old.release is not None:
                    await self._quietly_if_away(
                        old, "could not remove a replaced release",
                        self.releases.remove_replaced(old, ReleaseHandle.from_dict(old.release), log),
                    )
            await self.releases.retention.prune_promoted(deployment, target, log, deployment.release_image)
            log.agent("done", "deployment succeeded")
        now = await self.store.get(deployment.id)
        return {
            "pid": now.pid, "pid_started_at": now.pid_started_at, "container_id": now.container_id, "url": now.url,
            "stage": None,
        }

    async def _quietly_if_away(self, deployment: Deployment, warning: str, work: Awaitable[object]) -> None:
        """Awaits `work`; a failure where the deployment's place may be away is only a warning."""
        try:
            await work
        except AgentError as exc:
            if not self.targets.for_deployment(deployment).may_be_away:
                raise  # Docker down here: reconciliation is retried as a whole
            logger.warning(warning, deployment_id=deployment.id, server=deployment.server, error=exc.message)

    async def _reconcile_later(self, applications: list[str]) -> None:
        """Settles the current release of each application, retrying those whose server is away."""
        delay = REMOTE_RETRY_S
        pending = list(applications)
        while pending:
            failed: list[str] = []
            for name in pending:
                try:
                    async with self.releases.lock(name):
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
            await self.releases.resume(deployment, handle)
            return
        current = await target.reattach_release(deployment, handle, self.releases.log_policy(deployment))
        if current != handle:
            run = deployment.spec.run
            # The bind address the release was asked for: its url would report a wildcard.
            await self.store.update(
                deployment.id, release=current.to_dict(), pid=current.pid,
                url=target.url_of(current, run.port if run else None, run.bind if run else None),
            )

    async def close(self) -> None:
        """Stops the background reconciliation of remote releases."""
        if self._remote_reconciler is not None:
            self._remote_reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remote_reconciler
            self._remote_reconciler = None


def _current_id(apps: dict[str, Application], application: str) -> str | None:
    app = apps.get(application)
    return app.deployment_id if app is not None else None
