"""Signals to the real daemon: SIGTERM detaches (or drains), a second SIGINT exits at once, SIGHUP reloads."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import docker
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import ADMIN_TOKEN, AgentProcess, build_request

pytestmark = pytest.mark.docker

NEW_TOKEN = "reloaded-token-0123456789abcdef"


def wait_until(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.05)


def running_build(agent: AgentProcess, client: docker.DockerClient, application: str) -> str:
    """Submits a build that runs for a minute; returns its id once its container runs."""
    deployment = agent.submit(build_request(application, "echo started; sleep 60"))
    agent.wait_for(deployment["id"], lambda d: d["status"] == "building" and d["container_id"], timeout=60)
    wait_until(
        lambda: [c for c in containers_of(client, deployment["id"]) if c.status == "running"],
        30, "the build container to run",
    )
    wait_until(lambda: "started" in agent.log(deployment["id"]), 30, "the build's first line")
    return deployment["id"]


def stored_status(state_dir: Path, deployment_id: str) -> tuple[str, str | None]:
    """The deployment's status and error as the SQLite file holds them (the agent is stopped)."""
    with sqlite3.connect(state_dir / "agent.db") as db:
        row = db.execute("SELECT status, error FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
    return row[0], row[1]


def exit_within(agent: AgentProcess, sig: int, timeout: float) -> tuple[int, float]:
    assert agent.process is not None
    started = time.monotonic()
    agent.process.send_signal(sig)
    code = agent.process.wait(timeout=timeout)
    return code, time.monotonic() - started


def test_sigterm_leaves_a_running_build_running(agent_factory, docker_client: docker.DockerClient) -> None:
    """SIGTERM (on_stop "detach"): exit within 10 s; the build container runs on and the deployment stays `building`."""
    agent = agent_factory()
    deployment_id = running_build(agent, docker_client, "sig-detach")
    code, took = exit_within(agent, signal.SIGTERM, timeout=10)
    assert code == 0 and took < 10, (code, took, agent.output()[-2000:])
    assert [c.status for c in containers_of(docker_client, deployment_id)] == ["running"]
    assert stored_status(agent.state_dir, deployment_id) == ("building", None)
    assert "deployment failed" not in (agent.state_dir / "logs" / f"{deployment_id}.log").read_text()
    assert "agent stopped: builds and releases keep running" in agent.output()


def test_drain_waits_then_stops_and_refuses_new_work(agent_factory, docker_client: docker.DockerClient) -> None:
    """on_stop "drain": POST answers 503 with Retry-After while draining; the build ends `failed` agent_shutdown."""
    agent = agent_factory(on_stop="drain", shutdown_grace_s=2)
    deployment_id = running_build(agent, docker_client, "sig-drain")
    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)
    refused = agent.request("POST", "/v1/deployments", json=build_request("sig-drain-late"))
    for _ in range(50):  # the signal may not have been handled yet
        if refused.status_code == 503:
            break
        time.sleep(0.05)
        refused = agent.request("POST", "/v1/deployments", json=build_request("sig-drain-late"))
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("Retry-After") and refused.json()["error"]["type"] == "unavailable", refused.text
    code = agent.process.wait(timeout=2 + 2 + 10)
    assert code == 0, agent.output()[-2000:]
    status, error = stored_status(agent.state_dir, deployment_id)
    assert status == "failed" and '"agent_shutdown"' in (error or ""), (status, error)
    assert [c for c in containers_of(docker_client, deployment_id) if c.status == "running"] == []


def test_a_second_sigint_exits_at_once(agent_factory, docker_client: docker.DockerClient) -> None:
    """While draining, a second SIGINT exits at once and leaves the build running (`building`)."""
    agent = agent_factory(on_stop="drain", shutdown_grace_s=60)
    deployment_id = running_build(agent, docker_client, "sig-twice")
    assert agent.process is not None
    agent.process.send_signal(signal.SIGINT)
    wait_until(lambda: "draining" in agent.output(), 5, "the drain to begin")
    code, took = exit_within(agent, signal.SIGINT, timeout=5)
    assert code == 130 and took < 5, (code, took, agent.output()[-2000:])
    assert [c.status for c in containers_of(docker_client, deployment_id)] == ["running"]
    assert stored_status(agent.state_dir, deployment_id)[0] == "building"


def replace_in_config(agent: AgentProcess, old: str, new: str) -> None:
    text = agent.config_path.read_text()
    assert old in text
    agent.config_path.write_text(text.replace(old, new))


def status_with(agent: AgentProcess, token: str) -> int:
    return agent.request("GET", "/v1/deployments", token=token).status_code


def test_sighup_reloads_tokens_and_limits(agent_factory) -> None:
    """SIGHUP with a new token in the file: the new token works, the old one is refused, a new server is listed."""
    agent = agent_factory(max_queued=1000)
    replace_in_config(agent, ADMIN_TOKEN, NEW_TOKEN)
    agent.config_path.write_text(
        agent.config_path.read_text()
        + '\n[servers.added-on-reload]\nhost = "127.0.0.1"\nuser = "nobody"\nknown_hosts = "/dev/null"\n'
    )
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(agent, NEW_TOKEN) == 200, 10, "the new token to be accepted")
    assert status_with(agent, ADMIN_TOKEN) == 401
    servers = agent.request("GET", "/v1/servers", token=NEW_TOKEN, timeout=60)
    assert servers.status_code == 200 and "added-on-reload" in servers.text, servers.text
    assert agent.process.poll() is None


def test_sighup_with_an_invalid_file_keeps_the_running_config(agent_factory) -> None:
    """SIGHUP with an invalid file: the daemon stays up, the old token works, an error line names the problem."""
    agent = agent_factory()
    replace_in_config(agent, "max_concurrent = 4", 'max_concurrent = "many"')
    replace_in_config(agent, ADMIN_TOKEN, NEW_TOKEN)
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    line = wait_until(
        lambda: next((l for l in agent.output().splitlines() if "config reload refused" in l), None),
        10, "the refusal to be logged",
    )
    assert '"level": "error"' in line and "agent.max_concurrent" in line, line
    assert agent.process.poll() is None
    assert status_with(agent, ADMIN_TOKEN) == 200
    assert status_with(agent, NEW_TOKEN) == 401
