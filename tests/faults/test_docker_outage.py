"""Docker outages: deployments wait for the engine instead of failing, and builds it killed end `docker_unavailable`.

Every test runs the agent against a private dockerd (tests/faults/dockerd.py) that it stops and
starts at will; the machine's own engine is never touched.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable

import requests

from tests.e2e.conftest import AgentProcess, build_request
from tests.faults.dockerd import PrivateDockerd

WAITING = "waiting for the Docker engine"


def private_agent(agent_factory: Callable[..., AgentProcess], engine: PrivateDockerd, start: bool = True) -> AgentProcess:
    return agent_factory(start=start, docker={"url": engine.url})


def start_answering(agent: AgentProcess, timeout: float = 30) -> None:
    """Starts the agent and waits until /healthz answers at all (503 while its engine is down)."""
    with open(agent.output_path, "ab") as output:
        agent.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(agent.config_path)], stdout=output, stderr=output
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert agent.process.poll() is None, agent.output()
        try:
            requests.get(f"{agent.url}/healthz", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError(f"agent did not answer:\n{agent.output()}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_unhealthy_once(agent: AgentProcess) -> None:
    """/healthz answers 503 with one "Docker engine unreachable:" reason."""
    # A list: a Response with an error status is falsy.
    (response,) = wait_until(
        lambda: [r for r in [agent.request("GET", "/healthz")] if r.status_code == 503], 15, "/healthz to answer 503"
    )
    text = response.text
    assert text.count("Docker engine unreachable") == 1, text
    assert "Docker engine unreachable:" in text, text


def containers_of(engine: PrivateDockerd, deployment_id: str) -> list[Any]:
    client = engine.client()
    try:
        return client.containers.list(all=True, sparse=True, filters={"label": f"deploy-agent.deployment={deployment_id}"})
    finally:
        client.close()


def test_a_deployment_submitted_while_docker_is_down_waits_then_runs(agent_factory, private_dockerd) -> None:
    """Engine gone after the start: the deployment stays queued, its log says why once, and it runs once Docker is back."""
    agent = private_agent(agent_factory, private_dockerd)
    private_dockerd.stop()
    assert_unhealthy_once(agent)
    created = agent.submit(build_request("outage-wait", "echo built-after-outage"))
    wait_until(lambda: WAITING in agent.log(created["id"]), 15, "the log line saying it waits")
    time.sleep(2)  # several scheduler passes and gate retries
    assert agent.get(created["id"])["status"] == "queued"
    assert agent.log(created["id"]).count(WAITING) == 1, agent.log(created["id"])
    private_dockerd.start()
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", final
    log = agent.log(created["id"])
    assert "built-after-outage" in log and log.count(WAITING) == 1, log
    assert agent.request("GET", "/healthz").status_code == 200


def test_a_docker_restart_mid_build_fails_it_docker_unavailable_and_leaves_no_container(
    agent_factory, private_dockerd
) -> None:
    """dockerd restarted during a build (no live-restore: its container dies): failed, docker_unavailable, nothing left."""
    agent = private_agent(agent_factory, private_dockerd)
    created = agent.submit(build_request("outage-build", "echo started; sleep 60"))
    agent.wait_for(created["id"], lambda d: d["status"] == "building" and d["container_id"], timeout=30)
    wait_until(lambda: "started" in agent.log(created["id"]), 15, "the build's first output")
    private_dockerd.stop()
    private_dockerd.start()
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "failed", final
    assert final["error"]["type"] == "docker_unavailable", final
    assert final["exit_code"] == 143, final  # SIGTERM from dockerd's shutdown, as Docker reported it
    assert containers_of(private_dockerd, created["id"]) == []
    # The engine is back: the next deployment runs at once.
    again = agent.submit(build_request("outage-build", "echo next"))
    assert agent.wait_for(again["id"], timeout=60)["status"] == "succeeded"


def test_an_agent_started_without_docker_keeps_deployments_queued_until_it_answers(agent_factory, private_dockerd) -> None:
    """Agent started with its engine down: 503 on /healthz, the deployment waits, and runs once Docker is up."""
    agent = private_agent(agent_factory, private_dockerd, start=False)
    private_dockerd.stop()
    start_answering(agent)
    assert_unhealthy_once(agent)
    created = agent.submit(build_request("outage-boot", "echo built-after-boot"))
    time.sleep(2)
    assert agent.get(created["id"])["status"] == "queued"
    assert agent.output().count("waiting for the Docker engine before taking back") == 1, agent.output()[-3000:]
    private_dockerd.start()
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", final
    assert "built-after-boot" in agent.log(created["id"])
