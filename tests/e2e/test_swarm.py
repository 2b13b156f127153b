"""Swarm applications on the real two-node swarm and the loopback registry that scripts/setup-machine.sh starts.

The nodes: this machine's engine (the manager) and a second engine in a network namespace,
joined as a worker (scripts/swarm-worker.sh), which pulls release images from the registry.

This machine's kernel has no IPVS, so the routing mesh does not answer on published ports:
each task is checked from inside (`docker exec` into its container), as Swarm's own health
check does.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import docker
import pytest
import requests

from tests.e2e.conftest import AgentProcess

pytestmark = [pytest.mark.docker, pytest.mark.slow]
REGISTRY = "127.0.0.1:5000"
FAST = {"type": "http", "path": "/", "interval_s": 1, "retries": 10}


WORKER_SOCKET = "unix:///run/deploy-agent-worker.sock"


class Swarm:
    """The swarm's two engines: this machine's (the manager) and the worker's (scripts/swarm-worker.sh)."""

    def __init__(self, manager: docker.DockerClient, worker: docker.DockerClient) -> None:
        self.manager, self.worker = manager, worker
        self.engines = {
            client.info()["Swarm"]["NodeID"]: client for client in (manager, worker)
        }

    @property
    def services(self) -> Any:
        return self.manager.services

    @property
    def api(self) -> Any:
        return self.manager.api

    def containers(self, application: str) -> list[Any]:
        label = {"label": f"com.docker.swarm.service.name=deploy-agent-{application}"}
        return [c for client in (self.manager, self.worker) for c in client.containers.list(filters=label)]

    def container(self, node_id: str, container_id: str) -> Any:
        return self.engines[node_id].containers.get(container_id)


@pytest.fixture
def swarm(docker_client: docker.DockerClient) -> Iterator[Swarm]:
    if docker_client.info().get("Swarm", {}).get("LocalNodeState") != "active":
        pytest.fail("no swarm: run scripts/setup-machine.sh (it initialises one)")
    try:
        requests.get(f"http://{REGISTRY}/v2/", timeout=2).raise_for_status()
    except requests.RequestException as exc:
        pytest.fail(f"no registry on {REGISTRY} ({exc}): run scripts/setup-machine.sh")
    ready = [n for n in docker_client.nodes.list() if n.attrs["Status"]["State"] == "ready"]
    if len(ready) < 2:
        pytest.fail(f"{len(ready)} ready swarm node(s), not 2: run scripts/setup-machine.sh (scripts/swarm-worker.sh)")
    worker = docker.DockerClient(base_url=WORKER_SOCKET, timeout=60)
    try:
        yield Swarm(docker_client, worker)
    finally:
        worker.close()


@pytest.fixture
def swarm_agent(agent_factory, swarm: Swarm) -> Iterator[AgentProcess]:
    agent = agent_factory("swarm", extra_toml=f'[registry]\nurl = "{REGISTRY}"\n')
    yield agent
    for service in swarm.services.list(filters={"label": "deploy-agent.application"}):
        if service.attrs["Spec"]["Labels"].get("deploy-agent.deployment", "") in agent_ids(agent):
            service.remove()


def agent_ids(agent: AgentProcess) -> set[str]:
    return {path.stem for path in (agent.state_dir / "logs").glob("dep_*.log")}


def swarm_web(version: str, application: str, replicas: int = 2, **run: Any) -> dict[str, Any]:
    return {
        "application": application,
        "build": {"image": "local/busybox", "command": f"echo {version} > /workspace/index.html"},
        "run": {"runtime": "swarm", "replicas": replicas,
                "command": ["sh", "-c", "echo serving $(cat /workspace/index.html); echo ready >&2; "
                            "exec httpd -f -p 8080 -h /workspace"],
                "port": 8080, **run},
        "health_check": FAST,
    }


