"""SSH to the configured servers: one shared, kept-alive asyncssh connection per server.

The forwards (a server's Docker socket, release ports) live here with the connections because each
reconnect restores them; that one lifecycle is why the module runs past 400 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config import ServerConfig
from agent.errors import AgentError, NotFound, RuntimeFailure, Unavailable
from agent.lazy_import import lazy_import

asyncssh = lazy_import("asyncssh")

logger = structlog.get_logger("agent.ssh")

MAX_BACKOFF_S = 30.0
KEEPALIVE_COUNT_MAX = 3
DOCKER_SOCKET = "/var/run/docker.sock"
DOCKER_VERSION_FORMAT = "{{.Server.Version}}"

_ForwardKey = str | tuple[str, int]  # a local socket path, or (remote host, remote port)


class SshError(AgentError):
    """A configured server cannot be reached over SSH."""

    status, error_type = 502, "server_unreachable"

    def __init__(self, message: str, *, server: str) -> None:
        super().__init__(message)
        self.server = server


class HostKeyRejected(SshError):
    """The server's host key is not in its known_hosts file, or differs from the entry there."""

    error_type = "host_key_rejected"


class SshAuthFailed(SshError):
    """The server refused the agent's key, or the key could not be read."""

    error_type = "ssh_auth_failed"


class RemoteCommandError(RuntimeFailure):
    """A command run with `check=True` ended badly on a server."""

    error_type = "remote_command_failed"

    def __init__(self, server: str, command: str, exit_status: int | None, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output on stderr"
        message = f"command on server {server} exited with status {exit_status}: {detail}"
        super().__init__(message, exit_code=exit_status)
        self.server = server
        self.command = command
        self.exit_status = exit_status


@dataclass
class _Server:
    """What the pool knows about one server: its connection, failures and forwards."""

    config: ServerConfig
    connection: asyncssh.SSHClientConnection | None = None
    connecting: asyncio.Task[asyncssh.SSHClientConnection] | None = None
    failures: int = 0
    failed_at: float = 0.0
    forward_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    docker_forwards: dict[str, str] = field(default_factory=dict)  # local socket path -> remote socket path
    port_forwards: dict[tuple[str, int], int] = field(default_factory=dict)  # (remote host, port) -> local port
    listeners: dict[_ForwardKey, tuple[asyncssh.SSHClientConnection, asyncssh.SSHListener]] = field(
        default_factory=dict
    )

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.config.port}"

    def has_forwards(self) -> bool:
        return bool(self.docker_forwards or self.port_forwards)


@functools.cache
def _client_class() -> type:
    """The asyncssh client class, made on the first connection (subclassing loads asyncssh)."""

    class _Client(asyncssh.SSHClient):  # type: ignore[name-defined,misc]
        """Reports a lost connection the moment asyncssh notices it, so the next call reconnects."""

        def __init__(self, on_lost: Callable[[asyncssh.SSHClientConnection], None]) -> None:
            self._on_lost = on_lost
            self._connection: asyncssh.SSHClientConnection | None = None

        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self._connection = conn

        def connection_lost(self, exc: Exception | None) -> None:
            if self._connection is not None:
                self._on_lost(self._connection)

    return _Client


