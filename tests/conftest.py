"""Shared fixtures: a real Docker engine and the local busybox base image.

Docker is never mocked and never skipped: when the engine is unreachable the
tests that need it fail and say how to fix it (scripts/setup-machine.sh).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import docker
import pytest

BASE_IMAGE = os.environ.get("DEPLOY_AGENT_BASE_IMAGE", "local/busybox")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker SDK client for assertions on containers and images."""
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        pytest.fail(f"Docker engine unreachable ({exc}); run scripts/setup-machine.sh", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The busybox image built by scripts/setup-machine.sh (no registry can be reached)."""
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {BASE_IMAGE} missing; run scripts/setup-machine.sh", pytrace=False)
    return BASE_IMAGE


def containers_of(client: docker.DockerClient, deployment_id: str) -> list:
    """Every container, running or not, labelled with this deployment, inspected.

    Listed sparse, then inspected one by one: the SDK's non-sparse list inspects
    inside the call and raises NotFound for a container removed in between (a
    build that just ended), which is no container of ours any more.
    """
    listed = client.containers.list(all=True, sparse=True, filters={"label": f"deploy-agent.deployment={deployment_id}"})
    found = []
    for container in listed:
        try:
            found.append(client.containers.get(container.id))
        except docker.errors.NotFound:
            continue
    return found


def log_entries(path: Path) -> list[tuple[str, str, str]]:
    """A deployment log as (stage, stream, text) triples."""
    entries = []
    for line in path.read_text().splitlines():
        head, _, text = line.partition(" | ")
        _, stage, stream = head.split(" ")
        entries.append((stage, stream, text))
    return entries


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: Docker and sshd tests must really run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) skipped; a skip in CI is a failure", red=True)


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on loopback with its own port, host key and authorized_keys."""
    from tests.sshd import start_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def sshd_remote(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd at an address of its own, inside a network namespace (10.23W.x.2:22, W the xdist worker)."""
    from tests.sshd import make_namespace, remove_namespace, start_sshd

    index = next(_NAMESPACES)
    # One /16 per xdist worker: two workers at the same address would each reach the other's
    # sshd now and then, and its host key is not the one they trust. 10.231.0.x is the swarm's.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    name = f"datest{os.getpid() % 1000}n{index}"
    host_address, peer_address = f"10.{232 + worker}.{index}.1", f"10.{232 + worker}.{index}.2"
    make_namespace(name, host_address, peer_address)
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd-remote"), host=peer_address, namespace=name)
        yield server
        server.stop()
    finally:
        remove_namespace(name)


_NAMESPACES = iter(range(1, 250))
