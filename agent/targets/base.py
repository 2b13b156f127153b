"""The Target protocol: where and how one deployment's work runs, and what every target shares.

A target builds (through its `Builder`), prepares, starts, checks, stops, resumes and
removes releases, prunes what old releases leave, and finds its work again after a
restart. The engine and the release manager only call it; `Targets.for_deployment`
is the one place that looks at a deployment's server and runtime kinds.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

from agent.config import Config
from agent.errors import BuildFailed, BuildTimedOut
from agent.health import HealthTarget
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment, RunSpec
from agent.runtimes.base import ANY_ADDRESS, ReleaseHandle, ReleaseRuntime, ReleaseSpec, ReleaseState

StopWork = Callable[[], Awaitable[object]]
LOOPBACK_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class Built:
    """A build that succeeded: its exit code and, when one was committed, its image."""

    exit_code: int
    image: str | None = None


class BuildWatch(Protocol):
    """What a build tells the engine as it goes, and how the engine stops it."""

    def raise_if_stopped(self) -> None:
        """Raises StopRequested once the deployment was asked to stop."""

    async def building(self) -> None:
        """The source is ready and the build proper starts (raises StopRequested instead if asked to stop)."""

    def stop_with(self, stop: StopWork) -> None:
        """How to stop the build's work from now on."""

    async def started(
        self, *, container_id: str | None = None, pid: int | None = None, pid_started_at: float | None = None
    ) -> None:
        """The build's work runs; records where, and stops it at once if a stop was asked meanwhile."""


class Builder(Protocol):
    """How a target runs a deployment's build."""

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        """Prepares the source and runs the build; raises BuildFailed, BuildTimedOut or StopRequested."""

    async def finish(self, deployment: Deployment, *, kept: bool) -> None:
        """After the deployment: removes what the build left unless a release serves from it (`kept`)."""

    async def stop_work(self, deployment: Deployment) -> int:
        """After a restart: stops at once what an interrupted build left running; returns how many."""


