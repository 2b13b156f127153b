"""Docker Swarm services: an application's release is the service `deploy-agent-<application>` at its image.

The swarm is the one this host's engine manages. A release image is pushed to the configured
registry (every node pulls from there), then the service is created, or updated start-first with
`failure_action = rollback`, and the health check runs inside each task, as Swarm itself sees
it. A release is in service when every replica runs the new image and is healthy: a task with a
health check is `running` only once the check passed, so the tasks' states say it. Nothing here
is a routing of our own: the published port is Swarm's routing mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.types
import structlog

from agent.config import RegistrySettings
from agent.errors import ReleaseUnhealthy, RuntimeFailure
from agent.logs import DeploymentLog
from agent.models import HealthCheckSpec
from agent.runtimes.base import RELEASE_STAGE
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.registry import RegistryApi
from agent.runtimes.swarm_logs import ResumePoint, TaskLogCopier

logger = structlog.get_logger("agent.swarm")

SERVICE_PREFIX = "deploy-agent-"
REPOSITORY = "deploy-agent"
APPLICATION_LABEL = "deploy-agent.application"
DEPLOYMENT_LABEL = "deploy-agent.deployment"
# On a stopped service: how many replicas it had, for the next start.
STOPPED_REPLICAS_LABEL = "deploy-agent.stopped-replicas"
POLL_S = 0.5
# How long Swarm watches each updated task before it counts as good (start-first, then rollback).
MONITOR_S = 5.0
NANOSECONDS = 1_000_000_000
FAILED_UPDATE_STATES = frozenset({"paused", "rollback_started", "rollback_paused", "rollback_completed"})


def service_name(application: str) -> str:
    return SERVICE_PREFIX + application


@dataclass(frozen=True)
class SwarmRelease:
    """What a swarm release asks of its service."""

    deployment_id: str
    application: str
    image: str  # in the registry
    command: tuple[str, ...] | str | None
    env: dict[str, str]
    replicas: int
    port: int | None
    host_port: int | None
    constraints: tuple[str, ...]
    health_check: HealthCheckSpec | None
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class ServiceState:
    """A service as Swarm sees it now."""

    exists: bool
    image: str | None = None
    deployment_id: str | None = None
    desired: int = 0
    running: int = 0  # tasks running the service's current image (healthy, when it has a check)
    nodes: tuple[str, ...] = ()
    update_state: str | None = None
    update_message: str | None = None
    published: dict[int, int] = field(default_factory=dict)
    task_errors: tuple[str, ...] = ()


class SwarmRuntime:
    """Services of this engine's swarm, and release images in the registry its nodes pull from."""

    def __init__(self, containers: ContainerRuntime, registry: RegistrySettings | None) -> None:
        self.containers = containers
        self.registry = registry

    # --- images --------------------------------------------------------------------------

    def registry_image(self, application: str, deployment_id: str) -> str:
        if self.registry is None:
            raise RuntimeFailure("swarm releases need [registry] url in the agent's config")
        return f"{self.registry.url}/{REPOSITORY}/{application}:{deployment_id}"

    async def push(self, image: str, application: str, deployment_id: str, log: DeploymentLog) -> str:
        """Tags the built image for the registry and pushes it; returns the registry reference."""
        target = self.registry_image(application, deployment_id)
        repository, _, tag = target.rpartition(":")
        log.agent(RELEASE_STAGE, f"pushing {image} to {target}")

        def push(client: docker.DockerClient) -> None:
            client.images.get(image).tag(repository, tag)
            for line in client.api.push(repository, tag, stream=True, decode=True, auth_config=self._auth()):
                if isinstance(line, dict) and line.get("error"):
                    raise RuntimeFailure(f"pushing {target} failed: {line['error']}")

        await self.containers.engine_call(f"pushing {target}", push)
        return target

    async def prune_registry(self, application: str, keep: set[str]) -> list[str]:
        """Deletes the application's release images from the registry but `keep` (references); returns those deleted."""
        if self.registry is None:
            return []
        prefix = f"{self.registry.url}/{REPOSITORY}/{application}:"
        keep_tags = {image.split("@", 1)[0][len(prefix):] for image in keep if image.startswith(prefix)}
        result = await RegistryApi(self.registry).prune(f"{REPOSITORY}/{application}", keep_tags)
        if result.refused is not None:
            logger.warning("old release images stay in the registry", application=application, reason=result.refused)
        return result.removed

    def _auth(self) -> dict[str, str] | None:
        if self.registry is None or self.registry.username is None:
            return None
        return {"username": self.registry.username, "password": self.registry.password or ""}

    async def image_in_registry(self, image: str) -> bool:
        """Whether the registry still has `image` (a rollback can only deploy what it has)."""

        def inspect(client: docker.DockerClient) -> bool:
            try:
                client.api.inspect_distribution(image, auth_config=self._auth())
            except docker.errors.APIError:
                return False
            return True

        return await self.containers.engine_call(f"looking up {image}", inspect)

    # --- services ------------------------------------------------------------------------

    async def deploy(self, release: SwarmRelease, log: DeploymentLog) -> None:
        """Creates the application's service at the release's image, or updates it (start-first, rollback on failure)."""
        name = service_name(release.application)
        options = self._service_options(release)

        def apply(client: docker.DockerClient) -> str:
            existing = _service_or_none(client, name)
            if existing is None:
                client.services.create(release.image, name=name, **options)
                return "created"
            existing.update(image=release.image, **options)
            return "updated"

        done = await self.containers.engine_call(f"deploying service {name}", apply)
        log.agent(RELEASE_STAGE, f"service {name} {done}: {release.replicas} replica(s) of {release.image}")

    def _service_options(self, release: SwarmRelease) -> dict[str, Any]:
        command: list[str] | None = None
        if isinstance(release.command, str):
            command = ["/bin/sh", "-c", release.command]
        elif release.command:
            command = list(release.command)
        resources = docker.types.Resources(
            cpu_limit=int(release.cpus * NANOSECONDS) if release.cpus else None,
            mem_limit=release.memory,
        )
        labels = {APPLICATION_LABEL: release.application, DEPLOYMENT_LABEL: release.deployment_id}
        options: dict[str, Any] = {
            "command": command,
            "env": [f"{key}={value}" for key, value in release.env.items()],
            "labels": labels,
            "container_labels": labels,
            "mode": docker.types.ServiceMode("replicated", replicas=release.replicas),
            "constraints": list(release.constraints),
            "resources": resources,
            "update_config": docker.types.UpdateConfig(
                parallelism=1, delay=0, order="start-first", failure_action="rollback",
                monitor=int(MONITOR_S * NANOSECONDS),
            ),
            "rollback_config": docker.types.RollbackConfig(
                parallelism=1, delay=0, order="start-first", monitor=int(MONITOR_S * NANOSECONDS),
            ),
            "healthcheck": _healthcheck(release),
        }
        if release.port is not None:
            # Without a host port Swarm picks one (30000-32767) on its routing mesh.
            port: dict[str, Any] = {"Protocol": "tcp", "TargetPort": release.port}
            if release.host_port is not None:
                port["PublishedPort"] = release.host_port
            options["endpoint_spec"] = {"Ports": [port]}
        return options

    async def state(self, application: str) -> ServiceState:
        name = service_name(application)

        def read(client: docker.DockerClient) -> ServiceState:
            service = _service_or_none(client, name)
            if service is None:
                return ServiceState(exists=False)
            attrs = service.attrs
            spec = attrs.get("Spec") or {}
            image = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image")
            desired = _replicas_in(spec)
            tasks = service.tasks(filters={"desired-state": "running"})
            current = [task for task in tasks if _same_image(_task_image(task), image)]
            running = [task for task in current if (task.get("Status") or {}).get("State") == "running"]
            nodes = sorted({_node_name(client, task.get("NodeID")) for task in running if task.get("NodeID")})
            errors = tuple(
                str((task.get("Status") or {}).get("Err"))
                for task in service.tasks() if (task.get("Status") or {}).get("Err")
                and _same_image(_task_image(task), image)
            )[-5:]
            update = attrs.get("UpdateStatus") or {}
            published = {
                int(port["TargetPort"]): int(port["PublishedPort"])
                for port in ((attrs.get("Endpoint") or {}).get("Ports") or []) if port.get("PublishedPort")
            }
            return ServiceState(
                exists=True, image=image, deployment_id=(spec.get("Labels") or {}).get(DEPLOYMENT_LABEL),
                desired=desired, running=len(running), nodes=tuple(nodes), update_state=update.get("State"),
                update_message=update.get("Message"), published=published, task_errors=errors,
            )

        return await self.containers.engine_call(f"reading service {name}", read)

    async def converge(
        self, release: SwarmRelease, timeout_s: float, log: DeploymentLog, logs_from: ResumePoint
    ) -> ServiceState:
        """Waits until every replica runs the release's image and is healthy; ReleaseUnhealthy when Swarm
        rolled the update back, or when it did not converge within `timeout_s`.

        Meanwhile the tasks' output from `logs_from` on is copied into the log.
        """
        copier = TaskLogCopier(service_name(release.application), log, logs_from)
        try:
            return await self._converge(release, timeout_s, log, copier)
        finally:
            # The last lines (a crash's reason, the end of a health check) before the verdict's.
            with contextlib.suppress(Exception):
                await copier.copy_new(self.containers.engine_call)

    async def _converge(
        self, release: SwarmRelease, timeout_s: float, log: DeploymentLog, copier: TaskLogCopier
    ) -> ServiceState:
        deadline = time.monotonic() + timeout_s
        last_note = ""
        while True:
            await copier.copy_new(self.containers.engine_call)
            state = await self.state(release.application)
            if not state.exists:
                raise ReleaseUnhealthy(f"service {service_name(release.application)} is gone")
            if state.update_state in FAILED_UPDATE_STATES or (
                state.image is not None and not _same_image(state.image, release.image)
            ):
                reason = state.update_message or "Swarm rolled the update back"
                errors = "; ".join(state.task_errors)
                log.agent(RELEASE_STAGE, f"the update failed: {reason}{f' (tasks: {errors})' if errors else ''}")
                raise ReleaseUnhealthy(
                    f"Swarm rolled the service back: {reason}{f'; task errors: {errors}' if errors else ''}",
                    smoke_test=None,
                )
            converged = state.running >= release.replicas and state.update_state in (None, "completed")
            note = f"{state.running}/{release.replicas} replica(s) of the new image running and healthy"
            if note != last_note:
                log.agent("health", note + (f" (update {state.update_state})" if state.update_state else ""))
                last_note = note
            if converged:
                return state
            if time.monotonic() > deadline:
                errors = "; ".join(state.task_errors) or "no task error reported"
                raise ReleaseUnhealthy(
                    f"the service did not converge within {timeout_s:g}s: {note}; task errors: {errors}"
                )
            await asyncio.sleep(POLL_S)

    async def roll_back(self, application: str, deployment_id: str, log: DeploymentLog | None = None) -> None:
        """Undoes the release of `deployment_id`: back to the service's previous spec, or no service at all
        when it was the first. Nothing happens when the service runs another deployment's release."""
        name = service_name(application)

        def undo(client: docker.DockerClient) -> str:
            service = _service_or_none(client, name)
            if service is None:
                return "absent"
            attrs = service.attrs
            if (attrs["Spec"].get("Labels") or {}).get(DEPLOYMENT_LABEL) != deployment_id:
                return "not ours"
            if not attrs.get("PreviousSpec"):
                service.remove()
                return "removed"
            api = client.api
            url = api._url("/services/{0}/update", service.id)
            params = {"version": attrs["Version"]["Index"], "rollback": "previous"}
            response = api._post_json(url, data=attrs["Spec"], params=params)
            api._raise_for_status(response)
            return "rolled back"

        done = await self.containers.engine_call(f"rolling service {name} back", undo)
        if log is not None and done in ("removed", "rolled back"):
            log.agent(RELEASE_STAGE, f"service {name} {done}")

    async def scale(self, application: str, replicas: int) -> None:
        name = service_name(application)

        def apply(client: docker.DockerClient) -> None:
            service = _existing_service(client, name)
            service.scale(replicas)

        await self.containers.engine_call(f"scaling service {name}", apply)

    async def stop(self, application: str) -> None:
        """Scales the service to zero, keeping its replica count (a `scale` since the deployment included) for `start`."""
        name = service_name(application)

        def apply(client: docker.DockerClient) -> None:
            service = _existing_service(client, name)
            spec = service.attrs["Spec"]
            replicas = _replicas_in(spec)
            labels = dict(spec.get("Labels") or {})
            if replicas > 0:
                labels[STOPPED_REPLICAS_LABEL] = str(replicas)
            service.update(mode=docker.types.ServiceMode("replicated", replicas=0), labels=labels)

        await self.containers.engine_call(f"stopping service {name}", apply)

    async def start(self, application: str, default_replicas: int) -> int:
        """Scales a stopped service back to the count it had; `default_replicas` if none was kept. Returns it."""
        name = service_name(application)

        def apply(client: docker.DockerClient) -> int:
            service = _existing_service(client, name)
            labels = dict(service.attrs["Spec"].get("Labels") or {})
            kept = labels.pop(STOPPED_REPLICAS_LABEL, None)
            replicas = int(kept) if kept and kept.isdigit() else default_replicas
            service.update(mode=docker.types.ServiceMode("replicated", replicas=replicas), labels=labels)
            return replicas

        return await self.containers.engine_call(f"starting service {name}", apply)

    async def remove(self, application: str) -> None:
        name = service_name(application)

        def remove(client: docker.DockerClient) -> None:
            service = _service_or_none(client, name)
            if service is not None:
                service.remove()

        await self.containers.engine_call(f"removing service {name}", remove)


