"""The real daemon's own defences: file modes, sockets, protocol errors, policy at start, warnings."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.e2e.conftest import AgentProcess

FAST_CHECK = {"type": "http", "path": "/", "interval_s": 0.2, "timeout_s": 1, "retries": 25, "stable_s": 0.5}


def connect(agent: AgentProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.port), timeout=10)


def exchange(agent: AgentProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends raw bytes on a new connection and reads the answer until the agent closes it."""
    with connect(agent) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the agent closes `sock` within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@contextlib.contextmanager
def idle_sockets(agent: AgentProcess, count: int) -> Iterator[list[socket.socket]]:
    sockets = [connect(agent) for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- protocol errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", id="unknown-method"),
        pytest.param(b"this is not http\r\n\r\n", id="bad-request-line"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", id="oversized-header"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n",
            id="too-many-headers",
        ),
        pytest.param(b"GET /\x00 HTTP/1.1\r\n\r\n", id="nul-in-target"),
    ],
)
def test_protocol_errors_get_the_envelope(agent: AgentProcess, request_bytes: bytes) -> None:
    """Requests aiohttp's parser refuses are answered 400 with the contract's JSON envelope, not plain text."""
    status, headers, body = exchange(agent, request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    envelope = json.loads(body)
    assert envelope["success"] is False and envelope["status"] == 400
    assert envelope["error"]["type"] == "bad_request"
    assert envelope["error"]["message"].startswith("malformed HTTP request: ")
    assert set(envelope["error"]) == {"type", "message", "code", "details"}
    assert "a" * 200 not in envelope["error"]["message"]
    assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200


# --- connections -------------------------------------------------------------------------


def test_healthz_answers_while_520_idle_sockets_are_open(agent: AgentProcess) -> None:
    """Idle sockets beyond max_connections close the oldest idle ones; /healthz keeps answering fast."""
    assert agent.process is not None
    # As under systemd's old default LimitNOFILE=1024 (soft and hard): more idle sockets than that.
    resource.prlimit(agent.process.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    with idle_sockets(agent, 1200) as sockets:
        started = time.monotonic()
        response = requests.get(f"{agent.url}/healthz", timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        assert time.monotonic() - started < 2
        assert open_descriptors(agent.process.pid) < 700  # 512 connections and the agent's own
        assert closed_by_peer(sockets[0], timeout=5), "the oldest idle socket stays open"
        assert not closed_by_peer(sockets[-1], timeout=0.2), "the newest idle socket was closed"
    assert "socket.accept() out of system resource" not in agent.output()


def test_at_the_cap_the_oldest_idle_connection_gives_way(agent_factory: Callable[..., AgentProcess]) -> None:
    """With max_connections open and idle, a new request is served and the oldest idle one is closed."""
    agent = agent_factory(max_connections=4)
    with idle_sockets(agent, 4) as sockets:
        assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200
        assert closed_by_peer(sockets[0], timeout=5)
        assert not closed_by_peer(sockets[1], timeout=0.2)


def test_when_every_connection_is_busy_a_new_one_gets_503(agent_factory: Callable[..., AgentProcess]) -> None:
    """Connections serving requests (log followers) are never closed for a newcomer, which gets 503."""
    agent = agent_factory(max_connections=3)
    deployment = agent.submit({"application": "busy", "build": {"image": "local/busybox", "command": "sleep 60"}})
    agent.wait_for(deployment["id"], lambda d: d["status"] == "building")
    followers = [
        agent.request("GET", f"/v1/deployments/{deployment['id']}/logs?follow=true", stream=True) for _ in range(3)
    ]
    try:
        assert all(follower.status_code == 200 for follower in followers)
        status, headers, body = exchange(agent, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["type"] == "unavailable"
    finally:
        for follower in followers:
            follower.close()
        agent.request("POST", f"/v1/deployments/{deployment['id']}/kill")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError("the agent did not serve again once its followers were gone")


def test_a_connection_that_sends_no_complete_head_is_closed(agent_factory: Callable[..., AgentProcess]) -> None:
    """Silent sockets and slow partial heads are closed after header_timeout_s; a prompt request still works."""
    agent = agent_factory(header_timeout_s=1)
    with connect(agent) as silent, connect(agent) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.3)
            slow.sendall(b"X-Drip: 1\r\n")
        assert closed_by_peer(silent, timeout=5)
        assert closed_by_peer(slow, timeout=5)
        assert time.monotonic() - started < 3
    assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200


# --- state dir modes ---------------------------------------------------------------------


def not_private(state_dir: Path) -> list[str]:
    """Every path under state_dir (itself included) with a group or other permission bit."""
    found = []
    for path in [state_dir, *state_dir.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and not stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077:
            found.append(f"{path} {stat.S_IMODE(mode):04o}")
    return found


def test_everything_under_the_state_dir_is_private(agent: AgentProcess, source_dir: Path) -> None:
    """After builds, container and host-process releases, no path under state_dir has group or other bits."""
    os.chmod(source_dir / "index.html", 0o644)
    bodies: list[dict[str, Any]] = [
        {"application": "job", "source": {"type": "path", "path": str(source_dir)},
         "build": {"image": "local/busybox", "command": "cat index.html; echo x > out.txt"}},
        {"application": "web", "build": {"image": "local/busybox", "command": "echo hi > /workspace/index.html"},
         "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080},
         "health_check": FAST_CHECK},
        {"application": "proc", "source": {"type": "path", "path": str(source_dir)},
         "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."}, "health_check": FAST_CHECK},
    ]
    for body in bodies:
        final = agent.wait_for(agent.submit(body)["id"], timeout=90)
        assert final["status"] == "succeeded", (final, agent.log(final["id"])[-2000:])
    assert not_private(agent.state_dir) == []


def test_a_host_process_release_of_a_built_workspace_is_private(agent: AgentProcess) -> None:
    """The built workspace copied out of its image for a host process keeps no group or other bits."""
    body = {
        "application": "built-proc",
        "build": {"image": "local/busybox", "command": "echo hi > index.html; chmod 644 index.html; mkdir -m 755 d"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": FAST_CHECK,
    }
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-2000:])
    assert not_private(agent.state_dir) == []


def test_an_older_state_dir_is_made_private_at_start(agent_factory: Callable[..., AgentProcess]) -> None:
    """A state dir left 0755 with 0644 files by an older version is 0700/0600 once the agent starts."""
    agent = agent_factory()
    deployment = agent.submit({"application": "job", "build": {"image": "local/busybox", "command": "echo hi"}})
    agent.wait_for(deployment["id"])
    agent.stop()
    state = agent.state_dir
    for path in [state, *state.iterdir(), *(state / "logs").iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    agent.start()
    assert not_private(state) == []


# --- policy at start, warnings -----------------------------------------------------------


def test_a_queued_host_process_is_refused_when_the_config_no_longer_allows_it(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    """A deployment accepted under one config is checked again when it starts, under the config then."""
    agent = agent_factory()
    blocker = agent.submit({"application": "proc", "build": {"image": "local/busybox", "command": "sleep 60"}})
    agent.wait_for(blocker["id"], lambda d: d["status"] == "building")
    queued = agent.submit({"application": "proc", "run": {"runtime": "process", "command": "sleep 60"}})
    assert agent.get(queued["id"])["status"] == "queued"
    agent.stop(signal.SIGTERM)
    config = agent.config_path.read_text()
    agent.config_path.write_text(config.replace("allow_host_processes = true", "allow_host_processes = false"))
    agent.start()
    agent.request("POST", f"/v1/deployments/{blocker['id']}/kill")
    final = agent.wait_for(queued["id"], timeout=60)
    assert final["status"] == "failed" and final["pid"] is None
    assert final["error"]["type"] == "forbidden"
    assert "security.allow_host_processes" in final["error"]["message"]
    assert "refused by the agent's policy" in agent.log(queued["id"])


def test_a_readable_config_with_plain_tokens_is_warned_about(agent_factory: Callable[..., AgentProcess]) -> None:
    """A config holding `token =` values that others may read gets a warning at start, with path and mode."""
    agent = agent_factory(start=False)
    os.chmod(agent.config_path, 0o644)
    agent.start()
    warnings = [json.loads(line) for line in agent.output().splitlines() if "secret file readable by others" in line]
    assert [(w["path"], w["mode"], w["level"]) for w in warnings] == [(str(agent.config_path), "0644", "warning")]
    agent.stop()
    os.chmod(agent.config_path, 0o600)
    agent.output_path.write_text("")
    agent.start()
    assert "secret file readable by others" not in agent.output()

