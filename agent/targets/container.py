"""What releases in a Docker engine have in common, here or on a server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.health import HealthTarget
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment, RunSpec
from agent.runtimes.base import ReleaseHandle, ReleaseRuntime, ReleaseSpec
from agent.runtimes.container import RELEASE_REPOSITORY, ContainerRuntime
from agent.targets.base import LOOPBACK_ADDRESS, TargetBase, release_ports


class ContainerTarget(TargetBase):
    """Releases in containers of one Docker engine; a subclass says which engine."""

    async def docker(self) -> ContainerRuntime:
        """The Docker engine of this target's place."""
        raise NotImplementedError

    async def runtime(self) -> ReleaseRuntime:
        return await self.docker()

    async def stop_interrupted(self, deployment: Deployment) -> int:
        """Its build's containers, and a release container it created but may never have recorded (a crash between)."""
        removed = await super().stop_interrupted(deployment)
        containers = await self.docker()
        for container in await containers.list_release_containers():
            if container.deployment_id == deployment.id:
                orphan = ReleaseHandle(
                    runtime="container", deployment_id=deployment.id, application=container.application,
                    host=LOOPBACK_ADDRESS, container_id=container.container_id,
                )
                await containers.remove_release(orphan, 0)
                removed += 1
        return removed

    def fixed_port(self, run: RunSpec) -> int | None:
        return run.host_port

    async def prepare_release(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        run = deployment.spec.run
        assert run is not None
        return self.release_spec(deployment, ports=release_ports(deployment), image=run.image or image)

    async def resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        return self.stopped_release_spec(deployment, handle)

    async def health_target(self, handle: ReleaseHandle, port: int, run: RunSpec) -> HealthTarget | None:
        if run.port and port != run.port:
            # Only run.port is published on run.bind; the container runtime keeps other ports on loopback.
            handle = replace(handle, host=LOOPBACK_ADDRESS)
        return await self.place.reach(handle, port)

    async def promote(self, handle: ReleaseHandle) -> None:
        await (await self.docker()).keep_running(handle)

    async def reattach_release(self, deployment: Deployment, handle: ReleaseHandle, policy: LogPolicy) -> ReleaseHandle:
        containers = await self.docker()
        # Docker gives a restarted container new ephemeral ports and a new pid.
        current = await containers.refresh_release(handle) or handle
        await containers.attach_release_output(current, Path(deployment.log_path), policy)
        return current

    async def can_bring_back(self, deployment: Deployment) -> bool:
        image = deployment.release_image
        return image is not None and await (await self.docker()).image_exists(image)


async def prune_release_images(containers: ContainerRuntime, application: str, keep: set[str]) -> list[str]:
    """Removes the application's release images but `keep` (an image a container still uses stays)."""
    removed: list[str] = []
    for image in await containers.list_release_images(application):
        if image not in keep and await containers.remove_image(image):
            removed.append(image)
    return removed


def is_built_image(image: str) -> bool:
    """Whether `image` is one of the agent's build results (which hold the built /workspace)."""
    return image.startswith(f"{RELEASE_REPOSITORY}/")
