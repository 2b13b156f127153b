"""The real daemon as a subprocess, configured on a free port with its own state dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import docker
import psutil
import pytest
import requests

from agent.runtimes.cgroups import ReleaseCgroups

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"
FINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AgentProcess:
    """One deploy-agent daemon started with `deploy-agent run --config`."""

    def __init__(
        self,
        state_dir: Path,
        releases: dict[str, Any] | None = None,
        extra_toml: str = "",
        security: dict[str, Any] | None = None,
        docker: dict[str, Any] | None = None,
        **agent_settings: Any,
    ) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Outside the test's tmp dir: the agent never copies a source from its config's directory.
        config_dir = state_dir.parent / "etc"
        config_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = config_dir / f"{state_dir.name}.toml"
        self.output_path = state_dir.parent / f"{state_dir.name}.out"
        self.process: subprocess.Popen[bytes] | None = None
        # How often start() moved to a new port because another test's agent took this one first.
        self._port_moves = 0
        settings = {"kill_grace_s": 2, "shutdown_grace_s": 5, "max_concurrent": 4, **agent_settings}
        lines = ["[agent]", f'listen = "127.0.0.1:{self.port}"', f'state_dir = "{state_dir}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        docker_settings = {"build_memory": "256m", "build_cpus": 1.0, "build_pids": 256, **(docker or {})}
        lines += ["", "[docker]"] + [f"{k} = {json.dumps(v)}" for k, v in docker_settings.items()] + [""]
        lines += ["[releases]"] + [f"{k} = {json.dumps(v)}" for k, v in {"drain_s": 1, **(releases or {})}.items()] + [""]
        for name, token, scopes in (
            ("admin", ADMIN_TOKEN, ["admin"]),
            ("reader", READ_TOKEN, ["deployments:read"]),
            ("writer", WRITE_TOKEN, ["deployments:write"]),
        ):
            lines += ["[[auth.tokens]]", f'name = "{name}"', f'token = "{token}"', f"scopes = {json.dumps(scopes)}", ""]
        # Tests deploy sources from their tmp dir and run host processes unless they say otherwise.
        if security is None:
            security = {"allow_host_processes": True, "source_roots": [str(state_dir.parent)]}
        lines += ["[security]"] + [f"{k} = {json.dumps(v)}" for k, v in security.items()] + [""]
        self.config_path.write_text("\n".join(lines) + "\n" + extra_toml)

    def start(self, timeout: float = 30) -> "AgentProcess":
        output = open(self.output_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "in use" in self.output()[-2000:] and self._move_to_a_new_port():
                    return self.start(timeout)  # another test's agent took the free port first
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.output()}")
            try:
                # The answer must be this agent's: another test's agent may have taken the same free port.
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200 and self._listens():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent did not become healthy:\n{self.output()}")

    def _move_to_a_new_port(self) -> bool:
        self._port_moves += 1
        if self._port_moves > 3:
            return False
        old = f'listen = "127.0.0.1:{self.port}"'
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path.write_text(self.config_path.read_text().replace(old, f'listen = "127.0.0.1:{self.port}"'))
        return True

    def _listens(self) -> bool:
        """Whether this agent's own process listens on its port."""
        assert self.process is not None
        try:
            return any(
                conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.port
                for conn in psutil.Process(self.process.pid).net_connections(kind="tcp")
            )
        except psutil.Error:
            return False

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def request(self, method: str, path: str, *, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def session(self, token: str = ADMIN_TOKEN) -> requests.Session:
        """A keep-alive session, as a polling control plane would hold."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session

    def submit(self, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        response = self.request("POST", "/v1/deployments", json=body, **kwargs)
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, deployment_id: str) -> dict[str, Any]:
        response = self.request("GET", f"/v1/deployments/{deployment_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(
        self, deployment_id: str, until: Callable[[dict[str, Any]], bool] = lambda d: d["status"] in FINAL,
        timeout: float = 60,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            deployment = self.get(deployment_id)
            if until(deployment):
                return deployment
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {deployment_id}: {deployment}")
            time.sleep(0.05)

    def log(self, deployment_id: str) -> str:
        response = self.request("GET", f"/v1/deployments/{deployment_id}/logs")
        assert response.status_code == 200, response.text
        return response.text


@pytest.fixture
def agent_factory(tmp_path: Path, docker_client: docker.DockerClient, base_image: str) -> Iterator[Callable[..., AgentProcess]]:
    """Starts daemons on demand; stops them and removes their containers afterwards."""
    started: list[AgentProcess] = []

    def make(name: str = "state", start: bool = True, **settings: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path / name, **settings)
        started.append(agent)
        return agent.start() if start else agent

    yield make
    for agent in started:
        if agent.process is not None:
            agent.stop(signal.SIGKILL if os.environ.get("FAST_TEARDOWN") else signal.SIGTERM)
    _remove_leftovers(docker_client, started)


def _remove_leftovers(client: docker.DockerClient, agents: list[AgentProcess]) -> None:
    """Removes the containers and remote-server releases (processes and directories) of these agents.

    Releases outlive the agent by design; the tests' "remote" servers are this machine's root login.
    """
    ids: set[str] = set()
    for agent in agents:
        logs_dir = agent.state_dir / "logs"
        if logs_dir.exists():
            ids.update(path.stem for path in logs_dir.glob("dep_*.log"))
    # sparse: no inspect per container, so one removed meanwhile (by a parallel test) is no error.
    for container in client.containers.list(all=True, sparse=True, filters={"label": "deploy-agent.deployment"}):
        if (container.attrs.get("Labels") or {}).get("deploy-agent.deployment") in ids:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
    remote_root = Path.home() / ".deploy-agent"
    dirs = [remote_root / kind / deployment_id for deployment_id in ids for kind in ("releases", "run", "workspaces")]
    for process in psutil.process_iter():
        try:
            cwd = Path(process.cwd())
        except psutil.Error:
            continue
        if any(cwd == directory or directory in cwd.parents for directory in dirs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(process.pid)
                if group == os.getpgrp():
                    process.kill()
                else:
                    os.killpg(group, signal.SIGKILL)
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
    for agent in agents:
        # Local host-process releases live in cgroups of their agent's own: end them with it.
        cgroups = ReleaseCgroups.discover(agent.state_dir / "run")
        if cgroups is not None:
            for deployment_id in cgroups.deployment_ids():
                with contextlib.suppress(Exception):
                    cgroups.of(deployment_id).destroy(5.0)
            cgroups.tidy()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """A running daemon with admin, read-only and write-only tokens."""
    return agent_factory()


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """A small application source tree to deploy."""
    source = tmp_path / "src"
    (source / "static").mkdir(parents=True)
    (source / "index.html").write_text("<h1>hello from source</h1>\n")
    (source / "static" / "app.txt").write_text("static file\n")
    return source


def build_request(application: str = "web", command: Any = "echo building; echo done", **build: Any) -> dict[str, Any]:
    """A one-off build job request on the local busybox image."""
    return {
        "application": application,
        "build": {"image": "local/busybox", "command": command, **build},
    }
