"""SshConnections against real OpenSSH servers (tests/sshd.py): no mocks of asyncssh."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import docker
import psutil
import pytest

from agent.config import ServerConfig
from agent.errors import NotFound, Unavailable
from agent.ssh import HostKeyRejected, RemoteCommandError, SshAuthFailed, SshConnections, SshError
from tests.sshd import SshServer, free_port, keygen

Factory = Callable[..., SshConnections]


def server_config(server: SshServer, name: str = "edge-1", **changes: object) -> ServerConfig:
    """The [servers.*] entry a config file would give for this sshd."""
    values: dict[str, object] = {
        "name": name, "host": server.host, "port": server.port, "user": server.user,
        "identity_file": str(server.identity_file), "known_hosts": str(server.known_hosts),
    }
    values.update(changes)
    return ServerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def make_pool() -> AsyncIterator[Factory]:
    """Builds SshConnections and closes every one of them at the end of the test."""
    pools: list[SshConnections] = []

    def make(*configs: ServerConfig, **options: object) -> SshConnections:
        options.setdefault("connect_timeout_s", 5.0)
        pool = SshConnections({config.name: config for config in configs}, **options)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


def sessions(server: SshServer) -> list[psutil.Process]:
    """The per-connection sshd processes (direct children of the listening sshd)."""
    return psutil.Process(server.process.pid).children()


def reconnected(pool: SshConnections, name: str, server: SshServer, dropped: set[int]) -> bool:
    """Whether `name` is connected again through a session other than the dropped ones."""
    fresh = [process for process in sessions(server) if process.pid not in dropped]
    return pool.is_connected(name) and len(fresh) == 1


def drop_sessions(server: SshServer) -> set[int]:
    """Simulates a network drop: SIGKILL every server-side process of every connection; returns their sessions."""
    dropped = {process.pid for process in sessions(server)}
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return dropped


def runs_on(server: SshServer, program: str) -> bool:
    """Whether some process of the server's sessions runs `program`."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if process.name() == program:
                return True
        except psutil.NoSuchProcess:
            pass
    return False


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Polls `predicate` until it holds, failing the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def test_connect_and_run_returns_remote_pid(sshd: SshServer, make_pool: Factory) -> None:
    """A command runs on the server over the shared connection and reports its PID."""
    pool = make_pool(server_config(sshd))
    result = await pool.run("edge-1", "echo $$", check=True)
    assert result.exit_status == 0
    assert int(str(result.stdout).strip()) > 1
    assert pool.is_connected("edge-1")


async def test_connection_is_reused(sshd: SshServer, make_pool: Factory) -> None:
    """Two calls, concurrent callers and several commands share one connection (one sshd session)."""
    pool = make_pool(server_config(sshd))
    first = await pool.connection("edge-1")
    assert await pool.connection("edge-1") is first
    await pool.run("edge-1", "true")
    await pool.run("edge-1", "true")
    assert len(sessions(sshd)) == 1


async def test_concurrent_callers_share_one_connect(sshd: SshServer, make_pool: Factory) -> None:
    """Concurrent connection() calls for one server open exactly one connection."""
    pool = make_pool(server_config(sshd))
    connections = await asyncio.gather(*(pool.connection("edge-1") for _ in range(8)))
    assert all(conn is connections[0] for conn in connections)
    assert len(sessions(sshd)) == 1


async def test_unknown_server_name_is_not_found(make_pool: Factory) -> None:
    """A server name that is not configured raises NotFound."""
    pool = make_pool()
    with pytest.raises(NotFound):
        await pool.connection("nope")
    with pytest.raises(NotFound):
        pool.is_connected("nope")


