"""Releases end to end: run, health checks, promotion, rollback, host processes, retention."""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request
from typing import Any

import docker
import psutil
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess, free_port

FAST_CHECK = {"type": "http", "path": "/", "interval_s": 0.2, "timeout_s": 1, "retries": 25, "stable_s": 0.5}


def web_request(
    version: str, application: str = "web", *, run: dict[str, Any] | None = None, health: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A busybox httpd release whose page, built into /workspace, says `version`."""
    return {
        "application": application,
        "build": {"image": "local/busybox", "command": f"echo {version} > /workspace/index.html"},
        "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080, **(run or {})},
        "health_check": {**FAST_CHECK, **(health or {})},
    }


def fetch(url: str, timeout: float = 2) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode().strip()


def deploy(agent: AgentProcess, body: dict[str, Any], status: str = "succeeded") -> dict[str, Any]:
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == status, (final, agent.log(final["id"])[-3000:])
    return final


def release_containers(client: docker.DockerClient, application: str, agent: AgentProcess | None = None) -> list:
    """The application's release containers; only `agent`'s when given (other tests' agents deploy "web" too)."""
    labels = [f"deploy-agent.application={application}", "deploy-agent.role=release"]
    if agent is not None:
        instance = hashlib.sha256(str(agent.state_dir.resolve()).encode("utf-8")).hexdigest()[:16]
        labels.append(f"deploy-agent.instance={instance}")
    return client.containers.list(all=True, filters={"label": labels})


def test_container_release_answers_on_its_url(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """A release built from the workspace serves it on `url`; the application points at it."""
    final = deploy(agent, web_request("v1"))
    assert final["url"].startswith("http://127.0.0.1:")
    assert fetch(final["url"]) == "v1"
    assert final["smoke_test"]["passed"] is True
    assert final["smoke_test"]["url"].startswith("http://127.0.0.1:")
    assert final["pid"] and final["container_id"]
    container = docker_client.containers.get(final["container_id"])
    assert container.labels["deploy-agent.deployment"] == final["id"]
    assert container.labels["deploy-agent.application"] == "web"
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert container.attrs["HostConfig"]["Privileged"] is False
    assert container.attrs["State"]["Pid"] == final["pid"]
    log = agent.log(final["id"])
    assert " health agent | attempt 1/" in log
    app = agent.request("GET", "/v1/applications/web").json()
    assert app["current_deployment_id"] == final["id"] and app["url"] == final["url"] and app["state"] == "running"
    assert [a["name"] for a in agent.request("GET", "/v1/applications").json()["data"]] == ["web"]


def test_upgrade_switches_only_after_the_new_release_is_healthy(
    agent: AgentProcess, docker_client: docker.DockerClient
) -> None:
    """v2 replaces v1 only once healthy; requests during the switch all succeed; v1's container is gone."""
    first = deploy(agent, web_request("v1"))
    failures: list[str] = []
    answers: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            url = agent.request("GET", "/v1/applications/web").json()["url"]
            try:
                answers.append(fetch(url))
            except OSError as exc:
                failures.append(f"{url}: {exc}")
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        second = agent.submit(web_request("v2", health={"start_period_s": 1.5}))
        deploying = agent.wait_for(second["id"], lambda d: d["status"] == "deploying" and d["container_id"])
        # While v2 is being checked, v1 still serves and is still the application's release.
        assert fetch(first["url"]) == "v1"
        assert agent.request("GET", "/v1/applications/web").json()["current_deployment_id"] == first["id"]
        assert deploying["container_id"] != first["container_id"]
        final = agent.wait_for(second["id"], timeout=60)
        assert final["status"] == "succeeded", agent.log(second["id"])
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join()
    assert failures == []
    assert "v1" in answers and answers[-1] == "v2"
    assert [c.id for c in release_containers(docker_client, "web", agent)] == [final["container_id"]]
    assert agent.get(first["id"])["pid"] is None


def test_a_release_that_never_gets_healthy_fails_and_the_previous_keeps_serving(
    agent: AgentProcess, docker_client: docker.DockerClient
) -> None:
    """Health check never passes: deployment failed, new container removed, v1 still answers."""
    first = deploy(agent, web_request("v1"))
    broken = deploy(agent, web_request("v2", health={"path": "/missing", "retries": 3}), status="failed")
    assert broken["error"]["type"] == "health_check_failed"
    assert broken["smoke_test"]["passed"] is False
    assert any("404" in error for error in broken["smoke_test"]["errors"])
    assert broken["pid"] is None
    assert containers_of(docker_client, broken["id"]) == []
    assert fetch(first["url"]) == "v1"
    assert agent.request("GET", "/v1/applications/web").json()["current_deployment_id"] == first["id"]


def test_a_release_that_crashes_during_the_check_fails_fast(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """A release process that exits fails at once with its exit code and last output."""
    body = web_request("v1", run={"command": "echo about-to-crash; exit 3"}, health={"retries": 100, "interval_s": 1})
    started = time.monotonic()
    failed = deploy(agent, body, status="failed")
    assert time.monotonic() - started < 20
    assert failed["error"]["type"] == "release_exited"
    assert failed["exit_code"] == 3
    assert "code 3" in failed["error"]["message"]
    assert "about-to-crash" in failed["error"]["message"]
    assert containers_of(docker_client, failed["id"]) == []


def test_a_release_that_passes_once_then_exits_fails_within_stable_s(agent: AgentProcess) -> None:
    """Healthy once, then the process dies: the deployment fails instead of being reported done."""
    command = "httpd -p 8080 -h /workspace; sleep 1; echo going-down; exit 5"
    failed = deploy(agent, web_request("v1", run={"command": command}, health={"stable_s": 6}), status="failed")
    assert failed["error"]["type"] == "release_exited"
    assert "attempt 1/25: HTTP 200" in agent.log(failed["id"]) or "HTTP 200" in agent.log(failed["id"])
    assert failed["smoke_test"]["passed"] is False


def test_fixed_host_port_upgrade_and_failure_path(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """With a fixed host_port the old release stops first; a failed new one brings the old back."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    first = deploy(agent, web_request("v1", run={"host_port": port}))
    assert first["url"] == f"http://127.0.0.1:{port}" and fetch(url) == "v1"
    second = deploy(agent, web_request("v2", run={"host_port": port}))
    assert fetch(url) == "v2"
    assert [c.id for c in release_containers(docker_client, "web", agent)] == [second["container_id"]]
    broken = deploy(agent, web_request("v3", run={"host_port": port}, health={"path": "/missing", "retries": 2}), "failed")
    assert broken["error"]["type"] == "health_check_failed"
    deadline = time.monotonic() + 10
    while True:
        try:
            assert fetch(url) == "v2"
            break
        except OSError:
            assert time.monotonic() < deadline, "the previous release did not come back"
            time.sleep(0.1)
    app = agent.request("GET", "/v1/applications/web").json()
    assert app["current_deployment_id"] == second["id"] and app["state"] == "running"


def test_rollback_brings_back_an_earlier_release(agent: AgentProcess) -> None:
    """Rollback to v1 after v2: a new deployment with rollback_of, no build, serving v1 again."""
    first = deploy(agent, web_request("v1"))
    deploy(agent, web_request("v2"))
    response = agent.request("POST", f"/v1/deployments/{first['id']}/rollback")
    assert response.status_code == 201, response.text
    rollback = response.json()
    assert rollback["rollback_of"] == first["id"] and rollback["id"] != first["id"]
    final = agent.wait_for(rollback["id"], timeout=60)
    assert final["status"] == "succeeded", agent.log(rollback["id"])
    assert fetch(final["url"]) == "v1"
    assert " build " not in agent.log(rollback["id"])
    failed = deploy(agent, web_request("v3", health={"path": "/missing", "retries": 2}), status="failed")
    refused = agent.request("POST", f"/v1/deployments/{failed['id']}/rollback")
    assert refused.status_code == 409
    assert refused.json()["error"]["type"] == "conflict"


def test_pruning_beyond_retention(agent_factory, docker_client: docker.DockerClient) -> None:
    """Only the last N release images are kept; a rollback to a pruned one is a 409 that says so."""
    agent = agent_factory("retention", releases={"retention": 2, "drain_s": 0})
    deployments = [deploy(agent, web_request(f"v{i}", application="pruned")) for i in range(4)]
    ours = {f"deploy-agent/pruned:{d['id']}" for d in deployments}  # other runs' agents leave their own
    images = {tag for image in docker_client.images.list("deploy-agent/pruned") for tag in image.tags} & ours
    assert images == {f"deploy-agent/pruned:{d['id']}" for d in deployments[-2:]}
    refused = agent.request("POST", f"/v1/deployments/{deployments[0]['id']}/rollback")
    assert refused.status_code == 409
    assert "pruned" in refused.json()["error"]["message"]
    allowed = agent.request("POST", f"/v1/deployments/{deployments[2]['id']}/rollback")
    assert allowed.status_code == 201


def test_stop_and_start_an_application(agent: AgentProcess) -> None:
    """stop takes the release out of service; start brings the same release back."""
    final = deploy(agent, web_request("v1"))
    stopped = agent.request("POST", "/v1/applications/web/stop")
    assert stopped.status_code == 202 and stopped.json()["state"] == "stopped"
    with pytest.raises(OSError):
        fetch(final["url"])
    assert agent.request("POST", "/v1/applications/web/stop").status_code == 409
    started = agent.request("POST", "/v1/applications/web/start")
    assert started.status_code == 202, started.text
    assert started.json()["state"] == "running"
    assert fetch(started.json()["url"]) == "v1"


def test_kill_during_deploying_keeps_the_previous_release(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """Kill while the new container release is being checked: it is removed, v1 keeps serving."""
    first = deploy(agent, web_request("v1"))
    second = agent.submit(web_request("v2", health={"start_period_s": 30}))
    agent.wait_for(second["id"], lambda d: d["status"] == "deploying" and d["container_id"])
    began = time.monotonic()
    assert agent.request("POST", f"/v1/deployments/{second['id']}/kill").status_code == 202
    final = agent.wait_for(second["id"], timeout=15)
    assert final["status"] == "cancelled"
    assert time.monotonic() - began < 10
    assert containers_of(docker_client, second["id"]) == []
    assert fetch(first["url"]) == "v1"


def process_request(version: str, **health: Any) -> dict[str, Any]:
    """A host-process release: busybox httpd on $PORT in the built workspace, with a child process."""
    return {
        "application": "proc",
        "build": {"image": "local/busybox", "command": f"echo {version} > /workspace/index.html"},
        "run": {"runtime": "process", "command": "sleep 300 & exec busybox httpd -f -p $PORT -h ."},
        "health_check": {**FAST_CHECK, **health},
    }


def test_process_release_tracked_checked_and_replaced(agent: AgentProcess) -> None:
    """A host process serves the built workspace; replacing it ends its whole tree."""
    first = deploy(agent, process_request("p1"))
    assert fetch(first["url"]) == "p1"
    process = psutil.Process(first["pid"])
    children = process.parent().children(recursive=True) if process.parent() else []
    assert "httpd" in " ".join(process.cmdline())
    assert any("sleep" in " ".join(child.cmdline()) for child in children)
    tree = [process, *children]
    second = deploy(agent, process_request("p2"))
    assert fetch(second["url"]) == "p2"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"
    assert agent.get(first["id"])["pid"] is None
    assert "release stdout" in agent.log(second["id"]) or "release" in agent.log(second["id"])
    agent.request("POST", "/v1/applications/proc/stop")
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(second["pid"]).wait(timeout=10)
        psutil.Process(second["pid"])


def test_kill_during_deploying_a_process_release(agent: AgentProcess) -> None:
    """Kill while a host-process release is checked: its process is gone, status cancelled."""
    created = agent.submit(process_request("p1", start_period_s=30))
    deploying = agent.wait_for(created["id"], lambda d: d["status"] == "deploying" and d["pid"])
    process = psutil.Process(deploying["pid"])
    assert agent.request("POST", f"/v1/deployments/{created['id']}/kill").status_code == 202
    assert agent.wait_for(created["id"], timeout=15)["status"] == "cancelled"
    process.wait(timeout=10)
    assert not psutil.pid_exists(deploying["pid"]) or psutil.Process(deploying["pid"]).create_time() != process.create_time()
