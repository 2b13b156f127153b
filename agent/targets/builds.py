"""The builders: in a container of a Docker engine (here or on a server), or as a command on a server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import structlog

from agent.config import Config
from agent.errors import AgentError, RuntimeFailure
from agent.logs import DeploymentLog
from agent.models import Deployment, parse_time
from agent.runtimes.container import RELEASE_REPOSITORY, BuildJob, ContainerRuntime
from agent.targets.base import BuildWatch, Built, check_build, workspace_of
from agent.targets.server import RemoteServer
from agent.workspace import prepare_workspace, remove_workspace

if TYPE_CHECKING:
    from agent.runtimes.remote import RemoteBuildJob, RemoteProcessRuntime

logger = structlog.get_logger("agent.targets")

DockerOf = Callable[[], Awaitable[ContainerRuntime]]


class ContainerBuilder:
    """Builds in a fresh container of a Docker engine, from a workspace prepared on this host."""

    def __init__(self, config: Config, docker: DockerOf, kill_grace_s: float) -> None:
        self.config = config
        self.docker = docker
        self.kill_grace_s = kill_grace_s

    async def prepare_source(self, deployment: Deployment, log: DeploymentLog) -> Path | None:
        """Puts the source into the deployment's workspace; returns a tar of it to use instead, if any."""
        await prepare_workspace(
            deployment.spec.source, workspace_of(self.config, deployment.id), log, state_dir=self.config.agent.state_dir
        )
        return None

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        build = deployment.spec.build
        assert build is not None
        archive = await self.prepare_source(deployment, log)
        try:
            await watch.building()
            containers = await self._watched_docker(deployment, watch)
            result = await containers.run_build(self._job(deployment, archive), log, _on_start(watch))
        finally:
            if archive is not None:
                await asyncio.to_thread(archive.unlink, True)
        return check_build(watch, build.timeout_s, result.exit_code, result.timed_out, result.image)

    async def reattach(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        """After a restart: follows the build container again and ends it as `build` does; None when it is gone."""
        build = deployment.spec.build
        assert build is not None
        containers = await self._watched_docker(deployment, watch)
        result = await containers.reattach_build(self._job(deployment, None), log, _on_start(watch))
        if result is None:
            return None
        return check_build(watch, build.timeout_s, result.exit_code, result.timed_out, result.image)

    async def _watched_docker(self, deployment: Deployment, watch: BuildWatch) -> ContainerRuntime:
        """The engine the build runs in, the watch told how to stop the build there."""
        containers = await self.docker()
        watch.stop_with(lambda: containers.stop_deployment(deployment.id, self.kill_grace_s))
        return containers

    def _job(self, deployment: Deployment, archive: Path | None) -> BuildJob:
        build = deployment.spec.build
        assert build is not None and build.image is not None
        return BuildJob(
            deployment_id=deployment.id,
            application=deployment.application,
            image=build.image,
            command=build.command,
            env=build.env,
            timeout_s=build.timeout_s,
            workspace=workspace_of(self.config, deployment.id),
            # A release runs from the committed build result.
            commit_image=f"{RELEASE_REPOSITORY}/{deployment.application}:{deployment.id}" if deployment.spec.run else None,
            workspace_archive=archive,
        )

    async def finish(self, deployment: Deployment, *, kept: bool) -> None:
        return None  # the container is gone with the build; the image is retention's

    async def stop_work(self, deployment: Deployment) -> int:
        return await (await self.docker()).stop_deployment(deployment.id, grace_s=0)


def _on_start(watch: BuildWatch) -> Callable[[str, int], Awaitable[None]]:
    """Tells the watch where the build container runs (started, or found again after a restart)."""

    async def on_start(container_id: str, pid: int) -> None:
        await watch.started(container_id=container_id, pid=pid or None)
        logger.info("build container running", container_id=container_id[:12], pid=pid)

    return on_start


class ServerContainerBuilder(ContainerBuilder):
    """Builds in a container of a server's Docker engine; a git source is cloned on the server itself."""

    def __init__(self, config: Config, server: RemoteServer, kill_grace_s: float) -> None:
        super().__init__(config, server.docker, kill_grace_s)
        self.shell = server.shell

    async def prepare_source(self, deployment: Deployment, log: DeploymentLog) -> Path | None:
        """A git source: cloned on the server (its network, its credentials) and carried here as a tar.

        The tar only carries the checkout from the server's SSH connection into a container of
        the server's own engine.
        """
        source = deployment.spec.source
        if source is None or source.type != "git":
            return await super().prepare_source(deployment, log)
        remote_dir = self.shell.workspace_dir(deployment.id)
        archive = self.config.workspaces_dir / f"{deployment.id}.tar"
        try:
            await self.shell.clone_workspace(source.url or "", source.ref, remote_dir, log)
            await self.shell.download_archive(remote_dir, archive)
        except BaseException:
            await asyncio.to_thread(archive.unlink, True)
            raise
        finally:
            await asyncio.shield(remove_remote_dir_quietly(self.shell, remote_dir))
        return archive


class ProcessBuilder:
    """Builds as a shell command on a server, in the directory its process release will run in."""

    def __init__(self, config: Config, shell: RemoteProcessRuntime, kill_grace_s: float) -> None:
        self.config = config
        self.shell = shell
        self.kill_grace_s = kill_grace_s

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        build = deployment.spec.build
        assert build is not None
        remote_dir = self.shell.layout.release_dir(deployment.id)
        await put_source_on_server(self.config, self.shell, deployment, remote_dir, log)
        await watch.building()

        async def on_start(pid: int, started_at: float) -> None:
            watch.stop_with(lambda: self.shell.kill_group(pid, started_at, self.kill_grace_s))
            await watch.started(pid=pid, pid_started_at=started_at)
            logger.info("remote build started", server=self.shell.server_name, pid=pid)

        exit_code, timed_out = await self.shell.run_build(self._job(deployment), log, on_start)
        if exit_code is None and not timed_out:
            watch.raise_if_stopped()
            raise RuntimeFailure(f"the build's process on server {self.shell.server_name} vanished without an exit code")
        return check_build(watch, build.timeout_s, exit_code, timed_out)

    async def reattach(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        """After a restart: follows the build's process on the server again; None when it vanished meanwhile."""
        build = deployment.spec.build
        assert build is not None
        pid, started_at = deployment.pid, deployment.pid_started_at
        if not pid or started_at is None:
            # Stopped before the build's pid was recorded: it may have started even so. Whatever of
            # it runs goes, and the worker starts it afresh.
            await self.shell.stop_supervised(deployment.id)
            return None
        watch.stop_with(lambda: self.shell.kill_group(pid, started_at, self.kill_grace_s))
        await watch.started(pid=pid, pid_started_at=started_at)
        ran_s = 0.0
        if deployment.started_at is not None:
            ran_s = max(0.0, time.time() - parse_time(deployment.started_at).timestamp())
        result = await self.shell.reattach_build(self._job(deployment), log, pid, started_at, ran_s)
        if result is None:
            return None
        exit_code, timed_out = result
        return check_build(watch, build.timeout_s, exit_code, timed_out)

    def _job(self, deployment: Deployment) -> RemoteBuildJob:
        from agent.runtimes.remote import RemoteBuildJob  # loaded with the first server (asyncssh)

        build = deployment.spec.build
        assert build is not None
        return RemoteBuildJob(
            deployment_id=deployment.id,
            command=build.command,
            env=build.env,
            timeout_s=build.timeout_s,
            remote_dir=self.shell.layout.release_dir(deployment.id),
        )

    async def finish(self, deployment: Deployment, *, kept: bool) -> None:
        if not kept:
            await remove_remote_dir_quietly(self.shell, self.shell.layout.release_dir(deployment.id))

    async def stop_work(self, deployment: Deployment) -> int:
        if not deployment.pid:
            return 0
        return int(await self.shell.kill_group(deployment.pid, deployment.pid_started_at or 0, 0))


async def put_source_on_server(
    config: Config, shell: RemoteProcessRuntime, deployment: Deployment, remote_dir: str, log: DeploymentLog
) -> None:
    """Clones a git source into `remote_dir` on the server, or prepares it here and uploads it."""
    source = deployment.spec.source
    if source is not None and source.type == "git":
        await shell.clone_workspace(source.url or "", source.ref, remote_dir, log)
        return
    local = workspace_of(config, deployment.id)
    await prepare_workspace(source, local, log, state_dir=config.agent.state_dir)
    try:
        await shell.upload_workspace(local, remote_dir, log)
    finally:
        await remove_workspace(local)


async def remove_remote_dir_quietly(shell: RemoteProcessRuntime, remote_dir: str) -> None:
    """Removes a directory on the server; a failure is only logged (it is housekeeping)."""
    try:
        await shell.remove_dir(remote_dir)
    except AgentError as exc:
        logger.warning("could not remove the remote workspace", server=shell.server_name, error=exc.message)
