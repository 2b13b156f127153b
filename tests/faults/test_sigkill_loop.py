"""SIGKILL the agent again and again: what runs is never restarted, and every deployment still ends right.

Each test kills the real daemon with SIGKILL, starts it again on the same state directory and
looks at what a user sees: container ids and start times, PIDs and their create times, what the
URLs answer, final statuses, and containers left behind.
"""

from __future__ import annotations

import signal

import docker
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess
from tests.e2e.test_releases import deploy, fetch, web_request
from tests.faults.test_release_faults import host_processes, process_of, process_request  # noqa: F401 - fixture

KILLS = 20


def test_twenty_sigkills_restart_no_release(agent_factory, docker_client: docker.DockerClient, host_processes) -> None:  # noqa: F811
    """Two container releases and one host-process release run through 20 SIGKILLs in a row, untouched."""
    agent: AgentProcess = agent_factory("loop")
    first = deploy(agent, web_request("a1", application="loopa"))
    second = deploy(agent, web_request("b1", application="loopb"))
    third = deploy(agent, process_request("p1", "loopp"))
    containers = {d["id"]: containers_of(docker_client, d["id"])[0] for d in (first, second)}
    started = {i: c.attrs["State"]["StartedAt"] for i, c in containers.items()}
    process = process_of(third)

    for _ in range(KILLS):
        agent.stop(signal.SIGKILL)
        agent.start()

    for deployment, version in ((first, "a1"), (second, "b1")):
        now = agent.get(deployment["id"])
        container = containers[deployment["id"]]
        container.reload()
        assert container.status == "running"
        assert container.attrs["State"]["StartedAt"] == started[deployment["id"]], "the release was restarted"
        assert now["container_id"] == container.id and now["url"] == deployment["url"]
        assert fetch(now["url"]) == version
    now = agent.get(third["id"])
    assert process.is_running() and now["pid"] == process.pid
    assert now["pid_started_at"] == pytest.approx(process.create_time(), abs=0.01)
    assert fetch(now["url"]) == "p1"
    for name in ("loopa", "loopb", "loopp"):
        assert agent.request("GET", f"/v1/applications/{name}").json()["state"] == "running"


@pytest.mark.parametrize("stage", ["queued", "building", "deploying"])
def test_a_sigkill_at_each_stage_still_ends_every_deployment(
    agent_factory, docker_client: docker.DockerClient, stage: str
) -> None:
    """SIGKILL while a deployment is queued, building or deploying: all reach a final status, none is left behind."""
    agent: AgentProcess = agent_factory(f"stage-{stage}", max_concurrent=1)
    serving = deploy(agent, web_request("v1", application=f"st{stage}"))
    slow_build = {"build": {"image": "local/busybox", "command": "sleep 3; echo v2 > /workspace/index.html"}}
    # A 2 s start period keeps it `deploying` long enough to be caught there.
    running = agent.submit({**web_request("v2", application=f"st{stage}", health={"start_period_s": 2}), **slow_build})
    waiting = agent.submit(web_request("w1", application=f"sw{stage}"))
    wanted = {"queued": "building", "building": "building", "deploying": "deploying"}[stage]
    agent.wait_for(running["id"], lambda d: d["status"] == wanted and (stage != "building" or d["container_id"]))
    assert agent.get(waiting["id"])["status"] == "queued"
    agent.stop(signal.SIGKILL)

    agent.start()
    ends = {d["id"]: agent.wait_for(d["id"], timeout=90) for d in (running, waiting)}
    assert ends[waiting["id"]]["status"] == "succeeded", agent.log(waiting["id"])[-2000:]
    assert fetch(ends[waiting["id"]]["url"]) == "w1"
    after = ends[running["id"]]
    application = agent.request("GET", f"/v1/applications/st{stage}").json()
    if stage == "deploying" and after["status"] == "failed":
        # Killed before the switch: the new release is removed and the old one keeps serving.
        assert after["error"]["type"] == "agent_restarted", after
        assert application["current_deployment_id"] == serving["id"] and fetch(serving["url"]) == "v1"
        assert containers_of(docker_client, running["id"]) == []
    else:
        # A build is re-adopted; a release already switched to is kept.
        assert after["status"] == "succeeded", (after, agent.log(running["id"])[-2000:])
        assert application["current_deployment_id"] == running["id"] and fetch(after["url"]) == "v2"
        assert containers_of(docker_client, serving["id"]) == []
    build_roles = [
        c for d in (running, waiting) for c in containers_of(docker_client, d["id"])
        if c.labels.get("deploy-agent.role") != "release"
    ]
    assert build_roles == [], "a build, copy or snapshot container was left behind"