def ask(container: Any, deadline_s: float = 10) -> tuple[int, str] | None:
    """The exit code and page of a wget inside the container; None if the container is going away.

    An exec into a container that Swarm stops meanwhile can leave Docker's attach stream open
    forever (the SDK reads it with no timeout), so the exec runs in a thread given a deadline.
    """
    outcome: list[tuple[int, str] | None] = [None]

    def run() -> None:
        try:
            result = container.exec_run(["wget", "-q", "-O-", "http://127.0.0.1:8080/"])
        except docker.errors.APIError:
            return  # a task that is being replaced
        outcome[0] = (result.exit_code, result.output.decode().strip())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline_s)
    return outcome[0]


def pages(swarm: Swarm, application: str) -> list[str]:
    """What each running task of the application's service serves, on either node, asked from inside its container."""
    found = []
    for container in swarm.containers(application):
        answer = ask(container)
        if answer is not None:
            found.append(answer[1] if answer[0] == 0 else f"error {answer[0]}")
    return sorted(found)


class TaskPoller:
    """A client of the application during an update: asks every task Swarm has in service, ten times a second.

    Without IPVS the routing mesh does not answer here, so each request goes from inside a task
    that Swarm counts running (healthy, as its check gates that state), which is where the mesh
    would send it. A request fails when no task is in service, or when one in service does not
    answer (unless Swarm took it out of service meanwhile).
    """

    def __init__(self, swarm: Swarm, application: str) -> None:
        self.swarm, self.service = swarm, f"deploy-agent-{application}"
        self.answers: list[str] = []
        self.failures: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TaskPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _in_service(self) -> list[dict[str, Any]]:
        tasks = self.swarm.api.tasks(filters={"service": self.service, "desired-state": "running"})
        return [task for task in tasks if task["Status"]["State"] == "running"]

    def _run(self) -> None:
        while not self._done.wait(0.1):
            tasks = self._in_service()
            if not tasks:
                self.failures.append("no task in service")
                continue
            for task in tasks:
                answer = self._ask(task["NodeID"], task["Status"]["ContainerStatus"]["ContainerID"])
                if answer is not None:
                    self.answers.append(answer)
                elif task["ID"] in {t["ID"] for t in self._in_service()}:
                    self.failures.append(f"task {task['Slot']} in service did not answer")

    def _ask(self, node_id: str, container_id: str) -> str | None:
        try:
            container = self.swarm.container(node_id, container_id)
        except docker.errors.APIError:
            return None
        answer = ask(container)
        return answer[1] if answer is not None and answer[0] == 0 else None