async def test_unknown_host_key_is_rejected(sshd: SshServer, make_pool: Factory, tmp_path: Path) -> None:
    """An empty known_hosts file rejects the server as an unknown host, naming server, address and file."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    pool = make_pool(server_config(sshd, known_hosts=str(known_hosts)))
    with pytest.raises(HostKeyRejected) as caught:
        await pool.connection("edge-1")
    message = caught.value.message
    assert "unknown host" in message
    assert "edge-1" in message and f"{sshd.host}:{sshd.port}" in message and str(known_hosts) in message
    assert caught.value.error_type == "host_key_rejected" and caught.value.status == 502
    assert not pool.is_connected("edge-1")


async def test_host_key_mismatch_is_rejected(sshd: SshServer, make_pool: Factory, tmp_path: Path) -> None:
    """A known_hosts entry with a different key for the same host:port rejects the server as a mismatch."""
    other = keygen(tmp_path / "other_host_key")
    key_type, key_data = other.split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {key_type} {key_data}\n")
    pool = make_pool(server_config(sshd, known_hosts=str(known_hosts)))
    with pytest.raises(HostKeyRejected, match="key mismatch"):
        await pool.connection("edge-1")


async def test_missing_known_hosts_file_is_rejected(sshd: SshServer, make_pool: Factory, tmp_path: Path) -> None:
    """A known_hosts file that cannot be read never falls back to trusting the server."""
    pool = make_pool(server_config(sshd, known_hosts=str(tmp_path / "absent")))
    with pytest.raises(HostKeyRejected, match="cannot be read"):
        await pool.connection("edge-1")


async def test_wrong_client_key_fails_auth(sshd: SshServer, make_pool: Factory, tmp_path: Path) -> None:
    """A key the server does not authorize raises SshAuthFailed."""
    keygen(tmp_path / "id_other")
    pool = make_pool(server_config(sshd, identity_file=str(tmp_path / "id_other")))
    with pytest.raises(SshAuthFailed) as caught:
        await pool.connection("edge-1")
    assert caught.value.error_type == "ssh_auth_failed"
    assert "edge-1" in caught.value.message


async def test_refused_port_is_unreachable_quickly(make_pool: Factory, sshd: SshServer) -> None:
    """A port nobody listens on raises SshError at once, naming the server and its address."""
    port = free_port()
    pool = make_pool(server_config(sshd, port=port), connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(SshError) as caught:
        await pool.connection("edge-1")
    assert time.monotonic() - started < 1.0
    assert type(caught.value) is SshError and caught.value.error_type == "server_unreachable"
    assert f"cannot reach server edge-1 (127.0.0.1:{port})" in caught.value.message


async def test_silent_port_times_out(make_pool: Factory, sshd: SshServer) -> None:
    """A port that accepts but never speaks SSH fails after the connect timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        pool = make_pool(server_config(sshd, port=silent.getsockname()[1]), connect_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(SshError, match="no answer within 0.5 s"):
            await pool.connection("edge-1")
        assert time.monotonic() - started < 3.0


async def test_backoff_delays_the_next_attempt(make_pool: Factory, sshd: SshServer) -> None:
    """After a failed connect the next attempt waits out the backoff (1 s after one failure), not failing at once."""
    pool = make_pool(server_config(sshd, port=free_port()), connect_timeout_s=1.0)
    with pytest.raises(SshError):
        await pool.connection("edge-1")
    started = time.monotonic()
    with pytest.raises(SshError):
        await pool.connection("edge-1")
    assert 0.8 <= time.monotonic() - started < 3.0


async def test_failure_is_not_cached_and_success_resets_backoff(
    sshd: SshServer, make_pool: Factory, tmp_path: Path
) -> None:
    """A host-key failure is not remembered: once the file is fixed the next call connects, and backoff is reset."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    pool = make_pool(server_config(sshd, known_hosts=str(known_hosts)))
    with pytest.raises(HostKeyRejected):
        await pool.connection("edge-1")
    known_hosts.write_text(sshd.known_hosts.read_text())
    await pool.connection("edge-1")
    assert pool.is_connected("edge-1")
    drop_sessions(sshd)
    await wait_for(lambda: not pool.is_connected("edge-1"))
    started = time.monotonic()
    await pool.connection("edge-1")
    assert time.monotonic() - started < 0.5


async def test_dropped_connection_reconnects(sshd: SshServer, make_pool: Factory) -> None:
    """When the server side of the connection dies, the next call opens a new connection and commands work."""
    pool = make_pool(server_config(sshd))
    first = await pool.connection("edge-1")
    drop_sessions(sshd)
    await wait_for(lambda: not pool.is_connected("edge-1"))
    second = await pool.connection("edge-1")
    assert second is not first
    result = await pool.run("edge-1", "echo ok", check=True)
    assert str(result.stdout).strip() == "ok"


async def test_drop_during_command_raises_ssh_error(sshd: SshServer, make_pool: Factory) -> None:
    """A connection that dies under a running command raises SshError, not an empty result."""
    pool = make_pool(server_config(sshd))
    await pool.connection("edge-1")
    running = asyncio.create_task(pool.run("edge-1", "sleep 30"))
    await wait_for(lambda: runs_on(sshd, "sleep"))
    drop_sessions(sshd)
    with pytest.raises(SshError, match="lost the connection to server edge-1"):
        await asyncio.wait_for(running, 10)


async def test_run_check_and_timeout(sshd: SshServer, make_pool: Factory) -> None:
    """check=True turns a failing exit into RemoteCommandError; a slow command raises TimeoutError."""
    pool = make_pool(server_config(sshd))
    result = await pool.run("edge-1", "exit 3")
    assert result.exit_status == 3
    with pytest.raises(RemoteCommandError) as caught:
        await pool.run("edge-1", "echo boom >&2; exit 3", check=True)
    assert caught.value.exit_code == 3 and "boom" in caught.value.message
    with pytest.raises(TimeoutError):
        await pool.run("edge-1", "sleep 5", timeout_s=0.3)
    assert pool.is_connected("edge-1")


async def test_check_reachable_server(sshd: SshServer, make_pool: Factory, docker_client: docker.DockerClient) -> None:
    """check() on a reachable server reports latency and the Docker version it runs."""
    pool = make_pool(server_config(sshd))
    report = await pool.check("edge-1")
    assert report["reachable"] is True and report["error"] is None
    assert report["name"] == "edge-1" and report["host"] == sshd.host and report["port"] == sshd.port
    assert report["latency_ms"] > 0
    assert report["docker_version"] == docker_client.version()["Version"]


async def test_check_unreachable_server(make_pool: Factory, sshd: SshServer) -> None:
    """check() on an unreachable server reports the error instead of raising."""
    pool = make_pool(server_config(sshd, port=free_port()), connect_timeout_s=1.0)
    report = await pool.check("edge-1")
    assert report["reachable"] is False
    assert report["latency_ms"] is None and report["docker_version"] is None
    assert "cannot reach server edge-1" in report["error"]


def docker_version(socket_path: Path) -> str:
    """The engine version seen through a unix socket (blocking: run it in a thread)."""
    client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=10)
    try:
        return str(client.version()["Version"])
    finally:
        client.close()


async def test_forward_docker_survives_a_drop(
    sshd: SshServer, make_pool: Factory, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """The remote Docker socket answers on a local unix socket, and again after the connection is re-made."""
    pool = make_pool(server_config(sshd))
    local = tmp_path / "edge-1-docker.sock"
    await pool.forward_docker("edge-1", local)
    expected = docker_client.version()["Version"]
    assert await asyncio.to_thread(docker_version, local) == expected
    first = await pool.connection("edge-1")
    dropped = drop_sessions(sshd)
    # Nobody calls connection(): the pool re-opens it by itself because a forward depends on it.
    await wait_for(lambda: reconnected(pool, "edge-1", sshd, dropped))
    assert await pool.connection("edge-1") is not first
    assert await asyncio.to_thread(docker_version, local) == expected


def fetch(port: int) -> str:
    """GET / on 127.0.0.1:port (blocking: run it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode()


async def test_forward_port_to_the_remote_loopback(
    sshd_remote: SshServer, make_pool: Factory, tmp_path: Path
) -> None:
    """A port bound to the remote server's own loopback is reachable through forward_port, also after a drop."""
    assert sshd_remote.namespace is not None
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from the remote loopback\n")
    remote_port = 18080
    httpd = subprocess.Popen(
        ["ip", "netns", "exec", sshd_remote.namespace, "busybox", "httpd", "-f", "-p", f"127.0.0.1:{remote_port}",
         "-h", str(site)],
    )
    try:
        pool = make_pool(server_config(sshd_remote, name="edge-2"))
        port = await pool.forward_port("edge-2", "127.0.0.1", remote_port)
        assert await pool.forward_port("edge-2", "127.0.0.1", remote_port) == port

        async def serves() -> bool:
            try:
                return "remote loopback" in await asyncio.to_thread(fetch, port)
            except OSError:
                return False

        await wait_for(serves)
        dropped = drop_sessions(sshd_remote)
        await wait_for(lambda: reconnected(pool, "edge-2", sshd_remote, dropped))
        await wait_for(serves)
        assert await pool.forward_port("edge-2", "127.0.0.1", remote_port) == port
        await pool.stop_forward_port("edge-2", "127.0.0.1", remote_port)
        with pytest.raises(OSError):
            await asyncio.to_thread(fetch, port)
    finally:
        httpd.terminate()
        httpd.wait(timeout=10)


async def test_server_at_its_own_address(sshd_remote: SshServer, make_pool: Factory) -> None:
    """A server in its own network namespace is reached at its own address."""
    pool = make_pool(server_config(sshd_remote, name="edge-2"))
    result = await pool.run("edge-2", "echo $SSH_CONNECTION", check=True)
    assert sshd_remote.host in str(result.stdout).split()
    report = await pool.check("edge-2")
    assert report["reachable"] is True and report["port"] == 22


async def test_close_ends_sessions_and_refuses_new_work(sshd: SshServer, make_pool: Factory) -> None:
    """close() ends the server-side session and later calls raise Unavailable."""
    pool = make_pool(server_config(sshd))
    await pool.connection("edge-1")
    await pool.close()
    assert not pool.is_connected("edge-1")
    await wait_for(lambda: not sessions(sshd))
    with pytest.raises(Unavailable):
        await pool.connection("edge-1")


async def test_agent_is_not_consulted_by_default(
    sshd: SshServer, make_pool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ssh-agent is consulted unless asked: with SSH_AUTH_SOCK pointing nowhere the configured key still works."""
    monkeypatch.setenv("SSH_AUTH_SOCK", "/nonexistent/agent.sock")
    pool = make_pool(server_config(sshd))
    assert (await pool.run("edge-1", "true")).exit_status == 0
