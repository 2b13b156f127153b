"""Releases survive an agent crash at any moment: just after the switch, and with an unrecorded process.

Each test SIGKILLs the real daemon at a chosen point of a deployment, starts it again on the
same state directory, and looks at what a user sees: statuses, the application, containers,
host processes and what the URL answers.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import docker
import psutil
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess
from tests.e2e.test_releases import FAST_CHECK, deploy, fetch, release_containers, web_request


def process_request(version: str, application: str, **health: Any) -> dict[str, Any]:
    """A host-process release (busybox httpd on $PORT in the built workspace), as the admin token may submit."""
    return {
        "application": application,
        "build": {"image": "local/busybox", "command": f"echo {version} > /workspace/index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": {**FAST_CHECK, **health},
    }


def wait_until_current(agent: AgentProcess, application: str, deployment_id: str, timeout: float = 60) -> None:
    """Polls the application until it points at `deployment_id` (the switch is committed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = agent.request("GET", f"/v1/applications/{application}")
        if response.status_code == 200 and response.json()["current_deployment_id"] == deployment_id:
            return
        time.sleep(0.02)
    raise AssertionError(f"{application} never switched to {deployment_id}: {agent.log(deployment_id)[-2000:]}")


def process_of(deployment: dict[str, Any]) -> psutil.Process:
    """The release's process, proven by the create time the agent reported."""
    process = psutil.Process(deployment["pid"])
    assert process.create_time() == pytest.approx(deployment["pid_started_at"], abs=0.01)
    return process


def assert_gone(process: psutil.Process, timeout: float = 10) -> None:
    """The process (this very one, not a reuse of its pid) has ended."""
    _, alive = psutil.wait_procs([process], timeout=timeout)
    assert alive == [], f"process {process.pid} still runs"


@pytest.fixture
def host_processes(tmp_path: Path) -> Iterator[None]:
    """Ends the host-process releases the test's agents leave running (they outlive the agent by design)."""
    yield
    for process in psutil.process_iter():
        try:
            if tmp_path in Path(process.cwd()).parents:
                process.kill()
        except (psutil.Error, OSError):
            continue


def test_a_crash_just_after_the_switch_keeps_the_new_container_release(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """SIGKILL right after the switch: the same container keeps serving v2, the deployment succeeds, v1 goes."""
    agent = agent_factory("switched-container", releases={"drain_s": 60})
    first = deploy(agent, web_request("v1", application="crashc"))
    second = agent.submit(web_request("v2", application="crashc"))
    wait_until_current(agent, "crashc", second["id"])
    agent.stop(signal.SIGKILL)
    container = containers_of(docker_client, second["id"])[0]
    started_at = container.attrs["State"]["StartedAt"]
    assert containers_of(docker_client, first["id"]), "v1 was still draining at the crash"

    agent.start()
    final = agent.wait_for(second["id"], timeout=30)
    assert final["status"] == "succeeded", (final, agent.log(second["id"])[-2000:])
    assert final["container_id"] == container.id and final["pid"] and final["url"]
    container.reload()
    assert container.status == "running" and container.attrs["State"]["StartedAt"] == started_at
    assert fetch(final["url"]) == "v2"
    view = agent.request("GET", "/v1/applications/crashc").json()
    assert view["current_deployment_id"] == second["id"] and view["state"] == "running" and view["url"] == final["url"]
    assert containers_of(docker_client, first["id"]) == []
    assert [c.id for c in release_containers(docker_client, "crashc")] == [container.id]
    assert agent.get(first["id"])["pid"] is None


def test_a_crash_just_after_the_switch_keeps_the_new_process_release(agent_factory, host_processes) -> None:
    """SIGKILL right after the switch of a host process: the same PID keeps serving, p1 is stopped, it succeeds."""
    agent = agent_factory("switched-process", releases={"drain_s": 60})
    first = deploy(agent, process_request("p1", "crashp"))
    old = process_of(first)
    second = agent.submit(process_request("p2", "crashp"))
    wait_until_current(agent, "crashp", second["id"])
    new = process_of(agent.get(second["id"]))
    agent.stop(signal.SIGKILL)
    assert old.is_running(), "p1 was still draining at the crash"

    agent.start()
    final = agent.wait_for(second["id"], timeout=30)
    assert final["status"] == "succeeded", (final, agent.log(second["id"])[-2000:])
    assert final["pid"] == new.pid and final["pid_started_at"] == pytest.approx(new.create_time(), abs=0.01)
    assert new.is_running()
    assert fetch(final["url"]) == "p2"
    assert_gone(old)
    assert agent.get(first["id"])["pid"] is None
    view = agent.request("GET", "/v1/applications/crashp").json()
    assert view["current_deployment_id"] == second["id"] and view["pid"] == new.pid


def test_a_process_release_no_deployment_records_is_stopped_after_a_restart(agent_factory, host_processes) -> None:
    """A crash before a started process release was recorded: the restart's sweep stops it; p1 keeps serving."""
    agent = agent_factory("unrecorded-process")
    first = deploy(agent, process_request("p1", "orphanp"))
    checking = agent.submit(process_request("p2", "orphanp", start_period_s=60))
    started = agent.wait_for(checking["id"], lambda d: d["status"] == "deploying" and d["pid"])
    orphan = process_of(started)
    agent.stop(signal.SIGKILL)
    # As if the agent had died between starting the supervisor and storing its handle.
    with sqlite3.connect(agent.state_dir / "agent.db") as db:
        db.execute("UPDATE deployments SET release = NULL, pid = NULL WHERE id = ?", (checking["id"],))

    agent.start()
    assert_gone(orphan)
    interrupted = agent.get(checking["id"])
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "agent_restarted"
    assert process_of(agent.get(first["id"])).is_running()
    assert fetch(first["url"]) == "p1"
