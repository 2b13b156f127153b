"""Builds and releases in this host's Docker engine."""

from __future__ import annotations

import structlog

from agent.config import Config
from agent.models import Deployment
from agent.runtimes.base import ReleaseHandle
from agent.runtimes.container import ContainerRuntime
from agent.targets.base import LOOPBACK_ADDRESS, Builder, ThisHost
from agent.targets.container import ContainerTarget, prune_release_images

logger = structlog.get_logger("agent.targets")


class LocalContainerTarget(ContainerTarget):
    """Releases in containers of this host's Docker engine."""

    def __init__(self, config: Config, containers: ContainerRuntime, builder: Builder, kill_grace_s: float) -> None:
        super().__init__(config, ThisHost(), builder, kill_grace_s)
        self.containers = containers

    async def docker(self) -> ContainerRuntime:
        return self.containers

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        return await prune_release_images(self.containers, application, keep)

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        return None  # a container release runs from its image alone

    async def remove_leftovers(self, current: set[str]) -> int:
        """Copy containers, release containers of no current release, and every build container."""
        await self.containers.remove_copy_containers()
        for container in await self.containers.list_release_containers():
            if container.deployment_id not in current:
                orphan = ReleaseHandle(
                    runtime="container", deployment_id=container.deployment_id, application=container.application,
                    host=LOOPBACK_ADDRESS, container_id=container.container_id,
                )
                await self.containers.remove_release(orphan, 0)
                logger.info("removed an orphan release container", deployment_id=container.deployment_id)
        # Build containers with no live deployment behind them (e.g. crash between create and record).
        return len(await self.containers.remove_build_containers(keep=lambda _deployment_id: False))
