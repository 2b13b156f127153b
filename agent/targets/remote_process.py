"""Builds and releases as host processes on a server, over SSH, in the release's own directory."""

from __future__ import annotations

from pathlib import Path

from agent.config import Config
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment, RunSpec
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseRuntime, ReleaseSpec
from agent.targets.base import Builder, TargetBase, release_ports, workspace_of
from agent.targets.builds import put_source_on_server, remove_remote_dir_quietly
from agent.targets.container import is_built_image
from agent.workspace import remove_workspace
from agent.targets.server import RemoteServer


class RemoteProcessTarget(TargetBase):
    """Releases as host processes on a server, under a detached supervisor that keeps their output."""

    def __init__(self, config: Config, server: RemoteServer, builder: Builder, kill_grace_s: float) -> None:
        super().__init__(config, server, builder, kill_grace_s)
        self.server = server
        self.shell = server.shell

    async def runtime(self) -> ReleaseRuntime:
        return self.shell

    def fixed_port(self, run: RunSpec) -> int | None:
        return run.port

    async def prepare_release(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        """A release runs where its build ran, or in its rollback target's directory; else its source goes there."""
        origin = deployment.release_from or deployment.id
        workdir = self.server.release_dir(origin)
        if deployment.spec.build is None and origin == deployment.id:
            await put_source_on_server(self.config, self.shell, deployment, workdir, log)
        elif origin == deployment.id and image is not None and is_built_image(image):
            # Built in a container of the server's engine: the built workspace comes out of its image.
            await self._unpack_built_workspace(deployment, image, workdir, log)
        ports = release_ports(deployment) or [await self.shell.free_port()]
        return self.release_spec(deployment, ports=ports, workdir=Path(workdir), export_port=True)

    async def _unpack_built_workspace(self, deployment: Deployment, image: str, workdir: str, log: DeploymentLog) -> None:
        log.agent(RELEASE_STAGE, f"copying the built workspace out of {image} into {workdir} on server {self.server.name}")
        local = workspace_of(self.config, deployment.id)
        try:
            await (await self.server.docker()).copy_workspace_out(image, local)
            await self.shell.upload_workspace(local, workdir, log)
        finally:
            await remove_workspace(local)

    async def resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        workdir = Path(self.server.release_dir(deployment.release_from or deployment.id))
        return self.stopped_release_spec(deployment, handle, workdir, export_port=True)

    async def reattach_release(self, deployment: Deployment, handle: ReleaseHandle, policy: LogPolicy) -> ReleaseHandle:
        self.shell.follow_release(handle, Path(deployment.log_path), policy)
        return handle

    async def can_bring_back(self, deployment: Deployment) -> bool:
        return await self.shell.has_dir(self.server.release_dir(deployment.release_from or deployment.id))

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        return await self.server.prune_images(application, keep, recorded)

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        await self.server.remove_release_files(deployment, kept_origins)

    async def stop_interrupted(self, deployment: Deployment) -> int:
        removed = await self.builder.stop_work(deployment)
        # Also what started but was never recorded (a crash in between): found by its run directory.
        removed += await self.shell.stop_supervised(deployment.id)
        # The release's directory, whichever builder made it (the same one a process build ran in).
        await remove_remote_dir_quietly(self.shell, self.server.release_dir(deployment.id))
        return removed
