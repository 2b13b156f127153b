"""The runtimes of each server: this host, or a remote one reached over SSH.

A remote server's Docker engine is reached through its SSH connection: the
remote socket is forwarded to a local unix socket and the docker SDK points at
it, so builds and container releases behave there exactly as they do here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from agent.config import Config
from agent.health import HealthTarget
from agent.runtimes.base import ReleaseHandle, ReleaseRuntime
from agent.runtimes.container import ANY_ADDRESS, ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.remote_process import RemoteProcessRuntime
from agent.ssh import SshConnections

LOCAL = "local"
PROBE_TIMEOUT_S = 15.0
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class Servers:
    """Hands out the container, process and remote runtimes of each configured server."""

    def __init__(
        self,
        config: Config,
        ssh: SshConnections,
        containers: ContainerRuntime,
        processes: ProcessRuntime,
        instance: str | None = None,
    ) -> None:
        self.config = config
        self.ssh = ssh
        self.local_containers = containers
        self.local_processes = processes
        self._instance = instance
        self._remote_containers: dict[str, ContainerRuntime] = {}
        self._remote_processes: dict[str, RemoteProcessRuntime] = {}

    async def containers(self, server: str) -> ContainerRuntime:
        """The Docker runtime of `server`; for a remote one, through its forwarded socket."""
        if server == LOCAL:
            return self.local_containers
        socket_path = self.config.run_dir / f"docker-{server}.sock"
        # Opens (or reopens) the connection; the pool re-forwards the socket on a new one.
        await self.ssh.forward_docker(server, socket_path, self.config.servers[server].docker_socket)
        runtime = self._remote_containers.get(server)
        if runtime is None:
            settings = dataclasses.replace(self.config.docker, url=f"unix://{socket_path}")
            runtime = ContainerRuntime(
                settings,
                max_streams=self.config.agent.max_concurrent,
                kill_grace_s=self.config.agent.kill_grace_s,
                instance=self._instance,
            )
            self._remote_containers[server] = runtime
        return runtime

    def remote_processes(self, server: str) -> RemoteProcessRuntime:
        runtime = self._remote_processes.get(server)
        if runtime is None:
            runtime = RemoteProcessRuntime(
                server, lambda: self.ssh.connection(server), kill_grace_s=self.config.agent.kill_grace_s,
                state_dir=self.config.run_dir / "remote-releases" / server,
            )
            self._remote_processes[server] = runtime
        return runtime

    async def release_runtime(self, kind: str, server: str) -> ReleaseRuntime:
        if kind == "container":
            return await self.containers(server)
        return self.local_processes if server == LOCAL else self.remote_processes(server)

    def address_of(self, server: str, handle: ReleaseHandle, bind: str | None = None) -> str:
        """The address clients use for a release: the server's, unless it is bound to the server's loopback.

        Here a wildcard `bind` is reported as such (Docker bound every interface); `handle.host`,
        which health checks use, stays the loopback address that reaches it.
        """
        if server == LOCAL:
            return bind if bind and bind in ANY_ADDRESS else handle.host
        if handle.host in LOOPBACK:
            return handle.host
        return self.config.servers[server].host

    async def reach(self, server: str, handle: ReleaseHandle, port: int) -> HealthTarget | None:
        """Where the agent reaches `port` of a release: directly, or through the SSH connection."""
        host_port = handle.ports.get(port)
        if host_port is None:
            return None
        if server == LOCAL:
            return HealthTarget(handle.host, host_port)
        if handle.host in LOOPBACK:
            local_port = await self.ssh.forward_port(server, "127.0.0.1", host_port)
            return HealthTarget("127.0.0.1", local_port)
        return HealthTarget(self.config.servers[server].host, host_port)

    async def describe(self) -> list[dict[str, Any]]:
        """Every configured server with its reachability, latency and Docker version, probed at once."""
        return list(await asyncio.gather(*(self.check(name) for name in sorted(self.config.servers))))

    async def check(self, name: str) -> dict[str, Any]:
        """One server, probed now; a server in reconnect backoff answers unreachable instead of hanging."""
        try:
            return await asyncio.wait_for(self.ssh.check(name), timeout=PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            server = self.config.servers[name]
            return {
                "name": name, "host": server.host, "port": server.port, "reachable": False, "latency_ms": None,
                "docker_version": None, "error": f"no answer within {PROBE_TIMEOUT_S:g}s",
            }

    async def close(self) -> None:
        for runtime in self._remote_containers.values():
            await runtime.close()
        for remote in self._remote_processes.values():
            await remote.close()
        await self.ssh.close()