def _healthcheck(release: SwarmRelease) -> docker.types.Healthcheck | None:
    check = release.health_check
    if check is None:
        return None
    port = check.port or release.port
    if port is None:
        return None
    if check.type == "tcp":
        test = ["CMD-SHELL", f"nc -z 127.0.0.1 {int(port)} || exit 1"]
    else:
        test = ["CMD-SHELL", f"wget -q -O /dev/null http://127.0.0.1:{int(port)}{check.path} || exit 1"]
    return docker.types.Healthcheck(
        test=test,
        interval=int(check.interval_s * NANOSECONDS),
        timeout=int(check.timeout_s * NANOSECONDS),
        retries=check.retries,
        start_period=int(check.start_period_s * NANOSECONDS),
    )


def _existing_service(client: docker.DockerClient, name: str) -> Any:
    service = _service_or_none(client, name)
    if service is None:
        raise RuntimeFailure(f"service {name} does not exist")
    return service


def _replicas_in(spec: dict[str, Any]) -> int:
    """The replica count a service spec asks for (0 for a global or unset mode)."""
    return int(((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas") or 0)


def _service_or_none(client: docker.DockerClient, name: str) -> Any:
    try:
        return client.services.get(name)
    except docker.errors.NotFound:
        return None


def _task_image(task: dict[str, Any]) -> str | None:
    return (((task.get("Spec") or {}).get("ContainerSpec")) or {}).get("Image")


def _same_image(one: str | None, other: str | None) -> bool:
    """Whether two references name the same image; Swarm may pin a tag to its digest (`name:tag@sha256:...`)."""
    if one is None or other is None:
        return False
    return one.split("@", 1)[0] == other.split("@", 1)[0]


def _node_name(client: docker.DockerClient, node_id: str) -> str:
    try:
        return str(client.nodes.get(node_id).attrs["Description"]["Hostname"])
    except (docker.errors.APIError, KeyError):
        return node_id

