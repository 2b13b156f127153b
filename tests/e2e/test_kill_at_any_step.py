"""Kill, stop and start at any step of a release end in the state the contract names.

Until the previous release has drained, a kill undoes the deployment: it ends `cancelled`, the
application points at the previous deployment, which keeps serving with its pid and url, and the
new release is gone. Once only cleanup is left (removing the previous release, retention), a
kill is too late: the deployment finishes and succeeds. Either way, every release container of
the application is the one it points at.
"""

from __future__ import annotations

import contextlib

import time
from typing import Any, Callable

import docker
import psutil
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess
from tests.e2e.test_releases import deploy, fetch, process_request, release_containers, web_request

# v1 ignores SIGTERM, so removing it takes the whole kill grace: a window to kill in.
STUBBORN = {"command": ["sh", "-c", "trap '' TERM; httpd -f -p 8080 -h /workspace"]}


def kill_when(agent: AgentProcess, deployment_id: str, seen: Callable[[dict[str, Any], str], bool]) -> int:
    """Polls the deployment and its log until `seen(deployment, log)`, then kills it; returns the kill's status."""
    deadline = time.monotonic() + 60
    while not seen(agent.get(deployment_id), agent.log(deployment_id)):
        assert time.monotonic() < deadline, agent.log(deployment_id)[-2000:]
        time.sleep(0.02)
    return agent.request("POST", f"/v1/deployments/{deployment_id}/kill").status_code


def application(agent: AgentProcess, name: str) -> dict[str, Any]:
    response = agent.request("GET", f"/v1/applications/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def assert_previous_serves(
    agent: AgentProcess, client: docker.DockerClient, previous: dict[str, Any], killed: dict[str, Any], version: str
) -> None:
    """Cancelled; the application still points at `previous`, which serves with its pid and url; nothing else runs."""
    final = agent.wait_for(killed["id"], timeout=30)
    assert final["status"] == "cancelled", (final, agent.log(killed["id"])[-2000:])
    assert final["pid"] is None
    view = application(agent, previous["application"])
    assert view["current_deployment_id"] == previous["id"] and view["state"] == "running"
    assert view["url"] == previous["url"] and fetch(view["url"]) == version
    now = agent.get(previous["id"])
    assert (now["pid"], now["container_id"], now["url"]) == (previous["pid"], previous["container_id"], previous["url"])
    assert containers_of(client, killed["id"]) == []
    assert [c.id for c in release_containers(client, previous["application"])] == [previous["container_id"]]


@pytest.mark.parametrize(
    ("step", "health", "seen"),
    [
        ("container created", {}, lambda d, log: "starting release container" in log),
        ("container started", {"start_period_s": 30}, lambda d, log: "release container" in log and "started (pid" in log),
        ("health-checking", {"start_period_s": 30}, lambda d, log: d["stage"] == "health"),
    ],
)
def test_a_kill_before_the_switch_keeps_the_previous_release(
    agent: AgentProcess, docker_client: docker.DockerClient, step: str, health: dict[str, Any], seen: Callable
) -> None:
    """Kill after the container is created, started, or while it is checked: cancelled, v1 serves untouched."""
    name = "step-" + step.replace(" ", "-")
    first = deploy(agent, web_request("v1", application=name))
    second = agent.submit(web_request("v2", application=name, health=health))
    assert kill_when(agent, second["id"], seen) == 202
    assert_previous_serves(agent, docker_client, first, second, "v1")


