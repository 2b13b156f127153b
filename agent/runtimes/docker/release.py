"""Release containers: create with limits and published ports, start, state, refresh, stop, resume, remove.

A release is a long-lived container of its build's image; its ReleaseOutputs copy the output
into the deployment's log across Docker's restarts of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping

import docker

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.base import ANY_ADDRESS, RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.docker.gateway import (
    APPLICATION_LABEL,
    DEPLOYMENT_LABEL,
    RELEASE_ROLE,
    ContainerMissing,
    DockerGateway,
    command_line,
    is_running,
)
from agent.runtimes.docker.hardening import create_running_host_config
from agent.runtimes.docker.images import WORKSPACE, Images
from agent.runtimes.docker.output import ReleaseOutputs

# A promoted release survives agent and Docker restarts; `docker stop` (stop_release) keeps it
# stopped. Until promotion a release has no restart policy: a crash during its health check
# must show as an exit with its real code, not as a restart that resets the exit code to 0.
RELEASE_RESTART_POLICY = {"Name": "unless-stopped"}
UNCHECKED_RESTART_POLICY = {"Name": "no"}
# Docker keeps the release's output too, rotated, so that `docker logs` works for operators.
RELEASE_LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
# How long after a start Docker may take to report the published host ports.
PORTS_PUBLISHED_S = 2.0
_PORT_IN_USE = re.compile(r"(?:Bind for \S*:(\d+) failed: port is already allocated|listen \w+ \S*:(\d+): bind: address already in use)")


@dataclass(frozen=True)
class ReleaseContainer:
    """A release container on this host, as reconciliation after a restart needs it.

    `running` is true while it runs or while Docker is about to restart it after a crash.
    """

    deployment_id: str
    application: str
    container_id: str
    running: bool


class Releases:
    """Starts, watches and ends release containers on one engine."""

    def __init__(self, gateway: DockerGateway, images: Images) -> None:
        self._gateway = gateway
        self._images = images
        # The followers copying these releases' output into their logs.
        self.outputs = ReleaseOutputs(gateway)

    async def start(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Creates and starts the release container; its output goes to the log (stage `release`).

        Fails with RuntimeFailure, leaving no container, when the image is missing or a host
        port is taken.
        """
        image = spec.image
        if not image:
            raise RuntimeFailure(f"release of {spec.deployment_id} names no image to start")
        await self._images.ensure_release_image(image, log)
        container_id = await self._gateway.create_cancel_safe(
            "creating the release container", lambda client: self._create_container(client, spec, image)
        )
        handle = ReleaseHandle(
            runtime="container",
            deployment_id=spec.deployment_id,
            application=spec.application,
            host=_reachable_host(spec.bind),
            container_id=container_id,
        )
        try:
            log.agent(RELEASE_STAGE, f"starting release container {container_id[:12]} from {image}")
            return await self._start_container(handle, spec, log)
        except BaseException:
            # Shielded: a cancelled start must not leave the container behind.
            await asyncio.shield(self._discard(container_id))
            raise

    async def state(self, handle: ReleaseHandle) -> ReleaseState:
        """Whether it runs; its exit code while stopped or waiting for Docker to restart it."""
        details = await self._gateway.inspect_or_none(handle.container_id)
        if details is None:
            return ReleaseState(running=False, exit_code=None)
        state = details.get("State") or {}
        running = is_running(state)
        ended = not running and state.get("Status") != "created"
        return ReleaseState(
            running=running,
            exit_code=int(state.get("ExitCode") or 0) if ended else None,
            restart_count=int(details.get("RestartCount") or 0),
            pid=int(state.get("Pid") or 0) or None,
        )

    async def refresh(self, handle: ReleaseHandle) -> ReleaseHandle | None:
        """The handle with the host ports and pid the container has now; None when it is gone.

        Docker assigns new ephemeral host ports (and a new pid) each time it restarts a release.
        """
        details = await self._gateway.inspect_or_none(handle.container_id)
        if details is None:
            return None
        # In the handle's order: its first port is the one published on the bound address.
        bindings = _published_bindings(details, tuple(handle.ports) or None)
        return _with_bindings(handle, bindings, details)

    async def keep_running(self, handle: ReleaseHandle) -> None:
        """Gives a promoted release its restart policy, so it survives crashes and restarts."""
        container_id = handle.container_id
        if container_id is None:
            return
        await self._gateway.call(
            f"setting the restart policy of container {container_id[:12]}",
            lambda client: client.api.update_container(container_id, restart_policy=RELEASE_RESTART_POLICY),
        )

    async def stop(self, handle: ReleaseHandle, grace_s: float) -> None:
        """SIGTERM via docker-init, SIGKILL after `grace_s`; the container is kept, stopped, for resume."""
        if handle.container_id is None:
            return
        await self._stop_container(handle.container_id, grace_s)

    async def resume(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the stopped release container again, or a new one when it is gone; returns the new handle."""
        container_id = handle.container_id
        if container_id is None or await self._gateway.inspect_or_none(container_id) is None:
            log.agent(RELEASE_STAGE, "the stopped release container is gone; starting a new one")
            return await self.start(spec, log)
        await self.outputs.stop_following(container_id)
        log.agent(RELEASE_STAGE, f"starting release container {container_id[:12]} again")
        try:
            return await self._start_container(handle, spec, log)
        except ContainerMissing:
            await self.outputs.stop_following(container_id)
            log.agent(RELEASE_STAGE, "the release container vanished while it was started; starting a new one")
            return await self.start(spec, log)
        except BaseException:
            # The container stays, stopped, so that a later resume can try again.
            await asyncio.shield(self.outputs.stop_following(container_id))
            raise

    async def remove(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops the release container (grace, then SIGKILL) and removes it; gone already is fine."""
        if handle.container_id is None:
            return
        await self._stop_container(handle.container_id, grace_s)
        await self._gateway.remove_container(handle.container_id)

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """The container's last `lines` output lines (stdout and stderr, as Docker kept them)."""
        container_id = handle.container_id
        if container_id is None or lines <= 0:
            return []
        try:
            raw = await self._gateway.call(
                f"reading the output of container {container_id[:12]}",
                lambda client: client.api.logs(container_id, stdout=True, stderr=True, tail=lines),
            )
        except ContainerMissing:
            return []
        return [line.rstrip("\r") for line in raw.decode("utf-8", errors="replace").splitlines()][-lines:]

    async def list_containers(self, deployment_id: str | None = None) -> list[ReleaseContainer]:
        """This gateway's release containers, running or not, optionally of one deployment only."""
        labels = [f"{DEPLOYMENT_LABEL}={deployment_id}"] if deployment_id is not None else []
        entries = await self._gateway.list_containers(RELEASE_ROLE, *labels)
        return [
            ReleaseContainer(
                deployment_id=(entry.get("Labels") or {}).get(DEPLOYMENT_LABEL, ""),
                application=(entry.get("Labels") or {}).get(APPLICATION_LABEL, ""),
                container_id=str(entry["Id"]),
                running=entry.get("State") in ("running", "restarting"),
            )
            for entry in entries
        ]

    def _create_container(self, client: docker.DockerClient, spec: ReleaseSpec, image: str) -> str:
        ports = list(dict.fromkeys(spec.ports))
        bindings: dict[int, tuple[str, int | None]] = {}
        for index, port in enumerate(ports):
            if index == 0:
                bindings[port] = (spec.bind, spec.host_port or None)
            else:
                bindings[port] = ("127.0.0.1", None)
        settings = self._gateway.settings
        cpus = spec.cpus or settings.release_cpus
        host_config = create_running_host_config(
            client.api,
            memory=spec.memory or settings.release_memory_bytes,
            nano_cpus=int(cpus * 1e9),
            pids=spec.pids or settings.release_pids,
            restart_policy=UNCHECKED_RESTART_POLICY,
            log_config=RELEASE_LOG_CONFIG,
            port_bindings=bindings or None,
        )
        command = None if spec.command is None else command_line(spec.command)
        created = client.api.create_container(
            image=image,
            command=command,
            # A given command runs exactly as given; without one the image's own entrypoint and command run.
            entrypoint=[] if command is not None else None,
            environment=dict(spec.env),
            working_dir=WORKSPACE,
            labels=self._gateway.labels(RELEASE_ROLE, spec.deployment_id, spec.application),
            name=f"deploy-agent-release-{spec.deployment_id}",
            ports=ports or None,
            host_config=host_config,
        )
        return str(created["Id"])

    async def _start_container(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Attaches, starts and inspects the (created or stopped) release container."""
        container_id = handle.container_id
        assert container_id is not None
        # Attached before the start, so that not one line of early output is missed.
        self.outputs.follow(container_id, log.path, await self._gateway.attach(container_id), log.policy)
        try:
            await self._gateway.start(container_id, "starting the release container")
        except ContainerMissing:
            raise
        except RuntimeFailure as exc:
            port_in_use = _port_in_use(exc, spec)
            if port_in_use is None:
                raise
            raise port_in_use from exc
        wanted = tuple(dict.fromkeys(spec.ports))
        deadline = time.monotonic() + PORTS_PUBLISHED_S
        while True:
            details = await self._gateway.inspect(container_id, "inspecting the release container")
            bindings = _published_bindings(details, wanted)
            # A release that died at once has no ports to wait for; release_state tells the engine.
            if len(bindings) == len(wanted) or not is_running(details.get("State") or {}) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        started = _with_bindings(handle, bindings, details)
        published = ", ".join(f"{port} -> {address or '*'}:{host}" for port, (address, host) in bindings.items())
        log.agent(
            RELEASE_STAGE, f"release container {container_id[:12]} started (pid {started.pid}; ports {published or 'none'})"
        )
        return started

    async def _discard(self, container_id: str) -> None:
        """Undoes a release start that failed: no follower, no container."""
        await self.outputs.stop_following(container_id)
        with contextlib.suppress(RuntimeFailure):
            await self._gateway.remove_container(container_id)

    async def _stop_container(self, container_id: str, grace_s: float) -> None:
        """Stops the container, letting its output drain into the log before the follower ends."""
        self.outputs.expect_end(container_id)
        await self._gateway.stop_container(container_id, grace_s)
        await self.outputs.stop_following(container_id, drain=True)


def _reachable_host(bind: str) -> str:
    """Where the agent reaches a port published on `bind`."""
    return "127.0.0.1" if bind in ANY_ADDRESS else bind


def _published_bindings(
    details: Mapping[str, Any], wanted: tuple[int, ...] | None = None
) -> dict[int, tuple[str, int]]:
    """Container port → (host address, host port) as Docker reports them, for the wanted (default: all) tcp ports."""
    published = (details.get("NetworkSettings") or {}).get("Ports") or {}
    if wanted is None:
        wanted = tuple(sorted(int(key.split("/")[0]) for key in published if key.endswith("/tcp")))
    bindings: dict[int, tuple[str, int]] = {}
    for port in wanted:
        for binding in published.get(f"{port}/tcp") or []:
            if binding.get("HostPort"):
                bindings[port] = (str(binding.get("HostIp") or ""), int(binding["HostPort"]))
                break
    return bindings


def _with_bindings(
    handle: ReleaseHandle, bindings: Mapping[int, tuple[str, int]], details: Mapping[str, Any]
) -> ReleaseHandle:
    """The handle with the ports and pid the container has now."""
    # The url is built from the address Docker reports having bound, never from the request:
    # the address Docker bound the first port on, else the one the handle has.
    host = next((_reachable_host(address) for address, _ in bindings.values()), handle.host)
    return replace(
        handle,
        host=host,
        ports={port: host_port for port, (_, host_port) in bindings.items()},
        pid=int((details.get("State") or {}).get("Pid") or 0) or None,
    )


def _port_in_use(exc: RuntimeFailure, spec: ReleaseSpec) -> RuntimeFailure | None:
    """A failure naming the host port when a start failed because that port is taken, else None."""
    match = _PORT_IN_USE.search(exc.message)
    if match is None:
        return None
    port = match.group(1) or match.group(2)
    return RuntimeFailure(f"cannot start the release: host port {port} is already in use on {spec.bind or '*'}")
