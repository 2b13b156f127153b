"""Retention: keep the release images and files of each application's last N releases, prune the rest.

What the current release and any kept rollback run from is kept too. Pruning is
housekeeping: after a promotion its failure is only a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from agent.config import Config
from agent.errors import AgentError, NotFound
from agent.logs import DeploymentLog
from agent.models import Deployment
from agent.store import Store
from agent.targets.base import Target
from agent.targets.resolver import Targets

# The release manager's logger: these events were always its own.
logger = structlog.get_logger("agent.releases")

STAGE = "release"


class Retention:
    """Prunes the old releases of an application where its deployment runs."""

    def __init__(self, config: Config, store: Store, targets: Targets) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        # Deployments whose retention `deploy` settled already: the worker's call after it is a no-op.
        self._pruned: set[str] = set()

    async def prune(
        self, deployment: Deployment, target: Target, log: DeploymentLog | None = None, *, promoted: bool = False,
        image: str | None = None,
    ) -> list[str]:
        """Keeps the release images (and release files) of the application's last N succeeded releases.

        Images are pruned where `deployment` runs (`target`). With `promoted`, `deployment`
        (releasing `image`) was just put into service and counts first, although its status is
        not `succeeded` yet; `settle` settled that already, so this call then only returns.
        """
        if promoted and deployment.id in self._pruned:
            # Returns without awaiting: a kill cannot land between the release's cleanup and its success.
            self._pruned.discard(deployment.id)
            return []
        return await self._prune_now(deployment, target, log, promoted=promoted, image=image)

    async def settle(self, deployment: Deployment, target: Target, log: DeploymentLog, image: str | None) -> None:
        """Retention of a just promoted deployment, before it reports success; the worker's own call is then a no-op."""
        self._pruned.add(deployment.id)
        await self.prune_promoted(deployment, target, log, image)

    async def prune_promoted(
        self, deployment: Deployment, target: Target, log: DeploymentLog, image: str | None
    ) -> None:
        """Retention of a deployment put into service (releasing `image`); a failure is only a warning."""
        # Retention is housekeeping: its failure must not change how the deployment ends.
        try:
            await self._prune_now(deployment, target, log, promoted=True, image=image)
        except AgentError as exc:
            logger.warning("pruning old releases failed", application=deployment.application, error=exc.message)

    async def _prune_now(
        self, deployment: Deployment, target: Target, log: DeploymentLog | None, *, promoted: bool, image: str | None
    ) -> list[str]:
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


@dataclass(frozen=True)
class _Kept:
    """A release retention counts: its deployment and the image it runs from."""

    deployment: Deployment
    image: str | None

    @property
    def origin(self) -> str:
        """The deployment whose release files this release runs from (itself, or a rollback's target)."""
        return self.deployment.release_from or self.deployment.id
