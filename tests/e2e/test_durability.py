"""The durability promise: an accepted deployment survives SIGKILL of the agent."""

from __future__ import annotations

import signal

import docker

from tests.conftest import containers_of
from tests.e2e.conftest import build_request


def test_accepted_deployments_survive_sigkill_and_queued_ones_run(agent_factory, docker_client: docker.DockerClient) -> None:
    """After SIGKILL and restart: everything accepted is listed, queued ones run, the interrupted one fails cleanly."""
    agent = agent_factory("durable", max_concurrent=1)
    running = agent.submit(build_request("slow", command="echo started; sleep 60"))
    queued = [agent.submit(build_request(f"later{i}", command=f"echo later {i}")) for i in range(3)]
    agent.wait_for(running["id"], lambda d: d["status"] == "building" and d["container_id"])
    assert containers_of(docker_client, running["id"]), "the build container should be running"

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent.start()

    listed = {d["id"] for d in agent.request("GET", "/v1/deployments").json()["data"]}
    assert {running["id"], *(q["id"] for q in queued)} <= listed
    interrupted = agent.get(running["id"])
    assert interrupted["status"] == "failed"
    assert interrupted["error"]["type"] == "agent_restarted"
    assert "building" in interrupted["error"]["message"]
    assert interrupted["pid"] is None
    assert containers_of(docker_client, running["id"]) == []
    for deployment in queued:
        final = agent.wait_for(deployment["id"])
        assert final["status"] == "succeeded", final
        assert f"later {deployment['application'][-1]}" in agent.log(deployment["id"])


def test_a_deployment_accepted_just_before_sigkill_is_not_lost(agent_factory) -> None:
    """A 201 means on disk: killing the agent right after the response loses nothing."""
    agent = agent_factory("instant")
    created = [agent.submit(build_request("burst", command="true")) for _ in range(5)]
    agent.stop(signal.SIGKILL)
    agent.start()
    outcomes = [agent.wait_for(deployment["id"]) for deployment in created]
    for final in outcomes:
        # One may have been mid-build at the kill: it ends failed, saying why; none is lost.
        assert final["status"] == "succeeded" or final["error"]["type"] == "agent_restarted", final
    assert outcomes[-1]["status"] == "succeeded"


def test_sigterm_drains_running_builds_and_keeps_the_queue(agent_factory) -> None:
    """On SIGTERM a short running build finishes; queued work stays queued for the next start."""
    agent = agent_factory("drain", max_concurrent=1, shutdown_grace_s=20)
    running = agent.submit(build_request("drain", command="sleep 2; echo finished"))
    waiting = agent.submit(build_request("drain", command="echo next"))
    agent.wait_for(running["id"], lambda d: d["status"] == "building")
    assert agent.stop(signal.SIGTERM) == 0
    agent.start()
    assert agent.get(running["id"])["status"] == "succeeded"
    assert agent.wait_for(waiting["id"])["status"] == "succeeded"
