"""Releases as Docker Swarm services: built here, pushed to the registry, rolled out by Swarm itself.

An application has one service, `deploy-agent-<application>`; each deployment updates it to its
image (start-first, rolled back by Swarm on failure). So the generic "start the new release
beside the old, check it, remove the old" becomes: update the service (`start_release`), wait
until every replica runs the new image and is healthy (`converge`, in place of the agent's own
probes: the check runs inside each task), and nothing to remove afterwards, the service having
replaced its tasks itself. Undoing a release (a kill, a failure) rolls the service back to its
previous spec, or removes it when it was the first. A swarm release has no pid and no container.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import RuntimeFailure
from agent.health import HealthTarget
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment, RunSpec, format_time, parse_time
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.swarm import ServiceState, SwarmRelease, SwarmRuntime, service_name
from agent.runtimes.swarm_logs import ResumePoint, resume_point
from agent.targets.base import LOOPBACK_ADDRESS, Builder, ThisHost
from agent.targets.container import ContainerTarget, is_built_image, prune_release_images

# Beyond its health check's own budget, how long a rollout may take (pulls, start-first overlap).
ROLLOUT_MARGIN_S = 120.0
PORT_WAIT_S = 10.0


class SwarmTarget(ContainerTarget):
    """Swarm services of this host's engine; builds run in its containers as for any local deployment."""

    checks_health_itself = True

    def __init__(
        self, config: Config, containers: ContainerRuntime, swarm: SwarmRuntime, builder: Builder, kill_grace_s: float
    ) -> None:
        super().__init__(config, ThisHost(), builder, kill_grace_s)
        self.containers = containers
        self.swarm = swarm
        self._releases: dict[str, SwarmRelease] = {}
        self._rolled_out_at: dict[str, float] = {}  # unix seconds the service update was asked for

    async def docker(self) -> ContainerRuntime:
        return self.containers

    def fixed_port(self, run: RunSpec) -> int | None:
        return None  # the service keeps its published port across updates: nothing to free first

    async def prepare_release(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        """The release image in the registry (a built image is pushed there first)."""
        run = deployment.spec.run
        assert run is not None
        image = image or run.image
        if image is None:
            raise RuntimeFailure("a swarm release needs an image")
        if is_built_image(image) or not self._in_registry(image):
            image = await self.swarm.push(image, deployment.application, deployment.release_from or deployment.id, log)
        self._releases[deployment.id] = self._swarm_release(deployment, image)
        return ReleaseSpec(
            deployment_id=deployment.id, application=deployment.application, runtime="swarm", command=run.command,
            env=dict(run.env), log_path=Path(deployment.log_path), ports=(run.port,) if run.port else (), image=image,
        )

    def _in_registry(self, image: str) -> bool:
        registry = self.swarm.registry
        return registry is not None and image.startswith(f"{registry.url}/")

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Creates or updates the service; returns at once (Swarm rolls out; `converge` waits for it)."""
        release = self._releases[spec.deployment_id]
        self._rolled_out_at[spec.deployment_id] = time.time()
        await self.swarm.deploy(release, log)
        state = await self.swarm.state(release.application)
        # Swarm allocates a published port just after the create call returns: the URL needs it.
        deadline = time.monotonic() + PORT_WAIT_S
        while release.port is not None and release.port not in state.published and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await self.swarm.state(release.application)
        return _handle(release.deployment_id, release.application, state)

    async def converge(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> dict[str, Any]:
        """Waits until every replica runs the new image and is healthy (ReleaseUnhealthy when Swarm rolled back)."""
        release = self._releases.get(deployment.id) or self._release_of(deployment, handle)
        check = deployment.spec.health_check
        budget = ROLLOUT_MARGIN_S
        if check is not None:
            budget += check.start_period_s + check.retries * (check.interval_s + check.timeout_s)
        began = format_time(_now())
        started = self._rolled_out_at.pop(deployment.id, None)
        if started is not None:
            logs_from = ResumePoint(started)
        else:
            # Re-adopted after a restart: the tasks' output continues where the log stopped.
            fallback = parse_time(deployment.started_at).timestamp() if deployment.started_at else time.time()
            logs_from = await asyncio.to_thread(resume_point, Path(deployment.log_path), fallback)
        state = await self.swarm.converge(release, budget * max(1, release.replicas), log, logs_from)
        nodes = ", ".join(state.nodes) or "no node"
        log.agent("health", f"every replica runs {release.image} and is healthy (on {nodes})")
        return {"passed": True, "url": None, "errors": [], "duration_ms": 0, "tested_at": began,
                "replicas": state.running}

    def _release_of(self, deployment: Deployment, handle: ReleaseHandle) -> SwarmRelease:
        """After a restart: what the deployment asked of its service, for watching its rollout to the end."""
        run = deployment.spec.run
        assert run is not None
        # The image prepare_release gave it: a registry one as requested, else the one it pushed.
        if deployment.spec.build is None and run.image is not None and self._in_registry(run.image):
            image = run.image
        else:
            image = self.swarm.registry_image(deployment.application, deployment.release_from or deployment.id)
        return self._swarm_release(deployment, image)

    def _swarm_release(self, deployment: Deployment, image: str) -> SwarmRelease:
        """What the deployment asks of its service, at `image`."""
        run = deployment.spec.run
        assert run is not None
        return SwarmRelease(
            deployment_id=deployment.id, application=deployment.application, image=image, command=run.command,
            env=dict(run.env), replicas=_replicas_of(run), port=run.port, host_port=run.host_port,
            constraints=run.constraints, health_check=deployment.spec.health_check,
            memory=run.memory or self.config.docker.release_memory_bytes, cpus=run.cpus or self.config.docker.release_cpus,
        )

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        state = await self.swarm.state(handle.application)
        return ReleaseState(running=state.exists and state.running > 0)

    async def health_target(self, handle: ReleaseHandle, port: int, run: RunSpec) -> HealthTarget | None:
        return None  # Swarm runs the check inside each task

    def url_of(self, handle: ReleaseHandle, port: int | None, bind: str | None = None) -> str | None:
        """The published port on the swarm's routing mesh (it needs IPVS in the kernel to answer)."""
        if port is None or port not in handle.ports:
            return None
        return f"http://{LOOPBACK_ADDRESS}:{handle.ports[port]}"

    async def promote(self, handle: ReleaseHandle) -> None:
        self._releases.pop(handle.deployment_id, None)
        self._rolled_out_at.pop(handle.deployment_id, None)

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        return []

    async def stop_release(self, handle: ReleaseHandle) -> None:
        """Out of service: the service scaled to zero (started again by `resume_release`)."""
        await self.swarm.stop(handle.application)

    async def resume_release(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> ReleaseHandle:
        replicas = await self.swarm.start(handle.application, _replicas_of(deployment.spec.run))
        log.agent(RELEASE_STAGE, f"service {service_name(handle.application)} scaled back to {replicas}")
        return _handle(handle.deployment_id, handle.application, await self.swarm.state(handle.application))

    async def remove_release(self, handle: ReleaseHandle, *, immediately: bool = False) -> None:
        """The deployment's release undone: the service rolled back, or removed if it was its first;
        nothing when the service has since moved on to another deployment (a replaced release)."""
        self._releases.pop(handle.deployment_id, None)
        self._rolled_out_at.pop(handle.deployment_id, None)
        await self.swarm.roll_back(handle.application, handle.deployment_id)

    async def reattach_release(self, deployment: Deployment, handle: ReleaseHandle, policy: LogPolicy) -> ReleaseHandle:
        return _handle(handle.deployment_id, handle.application, await self.swarm.state(handle.application))

    async def resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        raise RuntimeFailure("a swarm release is resumed by scaling its service back")

    async def can_bring_back(self, deployment: Deployment) -> bool:
        # Only what the registry has: the other nodes pull from there.
        image = deployment.release_image
        return image is not None and await self.swarm.image_in_registry(image)

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        """Old release images go from this engine and from the registry (whose layers its garbage collection frees)."""
        removed = await prune_release_images(self.containers, application, keep)
        for image in await self.swarm.prune_registry(application, keep):
            await self.containers.remove_image(image)  # the local tag the push left
            if image not in removed:
                removed.append(image)
        return removed

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        return None

    async def stop_interrupted(self, deployment: Deployment) -> int:
        removed = await super().stop_interrupted(deployment)
        await self.swarm.roll_back(deployment.application, deployment.id)
        return removed

    async def service(self, application: str) -> ServiceState:
        return await self.swarm.state(application)

    async def scale(self, application: str, replicas: int) -> None:
        await self.swarm.scale(application, replicas)


def _replicas_of(run: RunSpec | None) -> int:
    return 1 if run is None or run.replicas is None else run.replicas


def _handle(deployment_id: str, application: str, state: ServiceState) -> ReleaseHandle:
    return ReleaseHandle(
        runtime="swarm", deployment_id=deployment_id, application=application, host=LOOPBACK_ADDRESS,
        ports=dict(state.published),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