def eventually(check, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(0.5)


# Six rollouts and a Swarm rollback in one story take 100 to 120 s on 2 cores, past the suite's
# 120 s default; each step has its own deadline, so a hang still fails with its place.
@pytest.mark.timeout(300)
def test_a_swarm_application_is_created_updated_scaled_rolled_back_and_stopped(
    swarm_agent: AgentProcess, swarm: Swarm
) -> None:
    agent, app = swarm_agent, "swweb"
    first = agent.wait_for(agent.submit(swarm_web("v1", app))["id"], timeout=120)
    assert first["status"] == "succeeded", agent.log(first["id"])
    assert first["pid"] is None and first["container_id"] is None
    assert first["release_image"].startswith(f"{REGISTRY}/deploy-agent/{app}:")
    assert first["url"] and first["url"].startswith("http://127.0.0.1:")
    application = agent.request("GET", f"/v1/applications/{app}").json()
    assert application["replicas"] == {"desired": 2, "running": 2, "healthy": 2}
    # Spread over the two nodes: the worker pulled the release image from the registry.
    assert sorted(application["nodes"]) == sorted(n.attrs["Description"]["Hostname"] for n in swarm.manager.nodes.list())
    assert len(application["nodes"]) == 2
    assert [len(client.containers.list(filters={"label": f"com.docker.swarm.service.name=deploy-agent-{app}"}))
            for client in (swarm.manager, swarm.worker)] == [1, 1]
    assert pages(swarm, app) == ["v1", "v1"]
    # Each task's output is in the deployment log, by slot and stream, before the verdict.
    log = agent.log(first["id"])
    for slot in (1, 2):
        assert f"release stdout | task {slot}: serving v1" in log, log
        assert f"release stderr | task {slot}: ready" in log, log
    assert log.index("task 1: serving v1") < log.index("is healthy")
    service = swarm.services.get(f"deploy-agent-{app}")
    update = service.attrs["Spec"]["UpdateConfig"]
    assert update["Order"] == "start-first" and update["FailureAction"] == "rollback"

    # Start-first: while v2 rolls out, every request is answered, first by v1, then by v2.
    with TaskPoller(swarm, app) as poller:
        second = agent.wait_for(agent.submit(swarm_web("v2", app))["id"], timeout=120)
    assert second["status"] == "succeeded", agent.log(second["id"])
    assert poller.failures == [], poller.failures
    assert {"v1", "v2"} <= set(poller.answers) and poller.answers[-1] == "v2"
    eventually(lambda: pages(swarm, app) == ["v2", "v2"])

    # A release that never becomes healthy: Swarm rolls it back and v2 keeps serving.
    broken = swarm_web("v3", app, command=["sh", "-c", "sleep 600"])
    broken["health_check"] = {**FAST, "retries": 3}
    with TaskPoller(swarm, app) as poller:
        failed = agent.wait_for(agent.submit(broken)["id"], timeout=180)
    assert failed["status"] == "failed" and "rolled the service back" in failed["error"]["message"], failed
    # The broken tasks never came into service: every request was answered by v2.
    assert poller.failures == [] and set(poller.answers) == {"v2"}, (poller.failures, set(poller.answers))
    eventually(lambda: pages(swarm, app) == ["v2", "v2"])
    assert agent.request("GET", f"/v1/applications/{app}").json()["current_deployment_id"] == second["id"]

    scaled = agent.request("POST", f"/v1/applications/{app}/scale", json={"replicas": 3})
    assert scaled.status_code == 202, scaled.text
    eventually(lambda: pages(swarm, app) == ["v2", "v2", "v2"])
    eventually(lambda: agent.request("GET", f"/v1/applications/{app}").json()["replicas"]["healthy"] == 3)
    bad_scale = agent.request("POST", f"/v1/applications/{app}/scale", json={"replicas": -1})
    assert bad_scale.status_code == 422

    rollback = agent.request("POST", f"/v1/deployments/{first['id']}/rollback")
    assert rollback.status_code == 201, rollback.text
    rolled = agent.wait_for(rollback.json()["id"], timeout=120)
    assert rolled["status"] == "succeeded", agent.log(rolled["id"])
    eventually(lambda: pages(swarm, app) == ["v1", "v1"])

    assert agent.request("POST", f"/v1/applications/{app}/stop").status_code == 202
    eventually(lambda: pages(swarm, app) == [])
    assert agent.request("POST", f"/v1/applications/{app}/start").status_code == 202
    eventually(lambda: pages(swarm, app) == ["v1", "v1"])

    # A start brings back the count the service had when stopped, a scale since included.
    assert agent.request("POST", f"/v1/applications/{app}/scale", json={"replicas": 3}).status_code == 202
    eventually(lambda: pages(swarm, app) == ["v1", "v1", "v1"])
    assert agent.request("POST", f"/v1/applications/{app}/stop").status_code == 202
    eventually(lambda: pages(swarm, app) == [])
    assert agent.request("POST", f"/v1/applications/{app}/start").status_code == 202
    eventually(lambda: pages(swarm, app) == ["v1", "v1", "v1"])


def start_slow_update(
    agent: AgentProcess, app: str, old: str, new: str, *, start_period_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Deploys `old`, then submits `new` with a health check slow to pass; returns both once `new` rolls out."""
    first = agent.wait_for(agent.submit(swarm_web(old, app))["id"], timeout=120)
    assert first["status"] == "succeeded", agent.log(first["id"])
    slow = swarm_web(new, app)
    slow["health_check"] = {**FAST, "start_period_s": start_period_s}
    rolling = agent.submit(slow)
    agent.wait_for(rolling["id"], lambda d: d["stage"] == "health", timeout=120)
    return first, rolling


def test_a_kill_while_a_swarm_update_rolls_out_rolls_the_service_back(
    swarm_agent: AgentProcess, swarm: Swarm
) -> None:
    agent, app = swarm_agent, "swkill"
    first, rolling = start_slow_update(agent, app, "k1", "k2", start_period_s=30)
    killed = agent.request("POST", f"/v1/deployments/{rolling['id']}/kill")
    assert killed.status_code == 202 and killed.json()["status"] == "cancelled", killed.text
    image = swarm.services.get(f"deploy-agent-{app}").attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image.split("@")[0] == first["release_image"]
    eventually(lambda: pages(swarm, app) == ["k1", "k1"])


def test_swarm_requests_are_checked(agent_factory, swarm_agent: AgentProcess) -> None:
    plain = agent_factory("no-registry")
    refused = plain.request("POST", "/v1/deployments", json=swarm_web("x", "swcheck"))
    assert refused.status_code == 422 and "[registry]" in refused.text, refused.text
    container = {"application": "swcheck", "run": {"image": "local/busybox", "replicas": 2}}
    assert swarm_agent.request("POST", "/v1/deployments", json=container).status_code == 422
    constraints = swarm_web("x", "swcheck", constraints=["not a constraint"])
    response = swarm_agent.request("POST", "/v1/deployments", json=constraints)
    assert response.status_code == 422 and "run.constraints[0]" in response.text
    scale = swarm_agent.request("POST", "/v1/applications/nothing/scale", json={"replicas": 2})
    assert scale.status_code == 404


def test_an_agent_restart_during_a_swarm_update_watches_it_to_its_end(
    swarm_agent: AgentProcess, swarm: Swarm
) -> None:
    import signal

    agent, app = swarm_agent, "swrestart"
    _, rolling = start_slow_update(agent, app, "r1", "r2", start_period_s=8)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent.start()
    final = agent.wait_for(rolling["id"], timeout=180)
    assert final["status"] == "succeeded", agent.log(rolling["id"])
    log = agent.log(rolling["id"])
    assert "watching it to its end" in log
    # Output of the new tasks while the agent was away is there, and none of it twice.
    for slot in (1, 2):
        assert log.count(f"task {slot}: serving r2") == 1, log
    eventually(lambda: pages(swarm, app) == ["r2", "r2"])
    assert agent.request("GET", f"/v1/applications/{app}").json()["current_deployment_id"] == rolling["id"]


def test_retention_prunes_old_release_images_from_the_registry(
    agent_factory, swarm: Swarm
) -> None:
    agent = agent_factory("swarm-prune", extra_toml=f'[registry]\nurl = "{REGISTRY}"\n', releases={"retention": 2})
    app = "swprune"
    try:
        ids = []
        for version in ("p1", "p2", "p3"):
            done = agent.wait_for(agent.submit(swarm_web(version, app, replicas=1))["id"], timeout=120)
            assert done["status"] == "succeeded", agent.log(done["id"])
            ids.append(done["id"])
        tags = requests.get(f"http://{REGISTRY}/v2/deploy-agent/{app}/tags/list", timeout=5).json()["tags"] or []
        assert sorted(tags) == sorted(ids[1:]), tags
        assert f"{REGISTRY}/deploy-agent/{app}:{ids[0]}" in agent.log(ids[2])
        # What was pruned cannot be rolled back to; what is kept can.
        assert agent.request("POST", f"/v1/deployments/{ids[0]}/rollback").status_code == 409
        rolled = agent.wait_for(agent.request("POST", f"/v1/deployments/{ids[1]}/rollback").json()["id"], timeout=120)
        assert rolled["status"] == "succeeded", agent.log(rolled["id"])
        eventually(lambda: pages(swarm, app) == ["p2"])
    finally:
        for service in swarm.services.list(filters={"name": f"deploy-agent-{app}"}):
            service.remove()
