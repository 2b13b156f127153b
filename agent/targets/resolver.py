"""Targets: every place a deployment's work can run, built once by the daemon.

`for_deployment` is the one place that looks at a deployment's server and at the runtime
kinds of its build and release. A new place to run is a new Target module and a line here.
Each place with a Docker engine has an availability gate (agent.targets.availability) that
`ready` consults before a deployment that needs the engine starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from agent.config import Config
from agent.errors import Unavailable
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.specs import LOCAL_SERVER
from agent.ssh import SshConnections
from agent.targets.availability import EngineGate, OutageAwareBuilder, tell_waiting
from agent.targets.base import Builder, Built, BuildWatch, Target
from agent.targets.builds import ContainerBuilder, ProcessBuilder, ServerContainerBuilder
from agent.targets.local_container import LocalContainerTarget
from agent.targets.local_process import LocalProcessTarget
from agent.targets.remote_container import RemoteContainerTarget
from agent.targets.remote_process import RemoteProcessTarget
from agent.targets.server import RemoteServer
from agent.targets.swarm import SwarmTarget
from agent.runtimes.swarm import SwarmRuntime

Kind = Literal["container", "process", "swarm"]


class Targets:
    """Resolves each deployment to its target; owns the runtimes of remote servers it makes on first use.

    The SSH connections and this host's runtimes are the caller's: it opens and closes them.
    """

    def __init__(
        self,
        config: Config,
        ssh: SshConnections,
        containers: ContainerRuntime,
        processes: ProcessRuntime,
        *,
        instance: str | None = None,
    ) -> None:
        self.config = config
        self.kill_grace_s = config.agent.kill_grace_s
        self._ssh = ssh
        self._containers = containers
        self._processes = processes
        self._instance = instance

        async def local_docker() -> ContainerRuntime:
            return containers

        self._local_gate = EngineGate(LOCAL_SERVER, containers.ping)
        self._gates: dict[str, EngineGate] = {LOCAL_SERVER: self._local_gate}
        builder = self._outage_aware(ContainerBuilder(config, local_docker, self.kill_grace_s), self._local_gate)
        self._local: dict[Kind, Target] = {
            "container": LocalContainerTarget(config, containers, builder, self.kill_grace_s),
            "process": LocalProcessTarget(config, processes, containers, builder, self.kill_grace_s),
            "swarm": SwarmTarget(config, containers, SwarmRuntime(containers, config.registry), builder,
                                 self.kill_grace_s),
        }
        self._servers: dict[str, RemoteServer] = {}
        self._remote: dict[tuple[str, Kind, Kind], Target] = {}

    def for_deployment(self, deployment: Deployment) -> Target:
        """Where `deployment` runs: its server, with the runtimes its build and its release ask for."""
        spec = deployment.spec
        build: Kind = spec.build.runtime if spec.build is not None else "container"
        run: Kind = spec.run.runtime if spec.run is not None else build
        if deployment.server == LOCAL_SERVER:
            return self._local[run]  # a build here always runs in a container
        key = (deployment.server, run, build)
        target = self._remote.get(key)
        if target is None:
            target = self._remote[key] = self._remote_target(*key)
        return target

    async def ready(self, deployment: Deployment, on_ready: Callable[[], None]) -> bool:
        """Whether `deployment` may start now: True unless the Docker engine it needs is unreachable.

        While it is, the deployment's log says once that it waits, and `on_ready()` is called
        when the engine answers again.
        """
        if not self._needs_docker(deployment):
            return True
        gate = self._gate_of(deployment.server)
        if await gate.ready(on_ready):
            return True
        if gate.first_to_tell(deployment.id):
            policy = LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)
            with DeploymentLog(Path(deployment.log_path), policy) as log:
                tell_waiting(deployment, log, gate)
        return False

    async def process_isolation(self) -> str:
        """What keeps this host's process releases together: a cgroup each, or process groups only."""
        return await self._processes.isolation()

    async def ping(self) -> str:
        """This host's Docker engine version; raises Unavailable with the reason alone when it cannot be reached."""
        try:
            return await self._local_gate.ping()
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - /healthz reports any failure as the engine's
            raise Unavailable(str(exc) or type(exc).__name__) from exc

    async def remove_leftovers(self, current: set[str]) -> int:
        """After a restart: removes what no deployment owns on this host (remote servers are not swept)."""
        return sum([await target.remove_leftovers(current) for target in self._local.values()])

    def swarm(self) -> SwarmTarget:
        """The target of swarm applications (this engine's swarm)."""
        target = self._local["swarm"]
        assert isinstance(target, SwarmTarget)
        return target

    async def close(self) -> None:
        """Closes the runtimes of remote servers (their releases keep running)."""
        servers = list(self._servers.values())
        self._servers.clear()
        self._remote.clear()
        for gate in self._gates.values():
            await gate.close()
        for server in servers:
            await server.close()

    def _remote_target(self, name: str, run: Kind, build: Kind) -> Target:
        server = self._server(name)
        builder: Builder
        if build == "process":
            builder = ProcessBuilder(self.config, server.shell, self.kill_grace_s)
        else:
            builder = self._outage_aware(ServerContainerBuilder(self.config, server, self.kill_grace_s), self._gate_of(name))
        if run == "process":
            return RemoteProcessTarget(self.config, server, builder, self.kill_grace_s)
        return RemoteContainerTarget(self.config, server, builder, self.kill_grace_s)

    def _gate_of(self, server: str) -> EngineGate:
        """The availability gate of the Docker engine at `server` (this host's for LOCAL_SERVER)."""
        gate = self._gates.get(server)
        if gate is None:
            remote = self._server(server)

            async def ping() -> str:
                return await (await remote.docker()).ping()

            gate = self._gates[server] = EngineGate(server, ping)
        return gate

    def _server(self, name: str) -> RemoteServer:
        server = self._servers.get(name)
        if server is None:
            server = self._servers[name] = RemoteServer(
                name, self.config, self._ssh, self.kill_grace_s, instance=self._instance
            )
        return server

    def _outage_aware(self, builder: ContainerBuilder, gate: EngineGate) -> Builder:
        """`builder`, riding out an outage of its engine; re-adoption is the deployment's target's."""

        async def reattach(deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
            return await self.for_deployment(deployment).reattach_build(deployment, log, watch)

        return OutageAwareBuilder(builder, gate, reattach)

    @staticmethod
    def _needs_docker(deployment: Deployment) -> bool:
        """Whether its build or its release runs in a container (a build here always does)."""
        spec = deployment.spec
        build = spec.build is not None and (deployment.server == LOCAL_SERVER or spec.build.runtime == "container")
        return build or (spec.run is not None and spec.run.runtime in ("container", "swarm"))
