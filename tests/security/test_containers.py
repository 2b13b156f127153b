"""Containers: no-new-privileges and dropped capabilities everywhere, release limits, binds only where allowed."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any, Callable

import docker

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess
from tests.security.conftest import assert_invalid, wait_until

FAST_CHECK = {"type": "http", "path": "/", "interval_s": 0.2, "timeout_s": 1, "retries": 25, "stable_s": 0.5}
MiB = 1024**2


def web_request(run: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "application": "web",
        "build": {"image": "local/busybox", "command": "echo ok > /workspace/index.html"},
        "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080, **(run or {})},
        "health_check": FAST_CHECK,
    }


def deploy(agent: AgentProcess, body: dict[str, Any]) -> dict[str, Any]:
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    return final


def assert_hardened(attrs: dict[str, Any]) -> None:
    """no-new-privileges is on and capabilities are dropped."""
    options = attrs["HostConfig"]["SecurityOpt"] or []
    assert any(o in ("no-new-privileges", "no-new-privileges:true", "no-new-privileges=true") for o in options), options
    assert attrs["HostConfig"]["Privileged"] is False
    assert attrs["HostConfig"]["CapDrop"], attrs["HostConfig"]


def test_release_containers_get_the_config_default_limits(
    agent_factory: Callable[..., AgentProcess], docker_client: docker.DockerClient
) -> None:
    """[docker] release_memory/cpus/pids become the release container's Memory, NanoCpus and PidsLimit."""
    agent = agent_factory(docker={"release_memory": "96m", "release_cpus": 0.5, "release_pids": 100})
    final = deploy(agent, web_request())
    attrs = docker_client.containers.get(final["container_id"]).attrs
    assert attrs["HostConfig"]["Memory"] == 96 * MiB
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["PidsLimit"] == 100


def test_release_limits_have_built_in_defaults(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """Without release_* keys a release has 1 GiB, 1 CPU and 512 PIDs; it is hardened like a build."""
    final = deploy(agent, web_request())
    attrs = docker_client.containers.get(final["container_id"]).attrs
    assert attrs["HostConfig"]["Memory"] == 1024 * MiB
    assert attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert attrs["HostConfig"]["PidsLimit"] == 512
    assert_hardened(attrs)
    assert any(cap in ("ALL", "CAP_ALL") for cap in attrs["HostConfig"]["CapDrop"]), attrs["HostConfig"]["CapDrop"]
    status = docker_client.containers.get(final["container_id"]).exec_run(["cat", "/proc/1/status"]).output.decode()
    assert "NoNewPrivs:\t1" in status, status


def test_run_limits_override_the_defaults(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """run.memory, run.cpus and run.pids set the release container's limits."""
    final = deploy(agent, web_request({"memory": 64 * MiB, "cpus": 0.25, "pids": 50}))
    attrs = docker_client.containers.get(final["container_id"]).attrs
    assert attrs["HostConfig"]["Memory"] == 64 * MiB
    assert attrs["HostConfig"]["NanoCpus"] == 250_000_000
    assert attrs["HostConfig"]["PidsLimit"] == 50


def test_run_limits_are_validated(agent: AgentProcess) -> None:
    """A negative, zero or non-numeric release limit is 422 naming the field."""
    for field, value in (("memory", -1), ("memory", "lots"), ("cpus", 0), ("cpus", "all"), ("pids", 0), ("pids", 2**70)):
        response = agent.request("POST", "/v1/deployments", json=web_request({field: value}))
        assert_invalid(response, f"run.{field}")


def test_build_containers_run_without_new_privileges(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """A running build container has no-new-privileges and dropped capabilities; the build sees NoNewPrivs 1."""
    created = agent.submit(
        {"application": "job", "build": {"image": "local/busybox", "command": "grep NoNewPrivs /proc/self/status; sleep 5"}}
    )

    def build_container_attrs() -> dict[str, Any] | None:
        for container in containers_of(docker_client, created["id"]):
            try:
                return docker_client.api.inspect_container(container.id)
            except docker.errors.NotFound:
                continue  # removed between the listing and the inspection
        return None

    assert_hardened(wait_until(build_container_attrs, 30, "no build container appeared"))
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", final
    assert "NoNewPrivs:\t1" in agent.log(created["id"])


def test_bind_to_every_interface_is_refused_by_default(agent: AgentProcess) -> None:
    """run.bind = 0.0.0.0 with the default docker.bind_addresses (loopback) is 422 naming run.bind."""
    for bind in ("0.0.0.0", "::", "172.17.0.1"):
        assert_invalid(agent.request("POST", "/v1/deployments", json=web_request({"bind": bind})), "run.bind")
    assert agent.request("GET", "/v1/deployments").json()["data"] == []


def test_an_allowed_bind_address_is_used_and_reported(
    agent_factory: Callable[..., AgentProcess], docker_client: docker.DockerClient
) -> None:
    """With bind_addresses allowing them, 0.0.0.0 and 172.17.0.1 are bound as asked and `url` says where."""
    agent = agent_factory(docker={"bind_addresses": ["127.0.0.1", "0.0.0.0", "172.17.0.1"]})
    for bind in ("172.17.0.1", "0.0.0.0"):
        final = deploy(agent, web_request({"bind": bind}))
        ports = docker_client.containers.get(final["container_id"]).attrs["NetworkSettings"]["Ports"]["8080/tcp"]
        bound = {(entry["HostIp"], entry["HostPort"]) for entry in ports}
        url = urllib.parse.urlsplit(final["url"])
        assert (url.hostname, str(url.port)) in bound, (final["url"], ports)
        assert url.hostname == bind
        if bind != "0.0.0.0":
            with urllib.request.urlopen(final["url"], timeout=5) as response:
                assert response.read().decode().strip() == "ok"
    final = deploy(agent, web_request())
    url = urllib.parse.urlsplit(final["url"])
    assert url.hostname == "127.0.0.1"