@runtime_checkable
class ReattachingBuilder(Builder, Protocol):
    """A builder whose builds outlive the agent and are taken back after a restart (every builder today)."""

    async def reattach(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        """Follows the interrupted build again and ends it as `build` does; None when its work vanished."""


class Place(Protocol):
    """This host or a server: how clients and the agent reach a release there."""

    # A remote server may be away for a while: its failures after a restart are warnings, not
    # reasons to retry the whole recovery, and its releases are settled in the background.
    may_be_away: bool

    def address_of(self, handle: ReleaseHandle, bind: str | None = None) -> str:
        """The address clients use for the release (`bind`: the host address it was asked to listen on)."""

    async def reach(self, handle: ReleaseHandle, port: int) -> HealthTarget | None:
        """Where the agent reaches `port` of the release, if it is published."""


class ThisHost:
    """This host as a place to run: a release is reached where it listens."""

    may_be_away = False

    def address_of(self, handle: ReleaseHandle, bind: str | None = None) -> str:
        # A wildcard bind is reported as such (Docker bound every interface); `handle.host`,
        # which health checks use, stays the loopback address that reaches it.
        return bind if bind is not None and bind in ANY_ADDRESS else handle.host

    async def reach(self, handle: ReleaseHandle, port: int) -> HealthTarget | None:
        host_port = handle.ports.get(port)
        return None if host_port is None else HealthTarget(handle.host, host_port)


class Target(Protocol):
    """Where and how one deployment's work runs: here or on a server, in a container or a process."""

    @property
    def may_be_away(self) -> bool:
        """Whether its place may be unreachable for a while (a remote server; see Place)."""

    checks_health_itself: bool

    async def converge(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> dict[str, Any] | None:
        """Where `checks_health_itself`: waits until the release is healthy as its orchestrator sees it
        (raises ReleaseUnhealthy otherwise) and returns its smoke_test."""

    # --- builds ---------------------------------------------------------------------------

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        """Prepares the source and runs the build; raises BuildFailed, BuildTimedOut or StopRequested."""

    async def finish_build(self, deployment: Deployment, *, kept: bool) -> None:
        """After the deployment: removes what its build left, unless its release runs from it (`kept`)."""

    @property
    def reattaches_builds(self) -> bool:
        """Whether an interrupted build of this target is taken back after a restart (else stopped and failed)."""

    async def reattach_build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        """After a restart: takes an interrupted build back and ends it as `build` does; None when its work vanished.

        Its log continues where it stopped; the watch hears where the work runs and how to stop
        it. Raises BuildFailed, BuildTimedOut or StopRequested as `build` does. A target that
        does not `reattaches_builds` always answers None: the engine stops what such a build
        left (`stop_interrupted`) and fails it.
        """

    async def stop_interrupted(self, deployment: Deployment) -> int:
        """After a restart: stops and removes what an interrupted deployment left; returns how many things."""

    # --- releases -------------------------------------------------------------------------

    def fixed_port(self, run: RunSpec) -> int | None:
        """The host port the release takes for itself, which a previous release must free first."""

    async def prepare_release(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        """Makes the release's working directory and ports ready; returns how to start it."""

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the release; its output goes to the deployment's log."""

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Whether it runs, its exit code if it ended, how often it was restarted."""

    async def health_target(self, handle: ReleaseHandle, port: int, run: RunSpec) -> HealthTarget | None:
        """Where the agent reaches `port` of the release to check it (through SSH when it must)."""

    def url_of(self, handle: ReleaseHandle, port: int | None, bind: str | None = None) -> str | None:
        """The URL clients use for `port` of the release, if it is published (`bind`: the run's bind address)."""

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """Its last output lines, for the error of a release that died."""

    async def promote(self, handle: ReleaseHandle) -> None:
        """The release is in service: let it survive crashes and restarts where the runtime can."""

    async def stop_release(self, handle: ReleaseHandle) -> None:
        """Stops it (SIGTERM, the agent's kill grace, SIGKILL) but keeps it resumable."""

    async def remove_release(self, handle: ReleaseHandle, *, immediately: bool = False) -> None:
        """Stops it and removes everything of it; `immediately` gives it no grace."""

    async def resume_release(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> ReleaseHandle:
        """Starts a stopped release of `deployment` again; returns its new handle."""

    async def reattach_release(self, deployment: Deployment, handle: ReleaseHandle, policy: LogPolicy) -> ReleaseHandle:
        """After a restart: follows a running release's output again; returns its handle as it is now."""

    # --- retention and leftovers ----------------------------------------------------------

    async def can_bring_back(self, deployment: Deployment) -> bool:
        """Whether what the release of `deployment` runs from is still there (for a rollback)."""

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        """Removes the application's release images except `keep`; `recorded` is every image its releases name."""

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        """Removes the files an old release ran from, unless a kept release runs from them too."""

    async def remove_leftovers(self, current: set[str]) -> int:
        """After a restart: removes work of this agent no deployment owns (not the releases in `current`)."""


class TargetBase:
    """What every target does alike: builds through its builder, releases through its runtime."""

    def __init__(self, config: Config, place: Place, builder: Builder, kill_grace_s: float) -> None:
        self.config = config
        self.place = place
        self.builder = builder
        self.kill_grace_s = kill_grace_s

    # Whether the target itself knows when a release is healthy (Swarm checks inside its tasks):
    # then the release manager waits on `converge` instead of probing the release from the agent.
    checks_health_itself = False

    @property
    def may_be_away(self) -> bool:
        return self.place.may_be_away

    async def converge(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> dict[str, Any] | None:
        raise NotImplementedError

    async def runtime(self) -> ReleaseRuntime:
        """The runtime this target's releases run in."""
        raise NotImplementedError

    async def resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        """How to start a stopped release of `deployment` again."""
        raise NotImplementedError

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        return await self.builder.build(deployment, log, watch)

    async def finish_build(self, deployment: Deployment, *, kept: bool) -> None:
        await self.builder.finish(deployment, kept=kept)

    @property
    def reattaches_builds(self) -> bool:
        return isinstance(self.builder, ReattachingBuilder)

    async def reattach_build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        if not isinstance(self.builder, ReattachingBuilder):
            return None  # a builder that cannot take builds back: the engine stops what it left and fails it
        return await self.builder.reattach(deployment, log, watch)

    async def stop_interrupted(self, deployment: Deployment) -> int:
        removed = await self.builder.stop_work(deployment)
        await self.builder.finish(deployment, kept=False)
        return removed

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        return await (await self.runtime()).start_release(spec, log)

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        return await (await self.runtime()).release_state(handle)

    async def health_target(self, handle: ReleaseHandle, port: int, run: RunSpec) -> HealthTarget | None:
        return await self.place.reach(handle, port)

    def url_of(self, handle: ReleaseHandle, port: int | None, bind: str | None = None) -> str | None:
        if port is None or port not in handle.ports:
            return None
        address = self.place.address_of(handle, bind)
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{handle.ports[port]}"

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        return await (await self.runtime()).last_output(handle, lines)

    async def promote(self, handle: ReleaseHandle) -> None:
        return None

    async def stop_release(self, handle: ReleaseHandle) -> None:
        await (await self.runtime()).stop_release(handle, self.kill_grace_s)

    async def remove_release(self, handle: ReleaseHandle, *, immediately: bool = False) -> None:
        await (await self.runtime()).remove_release(handle, 0 if immediately else self.kill_grace_s)

    async def resume_release(self, deployment: Deployment, handle: ReleaseHandle, log: DeploymentLog) -> ReleaseHandle:
        spec = await self.resume_spec(deployment, handle)
        return await (await self.runtime()).resume_release(handle, spec, log)

    async def reattach_release(self, deployment: Deployment, handle: ReleaseHandle, policy: LogPolicy) -> ReleaseHandle:
        return handle

    async def remove_leftovers(self, current: set[str]) -> int:
        return 0

    def limits(self, run: RunSpec) -> dict[str, Any]:
        """The release's limits: the run's own, else the [docker] release_* defaults."""
        docker = self.config.docker
        return {
            "memory": run.memory or docker.release_memory_bytes,
            "cpus": run.cpus or docker.release_cpus,
            "pids": run.pids or docker.release_pids,
        }

    def release_spec(
        self, deployment: Deployment, *, ports: list[int], image: str | None = None, workdir: Path | None = None,
        export_port: bool = False,
    ) -> ReleaseSpec:
        """How to start the release of `deployment` on `ports`; `export_port` sets PORT unless its env does."""
        run = deployment.spec.run
        assert run is not None
        env = dict(run.env)
        if export_port:
            env.setdefault("PORT", str(ports[0]))
        return ReleaseSpec(
            deployment_id=deployment.id, application=deployment.application, runtime=run.runtime,
            command=run.command, env=env, log_path=Path(deployment.log_path), ports=tuple(ports), image=image,
            host_port=run.host_port, bind=run.bind, workdir=workdir, **self.limits(run),
        )

    def stopped_release_spec(
        self, deployment: Deployment, handle: ReleaseHandle, workdir: Path | None = None, export_port: bool = False
    ) -> ReleaseSpec:
        """How to start the stopped release of `handle` again, on the ports it had."""
        run = deployment.spec.run
        assert run is not None
        env = dict(run.env)
        ports = tuple(handle.ports)
        if export_port and ports:
            env.setdefault("PORT", str(ports[0]))
        return ReleaseSpec(
            deployment_id=deployment.id, application=deployment.application, runtime=handle.runtime,
            command=run.command, env=env, log_path=Path(deployment.log_path), ports=ports,
            image=deployment.release_image, host_port=run.host_port, bind=run.bind, workdir=workdir,
            **self.limits(run),
        )


def release_ports(deployment: Deployment) -> list[int]:
    """The ports a release listens on: run.port and, when it differs, health_check.port."""
    run = deployment.spec.run
    health = deployment.spec.health_check
    ports = [run.port] if run is not None and run.port else []
    if health is not None and health.port and health.port not in ports:
        ports.append(health.port)
    return ports


def check_build(
    watch: BuildWatch, timeout_s: float, exit_code: int | None, timed_out: bool, image: str | None = None
) -> Built:
    """A build's end as the engine sees it: stopped on request, timed out, failed, or done."""
    watch.raise_if_stopped()
    if timed_out:
        raise BuildTimedOut(f"build timed out after {timeout_s:g}s and was killed", exit_code=exit_code)
    if exit_code != 0:
        raise BuildFailed(f"build command exited with code {exit_code}", exit_code=exit_code)
    return Built(exit_code, image)


def workspace_of(config: Config, deployment_id: str) -> Path:
    """The scratch directory on this host a deployment's source is prepared in."""
    return config.workspaces_dir / deployment_id


def free_local_port() -> int:
    """A TCP port nothing listens on on this host's loopback right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK_ADDRESS, 0))
        return int(sock.getsockname()[1])
