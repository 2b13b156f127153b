"""One remote server's runtimes, reached over its SSH connection.

The server's Docker engine is reached through its SSH connection: the remote socket is
forwarded to a local unix socket and the docker SDK points at it, so builds and container
releases behave there exactly as they do here. Host processes run through a
RemoteProcessRuntime on the same connection.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from agent.config import Config
from agent.health import HealthTarget
from agent.models import Deployment
from agent.runtimes.base import ReleaseHandle
from agent.runtimes.container import ContainerRuntime
from agent.ssh import SshConnections
from agent.targets.base import LOOPBACK_ADDRESS
from agent.targets.container import prune_release_images

if TYPE_CHECKING:
    from agent.runtimes.remote import RemoteProcessRuntime

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class RemoteServer:
    """A configured server as a place to run: its Docker engine and its shell; closed by its Targets."""

    may_be_away = True

    def __init__(
        self, name: str, config: Config, ssh: SshConnections, kill_grace_s: float, *, instance: str | None = None
    ) -> None:
        self.name = name
        self.config = config
        self._ssh = ssh
        self._kill_grace_s = kill_grace_s
        self._instance = instance
        # Imported with the first server: it loads asyncssh, which an agent without servers never needs.
        from agent.runtimes.remote import RemoteProcessRuntime

        self.shell: RemoteProcessRuntime = RemoteProcessRuntime(
            name, lambda: ssh.connection(name), kill_grace_s=kill_grace_s,
            state_dir=config.run_dir / "remote-releases" / name,
        )
        self._docker: ContainerRuntime | None = None

    async def docker(self) -> ContainerRuntime:
        """The server's Docker engine, through its forwarded socket."""
        socket_path = self.config.run_dir / f"docker-{self.name}.sock"
        # Opens (or reopens) the connection; the pool re-forwards the socket on a new one.
        await self._ssh.forward_docker(self.name, socket_path, self.config.servers[self.name].docker_socket)
        if self._docker is None:
            settings = dataclasses.replace(self.config.docker, url=f"unix://{socket_path}")
            self._docker = ContainerRuntime(
                settings, max_streams=self.config.agent.max_concurrent, kill_grace_s=self._kill_grace_s,
                instance=self._instance, engine_here=False,
            )
        return self._docker

    def address_of(self, handle: ReleaseHandle, bind: str | None = None) -> str:
        """The address clients use for a release: the server's, unless it is bound to the server's loopback."""
        return handle.host if handle.host in LOOPBACK else self.config.servers[self.name].host

    async def reach(self, handle: ReleaseHandle, port: int) -> HealthTarget | None:
        """Where the agent reaches `port` of a release: the server's address, or through the SSH connection."""
        host_port = handle.ports.get(port)
        if host_port is None:
            return None
        if handle.host in LOOPBACK:
            local_port = await self._ssh.forward_port(self.name, LOOPBACK_ADDRESS, host_port)
            return HealthTarget(LOOPBACK_ADDRESS, local_port)
        return HealthTarget(self.config.servers[self.name].host, host_port)

    def release_dir(self, deployment_id: str) -> str:
        """Where a process release (and the process build before it) keeps its files on the server."""
        return self.shell.layout.release_dir(deployment_id)

    async def prune_images(self, application: str, keep: set[str], recorded: set[str]) -> list[str]:
        """Removes the application's release images but `keep` from the server's Docker engine.

        A server serving only host processes may have no Docker engine to ask: with no image
        `recorded` by any release, nothing is asked.
        """
        if not recorded:
            return []
        return await prune_release_images(await self.docker(), application, keep)

    async def remove_release_files(self, deployment: Deployment, kept_origins: set[str]) -> None:
        """Removes the directory an old release ran in, unless a kept one (a rollback of it) runs there too."""
        origin = deployment.release_from or deployment.id
        if origin not in kept_origins:
            await self.shell.remove_dir(self.release_dir(origin))

    async def close(self) -> None:
        """Stops following releases and closes the Docker client; the SSH connection is its owner's."""
        if self._docker is not None:
            await self._docker.close()
        await self.shell.close()