class SshConnections:
    """One asyncssh connection per configured server: opened on demand, reused, kept alive, reopened with backoff."""

    def __init__(
        self,
        servers: Mapping[str, ServerConfig],
        *,
        connect_timeout_s: float = 10.0,
        keepalive_interval_s: float = 10.0,
        use_agent: bool = False,
    ) -> None:
        self._servers = {name: _Server(config) for name, config in servers.items()}
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_interval_s = keepalive_interval_s
        self._use_agent = use_agent
        self._reconnects: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def connection(self, name: str) -> asyncssh.SSHClientConnection:
        """The open connection to server `name`, opened (after any backoff) when there is none."""
        server = self._server(name)
        if self._closed:
            raise Unavailable("SSH connections are shut down")
        if server.connection is not None:
            return server.connection
        if server.connecting is None or server.connecting.done():
            server.connecting = asyncio.create_task(self._open(server), name=f"ssh-connect-{name}")
        # Shielded: one caller giving up must not cancel the attempt the others are waiting on.
        return await asyncio.shield(server.connecting)

    async def run(
        self, name: str, command: str, *, timeout_s: float = 30.0, check: bool = False
    ) -> asyncssh.SSHCompletedProcess:
        """Runs a short command on a fresh channel of the shared connection."""
        server = self._server(name)
        conn = await self.connection(name)
        try:
            result = await conn.run(command, check=check, timeout=timeout_s)
        except asyncssh.TimeoutError:
            raise TimeoutError(f"command on server {name} did not finish within {timeout_s:g} s") from None
        except asyncssh.ProcessError as exc:
            raise RemoteCommandError(name, command, exc.exit_status, str(exc.stderr or "")) from None
        except (OSError, asyncssh.Error) as exc:
            raise SshError(
                f"lost the connection to server {name} ({server.address}) while running a command: {_reason(exc)}",
                server=name,
            ) from None
        if result.exit_status is None and result.exit_signal is None and server.connection is not conn:
            # asyncssh ends the channel without an error when the connection drops under it.
            raise SshError(
                f"lost the connection to server {name} ({server.address}) while running a command", server=name
            )
        return result

    async def forward_docker(self, name: str, local_path: Path, remote_path: str | None = None) -> None:
        """Forwards the server's Docker socket (its configured one by default) to a local unix socket."""
        server = self._server(name)
        remote_path = remote_path or _docker_socket(server.config)
        conn = await self.connection(name)
        path = str(local_path)
        async with server.forward_lock:
            known = server.docker_forwards.get(path)
            server.docker_forwards[path] = remote_path
            try:
                await self._ensure_docker_forward(server, conn, path, replace=known != remote_path)
            except OSError as exc:
                if known is None:
                    del server.docker_forwards[path]
                raise SshError(f"cannot forward {path} to server {name}: {_reason(exc)}", server=name) from None

    async def forward_port(self, name: str, remote_host: str, remote_port: int) -> int:
        """A port on 127.0.0.1 forwarded to remote_host:remote_port through the server, kept across reconnects."""
        server = self._server(name)
        conn = await self.connection(name)
        key = (remote_host, remote_port)
        async with server.forward_lock:
            known = key in server.port_forwards
            server.port_forwards.setdefault(key, 0)
            try:
                return await self._ensure_port_forward(server, conn, key)
            except OSError as exc:
                if not known:
                    del server.port_forwards[key]
                raise SshError(
                    f"cannot forward a local port to {remote_host}:{remote_port} on server {name}: {_reason(exc)}",
                    server=name,
                ) from None

    async def stop_forward_port(self, name: str, remote_host: str, remote_port: int) -> None:
        """Stops a forward made by `forward_port` (a removed release needs it no more)."""
        server = self._server(name)
        async with server.forward_lock:
            server.port_forwards.pop((remote_host, remote_port), None)
            await self._close_listener(server, (remote_host, remote_port))

    async def stop_forward_docker(self, name: str, local_path: Path) -> None:
        """Stops a forward made by `forward_docker`."""
        server = self._server(name)
        async with server.forward_lock:
            server.docker_forwards.pop(str(local_path), None)
            await self._close_listener(server, str(local_path))

    async def check(self, name: str) -> dict[str, Any]:
        """Reachability, round-trip latency and Docker version of a server; never raises for an unreachable one."""
        server = self._server(name)
        report: dict[str, Any] = {
            "name": name, "host": server.config.host, "port": server.config.port,
            "reachable": False, "latency_ms": None, "docker_version": None, "error": None,
        }
        try:
            await self.connection(name)
            started = time.perf_counter()
            await self.run(name, "true", timeout_s=self._connect_timeout_s)
        except (SshError, TimeoutError) as exc:
            report["error"] = exc.message if isinstance(exc, SshError) else str(exc)
            return report
        report["reachable"] = True
        report["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        with contextlib.suppress(SshError, TimeoutError):
            host = f"unix://{_docker_socket(server.config)}"
            command = shlex.join(["docker", "--host", host, "version", "--format", DOCKER_VERSION_FORMAT])
            docker = await self.run(name, command, timeout_s=self._connect_timeout_s)
            version = str(docker.stdout or "").strip()
            report["docker_version"] = version if docker.exit_status == 0 and version else None
        return report

    def is_connected(self, name: str) -> bool:
        """Whether server `name` has an open connection right now."""
        return self._server(name).connection is not None

    def update_servers(self, servers: Mapping[str, ServerConfig]) -> None:
        """Takes new settings for `servers` (a config reload); servers not named keep theirs.

        A new server is added, unconnected. A server whose settings changed keeps its entry
        (failures, forwards) with the new settings, and its open connection is closed: the
        next call reconnects with them, and a server with forwards reconnects at once and
        restores them on the new connection. An unchanged server keeps its connection.
        Releases on a server run under their detached supervisor and do not notice.
        """
        for name, config in servers.items():
            known = self._servers.get(name)
            if known is None:
                self._servers[name] = _Server(config)
            elif known.config != config:
                known.config = config
                if known.connection is not None:
                    logger.info("server settings changed: reconnecting", server=name)
                    known.connection.close()

    async def close(self) -> None:
        """Stops reconnecting, closes every forward and connection, and waits until they are closed."""
        self._closed = True
        tasks = [*self._reconnects.values(), *(s.connecting for s in self._servers.values() if s.connecting)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers.values():
            for key in list(server.listeners):
                await self._close_listener(server, key)
            conn, server.connection = server.connection, None
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    def _server(self, name: str) -> _Server:
        try:
            return self._servers[name]
        except KeyError:
            raise NotFound(f"server {name} is not configured") from None

    async def _open(self, server: _Server) -> asyncssh.SSHClientConnection:
        name = server.config.name
        if server.failures:
            wait_s = server.failed_at + min(2**server.failures * 0.5, MAX_BACKOFF_S) - time.monotonic()
            if wait_s > 0:
                logger.info("ssh connect backing off", server=name, wait_s=round(wait_s, 3))
                await asyncio.sleep(wait_s)
        try:
            conn = await self._connect(server)
        except SshError as exc:
            server.failures += 1
            server.failed_at = time.monotonic()
            logger.warning("ssh connect failed", server=name, error=exc.message, failures=server.failures)
            raise
        server.failures = 0
        server.connection = conn
        logger.info("ssh connected", server=name, address=server.address)
        await self._restore_forwards(server, conn)
        return conn

    async def _connect(self, server: _Server) -> asyncssh.SSHClientConnection:
        config, name = server.config, server.config.name
        options: dict[str, Any] = {}
        if config.identity_file:
            try:
                options["client_keys"] = asyncssh.load_keypairs(config.identity_file)
            except (OSError, ValueError) as exc:
                raise SshAuthFailed(
                    f"cannot use identity_file {config.identity_file} for server {name}: {_reason(exc)}", server=name
                ) from None
        if not (self._use_agent or config.use_ssh_agent):
            options["agent_path"] = None
        known_hosts = self._read_known_hosts(server)
        try:
            return await asyncssh.connect(
                config.host,
                port=config.port,
                username=config.user,
                known_hosts=known_hosts,
                # The [servers.*] table is the whole truth: no ~/.ssh/config may redirect or weaken it.
                config=None,
                password=None,
                password_auth=False,
                kbdint_auth=False,
                preferred_auth="publickey",
                keepalive_interval=self._keepalive_interval_s,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
                connect_timeout=self._connect_timeout_s,
                client_factory=lambda: _client_class()(lambda conn: self._on_lost(server, conn)),
                **options,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyRejected(self._host_key_message(server, known_hosts), server=name) from None
        except asyncssh.PermissionDenied as exc:
            identity = config.identity_file or "the default keys"
            raise SshAuthFailed(
                f"server {name} ({server.address}) refused user {config.user} with {identity}: {_reason(exc)}",
                server=name,
            ) from None
        except TimeoutError:
            raise SshError(
                f"cannot reach server {name} ({server.address}): no answer within {self._connect_timeout_s:g} s",
                server=name,
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise SshError(f"cannot reach server {name} ({server.address}): {_reason(exc)}", server=name) from None

    def _read_known_hosts(self, server: _Server) -> asyncssh.SSHKnownHosts:
        config, name = server.config, server.config.name
        if not config.known_hosts:
            raise HostKeyRejected(
                f"cannot verify the host key of server {name} ({server.address}): no known_hosts file is configured",
                server=name,
            )
        try:
            # Read on every connect, so an operator's edit takes effect at the next reconnect.
            return asyncssh.read_known_hosts(config.known_hosts)
        except (OSError, ValueError) as exc:
            raise HostKeyRejected(
                f"cannot verify the host key of server {name} ({server.address}): "
                f"known_hosts file {config.known_hosts} cannot be read: {_reason(exc)}",
                server=name,
            ) from None

    def _host_key_message(self, server: _Server, known_hosts: asyncssh.SSHKnownHosts) -> str:
        config = server.config
        port = None if config.port == 22 else config.port
        host_keys, ca_keys, *_ = known_hosts.match(config.host, config.host, port)
        which = "key mismatch" if host_keys or ca_keys else "unknown host"
        return (
            f"host key of server {config.name} ({server.address}) is not trusted: "
            f"{which} against {config.known_hosts}"
        )

    def _on_lost(self, server: _Server, conn: asyncssh.SSHClientConnection) -> None:
        if server.connection is not conn:
            return  # a failed handshake, or a connection already replaced
        server.connection = None
        name = server.config.name
        logger.warning("ssh connection lost", server=name, address=server.address)
        # Forwards serve callers that never call connection() again (health checks, docker clients): heal them now.
        if server.has_forwards() and not self._closed and name not in self._reconnects:
            task = asyncio.get_running_loop().create_task(self._reconnect(name), name=f"ssh-reconnect-{name}")
            self._reconnects[name] = task
            task.add_done_callback(lambda _: self._reconnects.pop(name, None))

    async def _reconnect(self, name: str) -> None:
        while not self._closed:
            try:
                await self.connection(name)
                return
            except SshError:
                continue  # logged by _open; connection() waits out the backoff before the next attempt

    async def _restore_forwards(self, server: _Server, conn: asyncssh.SSHClientConnection) -> None:
        name = server.config.name
        async with server.forward_lock:
            for path in list(server.docker_forwards):
                try:
                    await self._ensure_docker_forward(server, conn, path)
                except OSError as exc:
                    # Kept on record: the next forward_docker() call or reconnect tries again.
                    logger.warning("ssh docker forward failed", server=name, path=path, error=_reason(exc))
            for key in list(server.port_forwards):
                try:
                    await self._ensure_port_forward(server, conn, key)
                except OSError as exc:
                    remote = f"{key[0]}:{key[1]}"
                    logger.warning("ssh port forward failed", server=name, remote=remote, error=_reason(exc))

    async def _ensure_docker_forward(
        self, server: _Server, conn: asyncssh.SSHClientConnection, path: str, *, replace: bool = False
    ) -> None:
        current = server.listeners.get(path)
        if current is not None and current[0] is conn and not replace:
            return
        await self._close_listener(server, path)
        remote_path = server.docker_forwards[path]
        listener = await conn.forward_local_path(path, remote_path)
        server.listeners[path] = (conn, listener)
        logger.info("ssh docker forward", server=server.config.name, path=path, remote_path=remote_path)

    async def _ensure_port_forward(
        self, server: _Server, conn: asyncssh.SSHClientConnection, key: tuple[str, int]
    ) -> int:
        current = server.listeners.get(key)
        if current is not None and current[0] is conn:
            return int(current[1].get_port())
        await self._close_listener(server, key)
        remote_host, remote_port = key
        wanted = server.port_forwards.get(key, 0)
        try:
            listener = await conn.forward_local_port("127.0.0.1", wanted, remote_host, remote_port)
        except OSError as exc:
            if not wanted:
                raise
            # Keeping the port matters (callers hold URLs with it), but a new one beats no forward at all.
            logger.warning("ssh port forward moved", server=server.config.name, port=wanted, error=_reason(exc))
            listener = await conn.forward_local_port("127.0.0.1", 0, remote_host, remote_port)
        server.listeners[key] = (conn, listener)
        port = int(listener.get_port())
        server.port_forwards[key] = port
        remote = f"{remote_host}:{remote_port}"
        logger.info("ssh port forward", server=server.config.name, local_port=port, remote=remote)
        return port

    async def _close_listener(self, server: _Server, key: _ForwardKey) -> None:
        entry = server.listeners.pop(key, None)
        if entry is not None:
            entry[1].close()
            # Bounded: newer Pythons wait for forwarded connections still open on the listener.
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                await asyncio.wait_for(entry[1].wait_closed(), 5)


def _docker_socket(config: ServerConfig) -> str:
    """Where the server's Docker engine listens (`docker_socket` in its [servers.*] table)."""
    return str(getattr(config, "docker_socket", None) or DOCKER_SOCKET)


def _reason(exc: BaseException) -> str:
    """The human part of an error: asyncssh's reason, an OSError's strerror, or the text."""
    if isinstance(exc, asyncssh.DisconnectError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
