"""Builds and releases in a server's Docker engine, reached through its SSH connection."""

from __future__ import annotations

from agent.config import Config
from agent.models import Deployment
from agent.runtimes.container import ContainerRuntime
from agent.targets.base import Builder
from agent.targets.container import ContainerTarget
from agent.targets.server import RemoteServer


class RemoteContainerTarget(ContainerTarget):
    """Releases in containers of a server's Docker engine."""

    def __init__(self, config: Config, server: RemoteServer, builder: Builder, kill_grace_s: float) -> None:
        super().__init__(config, server, builder, kill_grace_s)
        self.server = server

    async def docker(self) -> ContainerRuntime:
        return await self.server.docker()

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        return await self.server.prune_images(application, keep, recorded)

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        # A process build before a container release leaves its directory on the server.
        await self.server.remove_release_files(deployment, kept_origins)
