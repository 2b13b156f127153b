"""The durability promise: an accepted deployment survives SIGKILL of the agent."""

from __future__ import annotations

import signal

import docker
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import build_request


def test_accepted_deployments_survive_sigkill_and_queued_ones_run(agent_factory, docker_client: docker.DockerClient) -> None:
    """After SIGKILL and restart: everything accepted is listed, the running build is taken back and finishes, queued ones run after it."""
    agent = agent_factory("durable", max_concurrent=1)
    running = agent.submit(build_request("slow", command="echo started; sleep 10; echo finished"))
    queued = [agent.submit(build_request(f"later{i}", command=f"echo later {i}")) for i in range(3)]
    building = agent.wait_for(running["id"], lambda d: d["status"] == "building" and d["container_id"])
    assert containers_of(docker_client, running["id"]), "the build container should be running"

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent.start()

    listed = {d["id"] for d in agent.request("GET", "/v1/deployments").json()["data"]}
    assert {running["id"], *(q["id"] for q in queued)} <= listed
    readopted = agent.get(running["id"])
    assert readopted["status"] == "building" and readopted["container_id"] == building["container_id"], readopted
    final = agent.wait_for(running["id"])
    assert final["status"] == "succeeded", final
    assert "finished" in agent.log(running["id"])
    assert containers_of(docker_client, running["id"]) == []
    for deployment in queued:
        later = agent.wait_for(deployment["id"])
        assert later["status"] == "succeeded", later
        assert f"later {deployment['application'][-1]}" in agent.log(deployment["id"])
        # The re-adopted build counted against max_concurrent = 1.
        assert later["started_at"] >= final["finished_at"]


def test_a_deployment_accepted_just_before_sigkill_is_not_lost(agent_factory) -> None:
    """A 201 means on disk: killing the agent right after the response loses nothing."""
    agent = agent_factory("instant")
    created = [agent.submit(build_request("burst", command="true")) for _ in range(5)]
    agent.stop(signal.SIGKILL)
    agent.start()
    outcomes = [agent.wait_for(deployment["id"]) for deployment in created]
    for final in outcomes:
        # One may have been mid-build at the kill: taken back (or started over) it succeeds too.
        assert final["status"] == "succeeded", final
    assert outcomes[-1]["status"] == "succeeded"


def test_sigterm_drains_running_builds_and_keeps_the_queue(agent_factory) -> None:
    """On SIGTERM a running build goes on and is finished after the next start; queued work stays queued for it."""
    agent = agent_factory("drain", max_concurrent=1, shutdown_grace_s=20)
    running = agent.submit(build_request("drain", command="sleep 2; echo finished"))
    waiting = agent.submit(build_request("drain", command="echo next"))
    agent.wait_for(running["id"], lambda d: d["status"] == "building")
    assert agent.stop(signal.SIGTERM) == 0
    agent.start()
    assert agent.wait_for(running["id"])["status"] == "succeeded"
    assert "finished" in agent.log(running["id"])
    assert agent.wait_for(waiting["id"])["status"] == "succeeded"


def test_releases_survive_an_agent_sigkill_and_an_interrupted_one_is_removed(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """Current container and process releases keep serving across SIGKILL; a half-checked one is removed."""
    import urllib.request

    import psutil

    from tests.e2e.test_releases import FAST_CHECK, process_request, web_request

    def fetch(url: str) -> str:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode().strip()

    agent = agent_factory("releases-durable")
    web = agent.wait_for(agent.submit(web_request("v1"))["id"], timeout=60)
    proc = agent.wait_for(agent.submit(process_request("p1"))["id"], timeout=60)
    assert web["status"] == proc["status"] == "succeeded"
    checking = agent.submit(web_request("v2", health={**FAST_CHECK, "start_period_s": 60}))
    agent.wait_for(checking["id"], lambda d: d["status"] == "deploying" and d["container_id"])

    agent.stop(signal.SIGKILL)
    assert fetch(web["url"]) == "v1" and fetch(proc["url"]) == "p1"
    agent.start()

    interrupted = agent.get(checking["id"])
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "agent_restarted"
    assert containers_of(docker_client, checking["id"]) == []
    assert fetch(agent.get(web["id"])["url"]) == "v1"
    assert fetch(proc["url"]) == "p1"
    assert agent.get(proc["id"])["pid_started_at"] == pytest.approx(psutil.Process(proc["pid"]).create_time())
    apps = {a["name"]: a for a in agent.request("GET", "/v1/applications").json()["data"]}
    assert apps["web"]["current_deployment_id"] == web["id"] and apps["proc"]["current_deployment_id"] == proc["id"]
    # The restarted agent still controls the process release it started before the kill.
    started_at = psutil.Process(proc["pid"]).create_time()
    assert agent.request("POST", "/v1/applications/proc/stop").status_code == 202
    try:
        assert psutil.Process(proc["pid"]).create_time() != started_at, "the process release still runs"
    except psutil.NoSuchProcess:
        pass