def test_a_kill_while_switching_and_draining_points_back_at_the_previous_release(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """Kill right after the switch, while v1 drains: cancelled, the application points at v1 again, v2 is removed."""
    agent = agent_factory("kill-draining", releases={"drain_s": 30})
    first = deploy(agent, web_request("v1", application="draining"))
    second = agent.submit(web_request("v2", application="draining"))
    assert kill_when(agent, second["id"], lambda d, log: "draining the previous release" in log) == 202
    assert_previous_serves(agent, docker_client, first, second, "v1")


def test_a_kill_during_cleanup_is_too_late_and_the_deployment_succeeds(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """Kill while the previous release is being removed (after draining): v2 succeeds, serves, v1 is gone."""
    agent = agent_factory("kill-cleanup", releases={"drain_s": 0, "retention": 1})
    first = deploy(agent, web_request("v1", application="cleanup", run=STUBBORN))
    second = agent.submit(web_request("v2", application="cleanup"))
    assert kill_when(agent, second["id"], lambda d, log: "removing the previous release" in log) in (202, 409)
    final = agent.wait_for(second["id"], timeout=30)
    assert final["status"] == "succeeded", (final, agent.log(second["id"])[-2000:])
    assert final["pid"] and fetch(final["url"]) == "v2"
    view = application(agent, "cleanup")
    assert view["current_deployment_id"] == second["id"] and view["state"] == "running"
    assert containers_of(docker_client, first["id"]) == []
    assert [c.id for c in release_containers(docker_client, "cleanup")] == [final["container_id"]]
    # Retention ran too (1 kept): v1's image is gone.
    assert not docker_client.images.list(f"deploy-agent/cleanup:{first['id']}")


def test_kills_at_staggered_moments_always_end_in_one_consistent_state(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """Killed at moments spread over a whole deployment: each ends cancelled with the old release or succeeded with the new."""
    agent = agent_factory("kill-anytime", releases={"drain_s": 0.5})
    began = time.monotonic()
    current = deploy(agent, web_request("v0", application="anytime"))
    whole = time.monotonic() - began + 0.5  # a later deployment drains its predecessor too
    outcomes = []
    for index, share in enumerate([0.15, 0.45, 0.75, 0.95, 1.5]):
        version = f"v{index + 1}"
        submitted = agent.submit(web_request(version, application="anytime"))
        time.sleep(whole * share)
        agent.request("POST", f"/v1/deployments/{submitted['id']}/kill")
        final = agent.wait_for(submitted["id"], timeout=30)
        outcomes.append(final["status"])
        view = application(agent, "anytime")
        running = [c for c in release_containers(docker_client, "anytime") if c.status == "running"]
        if final["status"] == "succeeded":
            current, serving = final, version
        else:
            assert final["status"] == "cancelled", final
            assert containers_of(docker_client, submitted["id"]) == []
            serving = fetch(current["url"])
        assert view["current_deployment_id"] == current["id"] and view["url"] == current["url"], (share, final)
        assert fetch(view["url"]) == serving
        assert [c.id for c in running] == [current["container_id"]], (share, final["status"])
        assert agent.get(current["id"])["pid"] == current["pid"]
    assert {"cancelled", "succeeded"} <= set(outcomes), outcomes


def test_a_kill_while_a_process_release_drains_keeps_the_previous_process(agent_factory) -> None:
    """Host processes: kill while p1 drains; p1 (same pid) stays current and tracked, p2's process is gone."""
    agent = agent_factory("kill-process", releases={"drain_s": 30})
    try:
        first = deploy(agent, {**process_request("p1"), "application": "procdrain"})
        second = agent.submit({**process_request("p2"), "application": "procdrain"})
        new = None

        def draining(deployment: dict[str, Any], log: str) -> bool:
            nonlocal new
            # While building, `pid` is the build's (gone a moment later): only the release's counts.
            if deployment["status"] == "deploying" and deployment["pid"] and new is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    new = psutil.Process(deployment["pid"])
            return "draining the previous release" in log

        assert kill_when(agent, second["id"], draining) == 202
        final = agent.wait_for(second["id"], timeout=30)
        assert final["status"] == "cancelled" and final["pid"] is None
        view = application(agent, "procdrain")
        assert view["current_deployment_id"] == first["id"] and view["pid"] == first["pid"]
        assert fetch(view["url"]) == "p1"
        assert psutil.Process(first["pid"]).create_time() == pytest.approx(first["pid_started_at"], abs=0.01)
        assert new is not None
        _, alive = psutil.wait_procs([new], timeout=10)
        assert alive == []
    finally:
        agent.request("POST", "/v1/applications/procdrain/stop")


def test_stop_and_start_between_deployments(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """A deployment replaces a stopped release (removed); a failed one leaves the application stopped at its release."""
    first = deploy(agent, web_request("v1", application="stopstart"))
    assert agent.request("POST", "/v1/applications/stopstart/stop").status_code == 202
    second = deploy(agent, web_request("v2", application="stopstart"))
    assert containers_of(docker_client, first["id"]) == []
    view = application(agent, "stopstart")
    assert view["current_deployment_id"] == second["id"] and view["state"] == "running"
    assert fetch(view["url"]) == "v2"

    assert agent.request("POST", "/v1/applications/stopstart/stop").status_code == 202
    broken = web_request("v3", application="stopstart", run={"command": ["sleep", "600"]}, health={"retries": 3})
    deploy(agent, broken, status="failed")
    view = application(agent, "stopstart")
    assert view["current_deployment_id"] == second["id"] and view["state"] == "stopped"
    assert [c.id for c in release_containers(docker_client, "stopstart")] == [second["container_id"]]
    started = agent.request("POST", "/v1/applications/stopstart/start")
    assert started.status_code == 202, started.text
    assert fetch(started.json()["url"]) == "v2"


def test_a_kill_while_the_application_is_stopped_leaves_it_stopped(
    agent: AgentProcess, docker_client: docker.DockerClient
) -> None:
    """Kill a deployment of a stopped application: cancelled, still stopped at v1, which starts again."""
    first = deploy(agent, web_request("v1", application="killstopped"))
    assert agent.request("POST", "/v1/applications/killstopped/stop").status_code == 202
    second = agent.submit(web_request("v2", application="killstopped", health={"start_period_s": 30}))
    assert kill_when(agent, second["id"], lambda d, log: d["stage"] == "health") == 202
    assert agent.wait_for(second["id"], timeout=30)["status"] == "cancelled"
    view = application(agent, "killstopped")
    assert view["current_deployment_id"] == first["id"] and view["state"] == "stopped"
    assert containers_of(docker_client, second["id"]) == []
    assert [c.id for c in release_containers(docker_client, "killstopped")] == [first["container_id"]]
    assert agent.request("POST", "/v1/applications/killstopped/start").status_code == 202
    assert fetch(application(agent, "killstopped")["url"]) == "v1"


def test_retention_counts_stopped_releases(agent_factory, docker_client: docker.DockerClient) -> None:
    """Deploy, stop, deploy, stop...: one release container is left (the current one), and the last N images."""
    agent = agent_factory("stopped-retention", releases={"retention": 2, "drain_s": 0})
    deployments = []
    for index in range(4):
        deployments.append(deploy(agent, web_request(f"v{index}", application="stopkeep")))
        assert agent.request("POST", "/v1/applications/stopkeep/stop").status_code == 202
    assert [c.id for c in release_containers(docker_client, "stopkeep")] == [deployments[-1]["container_id"]]
    ours = {f"deploy-agent/stopkeep:{d['id']}" for d in deployments}
    images = {tag for image in docker_client.images.list("deploy-agent/stopkeep") for tag in image.tags} & ours
    assert images == {f"deploy-agent/stopkeep:{d['id']}" for d in deployments[-2:]}
