"""Builds in this host's Docker engine; releases run as supervised host processes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import structlog

from agent.config import Config
from agent.logs import DeploymentLog
from agent.models import Deployment, RunSpec
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseRuntime, ReleaseSpec
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.targets.base import Builder, TargetBase, ThisHost, free_local_port, release_ports
from agent.targets.container import is_built_image, prune_release_images
from agent.workspace import prepare_workspace, remove_workspace

logger = structlog.get_logger("agent.targets")


class LocalProcessTarget(TargetBase):
    """Releases as host processes in `releases_dir/<id>`, a copy of the built workspace or of the source."""

    def __init__(
        self,
        config: Config,
        processes: ProcessRuntime,
        containers: ContainerRuntime,
        builder: Builder,
        kill_grace_s: float,
    ) -> None:
        super().__init__(config, ThisHost(), builder, kill_grace_s)
        self.processes = processes
        self.containers = containers

    async def runtime(self) -> ReleaseRuntime:
        return self.processes

    def fixed_port(self, run: RunSpec) -> int | None:
        return run.port

    async def prepare_release(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        workdir = await self._prepare_workdir(deployment, log, image)
        ports = release_ports(deployment) or [free_local_port()]
        return self.release_spec(deployment, ports=ports, workdir=workdir, export_port=True)

    async def resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        return self.stopped_release_spec(deployment, handle, self._workdir_of(deployment.id), export_port=True)

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the release; a kill meanwhile lets the start finish, then removes what it started.

        Cancelled halfway, the start would leave a detached supervisor nobody knows of. The wait
        is short: the supervisor reports its command's pid within START_TIMEOUT_S or is killed.
        """
        start = asyncio.ensure_future(self.processes.start_release(spec, log))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            if not start.cancelled():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._remove_when_started(start))
            raise

    async def _remove_when_started(self, start: "asyncio.Future[ReleaseHandle]") -> None:
        handle = await start
        await self.processes.remove_release(handle, 0)

    async def can_bring_back(self, deployment: Deployment) -> bool:
        image = deployment.release_image
        origin = deployment.release_from or deployment.id
        if image is not None and is_built_image(image) and await self.containers.image_exists(image):
            return True
        return self._workdir_of(origin).is_dir()

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        return await prune_release_images(self.containers, application, keep)

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        await remove_workspace(self._workdir_of(deployment.id))

    async def remove_leftovers(self, current: set[str]) -> int:
        """Stops and removes the process releases of no current deployment (only what their own files prove)."""
        removed = 0
        for handle in await self.processes.recorded_releases():
            if handle.deployment_id in current:
                continue
            running = await self.processes.adopt(handle)
            await self.processes.remove_release(handle, 0)
            if running:
                removed += 1
                logger.info("removed an orphan process release", deployment_id=handle.deployment_id, pid=handle.pid)
        # Cgroups of releases no pid file records (the agent died before the command ran) hold ours too.
        removed += await self.processes.remove_stray_cgroups(current)
        return removed

    def _workdir_of(self, deployment_id: str) -> Path:
        return self.config.releases_dir / deployment_id

    async def _prepare_workdir(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> Path:
        """The directory a host process runs in: the built workspace, the source, or a rollback's."""
        workdir = self._workdir_of(deployment.id)
        await remove_workspace(workdir)
        origin = deployment.release_from
        if image is not None and is_built_image(image):
            log.agent(RELEASE_STAGE, f"copying the built workspace out of {image}")
            await self.containers.copy_workspace_out(image, workdir)
        elif origin is not None and origin != deployment.id:
            log.agent(RELEASE_STAGE, f"copying the workspace of {origin}")
            await asyncio.to_thread(shutil.copytree, self._workdir_of(origin), workdir, symlinks=True)
        else:
            await prepare_workspace(deployment.spec.source, workdir, log, state_dir=self.config.agent.state_dir)
        return workdir
