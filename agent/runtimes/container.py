"""Builds and releases in Docker containers: one ContainerRuntime per Docker engine.

ContainerRuntime is the face the targets see; each job is done by one
part in agent/runtimes/docker/: the gateway (client, thread pools, labels), builds, releases,
release output and images. The event loop never waits on Docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from agent.config import DockerSettings
from agent.logs import DEFAULT_POLICY, DeploymentLog, LogPolicy
from agent.runtimes.base import ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.docker.build import STAGE, UNKNOWN_EXIT_CODE, BuildJob, BuildResult, Builds
from agent.runtimes.docker.gateway import (
    APPLICATION_LABEL,
    BUILD_ROLE,
    COPY_ROLE,
    DEPLOYMENT_LABEL,
    IMAGE_ROLE,
    INSTANCE_LABEL,
    MAX_RELEASE_STREAMS,
    RELEASE_ROLE,
    ROLE_LABEL,
    SNAPSHOT_ROLE,
    DockerGateway,
)
from agent.runtimes.docker.hardening import KEPT_CAPABILITIES, SECURITY_OPT
from agent.runtimes.docker.images import RELEASE_REPOSITORY, WORKSPACE, Images
from agent.runtimes.docker.release import ReleaseContainer, Releases

__all__ = [
    "APPLICATION_LABEL",
    "BUILD_ROLE",
    "COPY_ROLE",
    "DEPLOYMENT_LABEL",
    "IMAGE_ROLE",
    "INSTANCE_LABEL",
    "KEPT_CAPABILITIES",
    "MAX_RELEASE_STREAMS",
    "RELEASE_REPOSITORY",
    "RELEASE_ROLE",
    "ROLE_LABEL",
    "SECURITY_OPT",
    "SNAPSHOT_ROLE",
    "STAGE",
    "UNKNOWN_EXIT_CODE",
    "WORKSPACE",
    "BuildJob",
    "BuildResult",
    "ContainerRuntime",
    "ReleaseContainer",
]


T = TypeVar("T")

class ContainerRuntime:
    """Runs build and release containers on one Docker engine, through the docker SDK on dedicated thread pools."""

    def __init__(
        self,
        settings: DockerSettings,
        max_streams: int,
        kill_grace_s: float = 10.0,
        instance: str | None = None,
        max_release_streams: int = MAX_RELEASE_STREAMS,
        engine_here: bool = True,
    ) -> None:
        self._gateway = DockerGateway(settings, max_streams, instance, max_release_streams)
        self._images = Images(self._gateway)
        # An engine on this host (`engine_here`): build output is read from its log files directly.
        self._builds = Builds(self._gateway, self._images, kill_grace_s=kill_grace_s, engine_here=engine_here)
        self._releases = Releases(self._gateway, self._images)
        self._closed = False

    async def ping(self) -> str:
        """The Docker engine's version; raises Unavailable when it cannot be reached."""
        return await self._gateway.ping()

    async def close(self) -> None:
        """Stops following release output (the releases go on), then closes the client and the thread pools."""
        if self._closed:
            return
        self._closed = True
        await self._releases.outputs.stop_all()
        await self._builds.close()
        await self._gateway.close()

    # --- builds ----------------------------------------------------------------------------

    async def run_build(
        self, job: BuildJob, log: DeploymentLog, on_start: Callable[[str, int], Awaitable[None]]
    ) -> BuildResult:
        """Runs the build command in a fresh container and always removes the container after."""
        return await self._builds.run(job, log, on_start)

    async def reattach_build(
        self, job: BuildJob, log: DeploymentLog, on_found: Callable[[str, int], Awaitable[None]]
    ) -> BuildResult | None:
        """After an agent restart: follows the job's build container again and ends it as run_build does.

        Its log continues where it stopped; None when the container is gone (what is left is removed).
        """
        return await self._builds.reattach(job, log, on_found)

    async def engine_call(self, action: str, function: Callable[[Any], T]) -> T:
        """Runs `function(docker client)` on the engine's pool (for the swarm runtime, which shares this engine)."""
        return await self._gateway.call(action, function)

    async def stop_deployment(self, deployment_id: str, grace_s: float) -> int:
        """Stops (SIGTERM, SIGKILL after `grace_s`) and removes the deployment's build and snapshot containers."""
        return await self._builds.stop_deployment(deployment_id, grace_s)

    async def remove_build_containers(self, keep: Callable[[str], bool]) -> list[str]:
        """Removes build and snapshot containers whose deployment `keep` rejects; returns those deployment ids."""
        return await self._builds.remove_containers(keep)

    # --- releases: the ReleaseRuntime interface ----------------------------------------------

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Creates and starts the release container, its output followed into the log; none is left on failure."""
        return await self._releases.start(spec, log)

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Whether it runs; its exit code while stopped or waiting for Docker to restart it."""
        return await self._releases.state(handle)

    async def refresh_release(self, handle: ReleaseHandle) -> ReleaseHandle | None:
        """The handle with the host ports and pid the container has now; None when it is gone."""
        return await self._releases.refresh(handle)

    async def keep_running(self, handle: ReleaseHandle) -> None:
        """Gives a promoted release its restart policy, so it survives crashes and restarts."""
        await self._releases.keep_running(handle)

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """SIGTERM via docker-init, SIGKILL after `grace_s`; the container is kept, stopped, for resume."""
        await self._releases.stop(handle, grace_s)

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the stopped release container again, or a new one when it is gone; returns the new handle."""
        return await self._releases.resume(handle, spec, log)

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops the release container (grace, then SIGKILL) and removes it; gone already is fine."""
        await self._releases.remove(handle, grace_s)

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """The container's last `lines` output lines (stdout and stderr, as Docker kept them)."""
        return await self._releases.last_output(handle, lines)

    async def attach_release_output(
        self, handle: ReleaseHandle, log_path: Path, policy: LogPolicy = DEFAULT_POLICY
    ) -> None:
        """Follows a release's output from now on into the log at `log_path` (after an agent restart).

        `policy` is the deployment's (LogPolicy.for_spec), so that the log stays masked and capped.

        A no-op when it is already followed, gone, or stopped (resume_release follows it again).
        """
        await self._releases.outputs.reattach(handle.container_id, log_path, policy)

    async def detach_release_output(self, handle: ReleaseHandle) -> None:
        """Stops copying the release's output into its log; the release itself goes on."""
        if handle.container_id is not None:
            await self._releases.outputs.stop_following(handle.container_id)

    async def list_release_containers(self, deployment_id: str | None = None) -> list[ReleaseContainer]:
        """This runtime's release containers, running or not, optionally of one deployment only."""
        return await self._releases.list_containers(deployment_id)

    # --- images and workspaces ---------------------------------------------------------------

    async def image_exists(self, reference: str) -> bool:
        """Whether the image is present on this host."""
        return await self._images.exists(reference)

    async def list_release_images(self, application: str) -> list[str]:
        """References of the application's build result images (`deploy-agent/<application>:*`), newest first."""
        return await self._images.list_release_images(application)

    async def remove_image(self, reference: str) -> bool:
        """Removes the image reference; False when it is missing or a container (even stopped) uses it."""
        return await self._images.remove(reference)

    async def copy_workspace_out(self, image: str, dest: Path) -> None:
        """Extracts the image's /workspace into the host directory `dest` (its content, not the folder)."""
        await self._images.copy_workspace_out(image, dest)

    async def remove_copy_containers(self) -> int:
        """Removes copy containers an interrupted copy_workspace_out left behind; returns how many."""
        return await self._images.remove_copy_containers()
