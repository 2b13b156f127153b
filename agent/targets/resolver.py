"""Targets: every place a deployment's work can run, built once by the daemon.

`for_deployment` is the one place that looks at a deployment's server and at the runtime
kinds of its build and release. A new place to run is a new Target module and a line here.
"""

from __future__ import annotations

from typing import Literal

from agent.config import Config
from agent.models import Deployment
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.specs import LOCAL_SERVER
from agent.ssh import SshConnections
from agent.targets.base import Builder, Target
from agent.targets.builds import ContainerBuilder, ProcessBuilder, ServerContainerBuilder
from agent.targets.local_container import LocalContainerTarget
from agent.targets.local_process import LocalProcessTarget
from agent.targets.remote_container import RemoteContainerTarget
from agent.targets.remote_process import RemoteProcessTarget
from agent.targets.server import RemoteServer

Kind = Literal["container", "process"]


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
        self._instance = instance

        async def local_docker() -> ContainerRuntime:
            return containers

        builder = ContainerBuilder(config, local_docker, self.kill_grace_s)
        self._local: dict[Kind, Target] = {
            "container": LocalContainerTarget(config, containers, builder, self.kill_grace_s),
            "process": LocalProcessTarget(config, processes, containers, builder, self.kill_grace_s),
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

    async def ping(self) -> str:
        """This host's Docker engine version; raises Unavailable when it cannot be reached."""
        return await self._containers.ping()

    async def remove_leftovers(self, current: set[str]) -> int:
        """After a restart: removes what no deployment owns on this host (remote servers are not swept)."""
        return sum([await target.remove_leftovers(current) for target in self._local.values()])

    async def close(self) -> None:
        """Closes the runtimes of remote servers (their releases keep running)."""
        servers = list(self._servers.values())
        self._servers.clear()
        self._remote.clear()
        for server in servers:
            await server.close()

    def _remote_target(self, name: str, run: Kind, build: Kind) -> Target:
        server = self._servers.get(name)
        if server is None:
            server = self._servers[name] = RemoteServer(
                name, self.config, self._ssh, self.kill_grace_s, instance=self._instance
            )
        builder: Builder
        if build == "process":
            builder = ProcessBuilder(self.config, server.shell, self.kill_grace_s)
        else:
            builder = ServerContainerBuilder(self.config, server, self.kill_grace_s)
        if run == "process":
            return RemoteProcessTarget(self.config, server, builder, self.kill_grace_s)
        return RemoteContainerTarget(self.config, server, builder, self.kill_grace_s)
