"""Targets.for_deployment: the one place a deployment's server and runtime kinds are looked at."""

from __future__ import annotations

import pytest

from agent.models import BuildSpec, DeploymentSpec, RunSpec
from agent.targets.builds import ContainerBuilder, ProcessBuilder, ServerContainerBuilder
from agent.targets.local_container import LocalContainerTarget
from agent.targets.local_process import LocalProcessTarget
from agent.targets.remote_container import RemoteContainerTarget
from agent.targets.remote_process import RemoteProcessTarget
from agent.targets.resolver import Targets
from tests.targets.conftest import deployment

CONTAINER_BUILD = BuildSpec(image="local/busybox", command="true")
PROCESS_BUILD = BuildSpec(image=None, command="true", runtime="process")
CONTAINER_RUN = RunSpec(image="local/busybox", command="httpd -f")
PROCESS_RUN = RunSpec(runtime="process", command="sleep 60")


@pytest.mark.parametrize(
    ("server", "build", "run", "target_type", "builder_type"),
    [
        ("local", CONTAINER_BUILD, CONTAINER_RUN, LocalContainerTarget, ContainerBuilder),
        ("local", CONTAINER_BUILD, PROCESS_RUN, LocalProcessTarget, ContainerBuilder),
        ("local", CONTAINER_BUILD, None, LocalContainerTarget, ContainerBuilder),
        ("local", None, PROCESS_RUN, LocalProcessTarget, ContainerBuilder),
        ("edge", CONTAINER_BUILD, CONTAINER_RUN, RemoteContainerTarget, ServerContainerBuilder),
        ("edge", PROCESS_BUILD, PROCESS_RUN, RemoteProcessTarget, ProcessBuilder),
        ("edge", PROCESS_BUILD, None, RemoteProcessTarget, ProcessBuilder),
        ("edge", CONTAINER_BUILD, None, RemoteContainerTarget, ServerContainerBuilder),
        ("edge", None, PROCESS_RUN, RemoteProcessTarget, ServerContainerBuilder),
        # Mixed: the build runs one way, the release another, on the same server.
        ("edge", PROCESS_BUILD, CONTAINER_RUN, RemoteContainerTarget, ProcessBuilder),
        ("edge", CONTAINER_BUILD, PROCESS_RUN, RemoteProcessTarget, ServerContainerBuilder),
    ],
)
async def test_each_deployment_gets_the_target_and_builder_of_its_server_and_kinds(
    targets: Targets, server: str, build: BuildSpec | None, run: RunSpec | None, target_type: type, builder_type: type
) -> None:
    """The release's kind picks the target (the build's when there is no release); the build's kind its builder."""
    spec = DeploymentSpec(application="web", server=server, build=build, run=run)
    target = targets.for_deployment(deployment(spec))
    assert type(target) is target_type
    builder = getattr(target.builder, "inner", target.builder)  # type: ignore[attr-defined]  # wrapped by its availability gate
    assert type(builder) is builder_type
    assert target.may_be_away is (server != "local")


async def test_targets_are_made_once_and_share_their_server(targets: Targets) -> None:
    """The same kinds on the same server resolve to the same target; a server's runtimes are made once."""
    container = deployment(DeploymentSpec(application="web", server="edge", run=CONTAINER_RUN))
    process = deployment(DeploymentSpec(application="api", server="edge", run=PROCESS_RUN))
    first = targets.for_deployment(container)
    assert targets.for_deployment(deployment(container.spec)) is first
    other = targets.for_deployment(process)
    assert other is not first
    assert other.server is first.server  # type: ignore[attr-defined]
