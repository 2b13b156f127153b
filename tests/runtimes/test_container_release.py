"""Releases in the container runtime against a real Docker engine: serve, ports, output, stop, resume, images."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, Mapping

import docker
import pytest

from agent.config import DockerSettings
from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.models import new_deployment_id
from agent.runtimes.base import ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.container import KEPT_CAPABILITIES, BuildJob, ContainerRuntime, ReleaseContainer
from tests.conftest import containers_of, log_entries

# Agents started by other tests on the same engine must not take these containers for theirs.
INSTANCE = f"tests-{uuid.uuid4().hex[:12]}"
# One application per test run, so that image listings see this run's images only.
APPLICATION = f"testapp-{uuid.uuid4().hex[:8]}"
HTTPD = ("httpd", "-f", "-p", "8080", "-h", "/workspace")
INDEX_HTML = "<h1>built by the build</h1>"
BUILD_COMMAND = f"echo '{INDEX_HTML}' > /workspace/index.html && mkdir -p /workspace/sub && echo nested > /workspace/sub/file.txt"
# No proxy from the environment may stand between the test and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


async def _noop_on_start(_container_id: str, _pid: int) -> None:
    return None


async def build_release_image(
    runtime: ContainerRuntime,
    workspace: Path,
    log_path: Path,
    command: str = BUILD_COMMAND,
    env: Mapping[str, str] | None = None,
) -> str:
    """Builds a release image the way the engine does: run_build with commit_image."""
    reference = f"deploy-agent/{APPLICATION}:{new_deployment_id().lower()}"
    job = BuildJob(
        deployment_id=new_deployment_id(),
        application=APPLICATION,
        image="local/busybox",
        command=command,
        env=env or {},
        timeout_s=60,
        workspace=workspace,
        commit_image=reference,
    )
    with DeploymentLog(log_path) as log:
        result = await runtime.run_build(job, log, _noop_on_start)
    assert result.image == reference, f"the build failed: {log_path.read_text()}"
    return reference


@pytest.fixture(scope="module")
def release_image(
    docker_client: docker.DockerClient, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A build result image holding index.html, sub/file.txt and the source's source.txt."""
    root = tmp_path_factory.mktemp("release-image")
    workspace = root / "workspace"
    workspace.mkdir()
    (workspace / "source.txt").write_text("from the source\n")

    async def build() -> str:
        runtime = ContainerRuntime(DockerSettings(), max_streams=1, instance=INSTANCE)
        try:
            return await build_release_image(runtime, workspace, root / "build.log")
        finally:
            await runtime.close()

    reference = asyncio.run(build())
    yield reference
    docker_client.images.remove(reference, force=True)


@pytest.fixture
async def runtime() -> AsyncIterator[ContainerRuntime]:
    """A runtime with its own instance label."""
    runtime = ContainerRuntime(DockerSettings(), max_streams=2, kill_grace_s=2, instance=INSTANCE)
    yield runtime
    await runtime.close()


@pytest.fixture
def cleanup(docker_client: docker.DockerClient) -> Iterator[Callable[[str], str]]:
    """Registers deployment ids whose containers are removed after the test."""
    deployment_ids: list[str] = []

    def register(deployment_id: str) -> str:
        deployment_ids.append(deployment_id)
        return deployment_id

    yield register
    for deployment_id in deployment_ids:
        for container in containers_of(docker_client, deployment_id):
            container.remove(force=True)


@pytest.fixture
def deployment_id(cleanup: Callable[[str], str]) -> str:
    return cleanup(new_deployment_id())


@pytest.fixture
def make_spec(deployment_id: str, release_image: str, log: DeploymentLog) -> Callable[..., ReleaseSpec]:
    """A ReleaseSpec serving the release image with httpd on port 8080, with overridable fields."""

    def make(**overrides: object) -> ReleaseSpec:
        fields: dict[str, object] = {
            "deployment_id": deployment_id,
            "application": APPLICATION,
            "runtime": "container",
            "command": HTTPD,
            "env": {},
            "log_path": log.path,
            "ports": (8080,),
            "image": release_image,
        }
        fields.update(overrides)
        return ReleaseSpec(**fields)  # type: ignore[arg-type]

    return make


def release_output(path: Path, stream: str) -> list[str]:
    return [text for stage, name, text in log_entries(path) if stage == "release" and name == stream]


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    """Awaits `condition` until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.05)


def in_thread(function: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    return lambda: asyncio.to_thread(function)


def http_get(url: str) -> tuple[int, str] | None:
    """Status and body, or None when nothing answers."""
    try:
        with OPENER.open(url, timeout=2) as response:
            return response.status, response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


async def serves_index(handle: ReleaseHandle, timeout: float = 10.0) -> None:
    """Waits until the release answers on its published port with the built index.html."""
    url = f"http://{handle.host}:{handle.ports[8080]}/index.html"
    await eventually(in_thread(lambda: http_get(url) == (200, INDEX_HTML + "\n")), timeout, f"{url} serving")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_release_serves_the_built_workspace_over_http(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """A release from the build result image answers HTTP on 127.0.0.1:<published port> with the built file."""
    handle = await runtime.start_release(make_spec(), log)
    assert handle.runtime == "container" and handle.host == "127.0.0.1"
    assert handle.deployment_id == make_spec().deployment_id and handle.application == APPLICATION
    assert handle.container_id is not None and len(handle.container_id) == 64
    assert handle.pid is not None and handle.pid > 0
    assert set(handle.ports) == {8080} and handle.ports[8080] > 0
    await serves_index(handle)
    assert ReleaseHandle.from_dict(handle.to_dict()) == handle
    state = await runtime.release_state(handle)
    assert state == ReleaseState(running=True, exit_code=None, restart_count=0, pid=handle.pid)


async def test_release_container_configuration(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
) -> None:
    """Labelled, init, unprivileged, rotated json-file logs, 127.0.0.1 only; unless-stopped once promoted."""
    spec = make_spec(env={"GREETING": "hello"})
    handle = await runtime.start_release(spec, log)
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
    assert attrs["Name"] == f"/deploy-agent-release-{spec.deployment_id}"
    assert attrs["Config"]["Labels"] == {
        "deploy-agent.deployment": spec.deployment_id,
        "deploy-agent.application": APPLICATION,
        "deploy-agent.role": "release",
        "deploy-agent.instance": INSTANCE,
    }
    assert attrs["Config"]["Cmd"] == list(HTTPD)
    assert not attrs["Config"]["Entrypoint"]
    assert attrs["Config"]["WorkingDir"] == "/workspace"
    assert "GREETING=hello" in attrs["Config"]["Env"]
    host = attrs["HostConfig"]
    assert host["Init"] is True and host["Privileged"] is False
    assert host["RestartPolicy"]["Name"] == "no"
    await runtime.keep_running(handle)
    promoted = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
    assert promoted["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    published = attrs["NetworkSettings"]["Ports"]["8080/tcp"]
    assert [binding["HostIp"] for binding in published] == ["127.0.0.1"]
    assert int(published[0]["HostPort"]) == handle.ports[8080]
    assert attrs["State"]["Pid"] == handle.pid


async def test_image_default_command_runs_without_a_command(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """With no command the image's own command runs, not the build's (the build command is gone)."""
    handle = await runtime.start_release(make_spec(command=None, ports=()), log)
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
    assert attrs["Config"]["Cmd"] == ["sh"]
    assert handle.ports == {}


async def test_fixed_host_port_is_used_and_a_second_release_on_it_fails(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
    cleanup: Callable[[str], str],
) -> None:
    """host_port publishes ports[0] there; a second release on the same port fails naming it and leaves nothing."""
    port = free_port()
    handle = await runtime.start_release(make_spec(host_port=port), log)
    assert handle.ports == {8080: port}
    await serves_index(handle)
    second = cleanup(new_deployment_id())
    with pytest.raises(RuntimeFailure, match=f"host port {port} is already in use"):
        await runtime.start_release(make_spec(deployment_id=second, host_port=port), log)
    assert containers_of(docker_client, second) == []
    assert await runtime.list_release_containers(second) == []
    # The first release is unaffected.
    await serves_index(handle)


async def test_host_port_held_by_a_host_process_fails_the_start(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A fixed host port a host process listens on fails the start with the port named; no container stays."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = make_spec(host_port=port)
        with pytest.raises(RuntimeFailure, match=f"host port {port} is already in use"):
            await runtime.start_release(spec, log)
    assert containers_of(docker_client, spec.deployment_id) == []


async def test_missing_image_fails_with_its_name(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A build result image that is gone is a RuntimeFailure naming it (never pulled); nothing is created."""
    spec = make_spec(image=f"deploy-agent/{APPLICATION}:no-such-build")
    with pytest.raises(RuntimeFailure, match=f"image deploy-agent/{APPLICATION}:no-such-build is not present"):
        await runtime.start_release(spec, log)
    assert containers_of(docker_client, spec.deployment_id) == []


async def test_release_output_lands_in_the_log_with_stage_release(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """The release's stdout and stderr lines reach the log, stage `release`, as they come."""
    command = "echo hello out; echo hello err >&2; sleep 0.3; echo later; exec sleep 30"
    await runtime.start_release(make_spec(command=command, ports=()), log)
    await eventually(
        in_thread(lambda: release_output(log.path, "stdout") == ["hello out", "later"]), what="stdout in the log"
    )
    assert release_output(log.path, "stderr") == ["hello err"]
    assert any(stage == "release" and stream == "agent" for stage, stream, _ in log_entries(log.path))


async def test_crashing_release_reports_its_exit_code_and_docker_restarts_it(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """A command that exits 3 shows exit_code 3 between restarts, a growing restart_count, and each run's output."""
    command = "echo run >&2; sleep 0.5; echo crashing >&2; exit 3"
    handle = await runtime.start_release(make_spec(command=command, ports=()), log)
    await runtime.keep_running(handle)  # promoted: Docker restarts it from now on
    seen: list[ReleaseState] = []

    def between_restarts(state: ReleaseState) -> bool:
        return not state.running and state.exit_code == 3 and state.pid is None

    async def restarted_and_followed() -> bool:
        seen.append(await runtime.release_state(handle))
        crashes = release_output(log.path, "stderr").count("crashing")
        # Docker's restart delay doubles each time (100 ms, 200 ms, ...): a poll soon lands in one.
        return seen[-1].restart_count >= 2 and crashes >= 2 and any(map(between_restarts, seen))

    await eventually(restarted_and_followed, timeout=20, what="two restarts with their output")
    # While running again: no exit code, and the new run's pid.
    assert any(state.running and state.exit_code is None and state.restart_count >= 1 for state in seen)
    assert any("Docker restarted the release container" in text for _, _, text in log_entries(log.path))
    assert await runtime.last_output(handle, 2) != []


async def test_an_unpromoted_release_that_crashes_stays_exited_with_its_code(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """Before promotion Docker does not restart a release: its exit code stays readable."""
    handle = await runtime.start_release(make_spec(command="echo bye; exit 3", ports=()), log)

    async def exited() -> bool:
        state = await runtime.release_state(handle)
        return not state.running and state.exit_code == 3

    await eventually(exited, timeout=10, what="the release to exit with 3")
    await asyncio.sleep(0.5)
    state = await runtime.release_state(handle)
    assert state.restart_count == 0 and state.exit_code == 3
    assert "bye" in await runtime.last_output(handle, 5)


async def test_stop_keeps_the_container_and_resume_serves_again(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """stop_release stops but keeps the container (Docker does not restart it); resume_release serves again."""
    spec = make_spec(command=f"echo started; exec {' '.join(HTTPD)}")
    handle = await runtime.start_release(spec, log)
    await serves_index(handle)
    started = time.monotonic()
    await runtime.stop_release(handle, grace_s=2)
    assert time.monotonic() - started < 2, "httpd ends on SIGTERM, well within the grace period"
    state = await runtime.release_state(handle)
    assert state.running is False and state.exit_code is not None and state.pid is None
    assert [container.id for container in containers_of(docker_client, spec.deployment_id)] == [handle.container_id]
    loopback = f"http://127.0.0.1:{handle.ports[8080]}/index.html"
    if await asyncio.to_thread(http_get, loopback) is not None:
        # Ports are free per address: a parallel test's container may hold this number on loopback.
        listed = await asyncio.to_thread(docker_client.api.containers)
        holders = [
            entry["Id"]
            for entry in listed
            for port in entry.get("Ports") or []
            if port.get("PublicPort") == handle.ports[8080] and port.get("IP") in ("127.0.0.1", "0.0.0.0")
        ]
        assert holders and handle.container_id not in holders, f"{loopback} answers and no other container holds it"

    resumed = await runtime.resume_release(handle, spec, log)
    assert resumed.container_id == handle.container_id
    assert resumed.pid is not None and resumed.pid != handle.pid
    await serves_index(resumed)
    assert (await runtime.release_state(resumed)).running is True
    await eventually(
        in_thread(lambda: release_output(log.path, "stdout") == ["started", "started"]), what="output after resume"
    )


async def test_resume_of_a_removed_release_starts_a_new_one(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """resume_release of a release whose container is gone starts a new container from the spec."""
    spec = make_spec()
    handle = await runtime.start_release(spec, log)
    await runtime.remove_release(handle, grace_s=0)
    resumed = await runtime.resume_release(handle, spec, log)
    assert resumed.container_id != handle.container_id
    await serves_index(resumed)


async def test_remove_release_leaves_nothing(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """remove_release removes the container; after it every release call treats the release as gone."""
    spec = make_spec()
    handle = await runtime.start_release(spec, log)
    await runtime.remove_release(handle, grace_s=1)
    assert containers_of(docker_client, spec.deployment_id) == []
    await runtime.remove_release(handle, grace_s=1)
    await runtime.stop_release(handle, grace_s=1)
    assert await runtime.release_state(handle) == ReleaseState(running=False, exit_code=None)
    assert await runtime.last_output(handle, 10) == []
    assert await runtime.refresh_release(handle) is None


async def test_last_output_returns_the_last_lines(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog
) -> None:
    """last_output gives the release's last lines, stdout and stderr, as Docker kept them."""
    # Docker stamps stdout and stderr in separate copiers: their order across streams is not exact.
    command = "echo early >&2; sleep 0.2; seq 1 20; exec sleep 30"
    handle = await runtime.start_release(make_spec(command=command, ports=()), log)

    async def complete() -> bool:
        return await runtime.last_output(handle, 5) == ["16", "17", "18", "19", "20"]

    await eventually(complete, what="the last five lines")
    assert (await runtime.last_output(handle, 100))[0] == "early"
    assert await runtime.last_output(handle, 0) == []


async def test_refresh_release_reads_the_ports_docker_assigned_after_a_restart(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """Docker publishes a restarted release on a new ephemeral port; refresh_release reports it."""
    handle = await runtime.start_release(make_spec(), log)
    await asyncio.to_thread(docker_client.api.restart, handle.container_id, timeout=1)
    refreshed = await runtime.refresh_release(handle)
    assert refreshed is not None and refreshed.container_id == handle.container_id
    assert set(refreshed.ports) == {8080} and refreshed.pid != handle.pid
    await serves_index(refreshed)


async def test_attach_release_output_follows_a_release_after_an_agent_restart(
    make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, tmp_path: Path
) -> None:
    """A release outlives its runtime's close; a new runtime attaches to its output from now on."""
    first = ContainerRuntime(DockerSettings(), max_streams=1, instance=INSTANCE)
    command = "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"
    try:
        handle = await first.start_release(make_spec(command=command, ports=()), log)
    finally:
        await first.close()
    second = ContainerRuntime(DockerSettings(), max_streams=1, instance=INSTANCE)
    reattached = tmp_path / "reattached.log"
    try:
        assert (await second.release_state(handle)).running is True
        await second.attach_release_output(handle, reattached)
        await second.attach_release_output(handle, reattached)  # already followed: a no-op
        await eventually(in_thread(lambda: reattached.exists() and len(release_output(reattached, "stdout")) >= 3))
        ticks = [int(text.split()[1]) for text in release_output(reattached, "stdout")]
        assert ticks[0] > 1 and ticks == list(range(ticks[0], ticks[0] + len(ticks)))
        await second.detach_release_output(handle)
        assert (await second.release_state(handle)).running is True
    finally:
        await second.remove_release(handle, grace_s=0)
        await second.close()


async def test_copy_workspace_out_gives_the_built_files(
    runtime: ContainerRuntime, release_image: str, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """The image's /workspace content lands in dest (without a workspace/ folder); the copy container is removed."""
    dest = tmp_path / "release"
    await runtime.copy_workspace_out(release_image, dest)
    assert sorted(str(path.relative_to(dest)) for path in dest.rglob("*")) == [
        "index.html", "source.txt", "sub", "sub/file.txt",
    ]
    assert (dest / "index.html").read_text() == INDEX_HTML + "\n"
    assert (dest / "source.txt").read_text() == "from the source\n"
    copies = docker_client.containers.list(
        all=True, filters={"label": ["deploy-agent.role=copy", f"deploy-agent.instance={INSTANCE}"]}
    )
    assert copies == []
    with pytest.raises(RuntimeFailure, match="local/no-such-image-for-tests:1"):
        await runtime.copy_workspace_out("local/no-such-image-for-tests:1", tmp_path / "missing")


async def test_remove_copy_containers_removes_leftovers_of_this_instance_only(
    runtime: ContainerRuntime, release_image: str, docker_client: docker.DockerClient
) -> None:
    """Copy containers an interrupted copy left behind are removed; another agent's stay."""
    mine = docker_client.containers.create(
        release_image, ["true"], labels={"deploy-agent.role": "copy", "deploy-agent.instance": INSTANCE}
    )
    foreign = docker_client.containers.create(
        release_image, ["true"], labels={"deploy-agent.role": "copy", "deploy-agent.instance": "another-agent"}
    )
    try:
        assert await runtime.remove_copy_containers() == 1
        remaining = {entry["Id"] for entry in docker_client.api.containers(all=True)}
        assert mine.id not in remaining and foreign.id in remaining
    finally:
        for container in (mine, foreign):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


async def test_copy_workspace_out_refuses_links_leaving_dest(
    runtime: ContainerRuntime, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """A workspace holding a symlink to an absolute path is refused, not extracted through."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    image = await build_release_image(runtime, workspace, tmp_path / "build.log", "ln -s /etc /workspace/escape")
    try:
        with pytest.raises(RuntimeFailure, match="refusing unsafe entry"):
            await runtime.copy_workspace_out(image, tmp_path / "release")
        assert not (tmp_path / "release" / "escape").exists()
    finally:
        docker_client.images.remove(image, force=True)


async def test_release_images_are_listed_and_only_unused_ones_removed(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    release_image: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    """list_release_images finds the application's images; remove_image refuses one a container uses."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    image = await build_release_image(runtime, workspace, tmp_path / "build.log")
    try:
        images = await runtime.list_release_images(APPLICATION)
        assert {image, release_image} <= set(images)
        assert await runtime.list_release_images(f"{APPLICATION}-other") == []

        handle = await runtime.start_release(make_spec(image=image), log)
        assert await runtime.remove_image(image) is False
        await runtime.stop_release(handle, grace_s=0)
        assert await runtime.remove_image(image) is False, "a stopped release still uses its image"
        await runtime.remove_release(handle, grace_s=0)
        assert await runtime.remove_image(image) is True
        assert await runtime.remove_image(image) is False
        assert image not in await runtime.list_release_images(APPLICATION)
    finally:
        try:
            docker_client.images.remove(image, force=True)
        except docker.errors.ImageNotFound:
            pass


async def test_release_containers_are_listed_and_left_alone_by_build_cleanup(
    runtime: ContainerRuntime, make_spec: Callable[..., ReleaseSpec], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """list_release_containers reports releases; remove_build_containers and stop_deployment never touch them."""
    spec = make_spec()
    handle = await runtime.start_release(spec, log)
    assert handle.container_id is not None
    expected = ReleaseContainer(spec.deployment_id, APPLICATION, handle.container_id, running=True)
    assert expected in await runtime.list_release_containers()
    assert await runtime.list_release_containers(spec.deployment_id) == [expected]
    assert await runtime.list_release_containers(new_deployment_id()) == []

    assert spec.deployment_id not in await runtime.remove_build_containers(keep=lambda _deployment_id: False)
    assert await runtime.stop_deployment(spec.deployment_id, grace_s=0) == 0
    assert (await runtime.release_state(handle)).running is True

    await runtime.stop_release(handle, grace_s=0)
    assert await runtime.list_release_containers(spec.deployment_id) == [replace(expected, running=False)]
    other_agent = ContainerRuntime(DockerSettings(), max_streams=1, instance="another-agent")
    try:
        assert await other_agent.list_release_containers(spec.deployment_id) == []
    finally:
        await other_agent.close()


# --- hardening, limits, bind addresses, secrets ----------------------------------------------------


def status_fields(lines: list[str]) -> dict[str, str]:
    """`Name: value` lines of /proc/self/status as a mapping."""
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


# Linux answers on all of 127/8: an address of this host that is not 127.0.0.1.
OTHER_ADDRESS = "127.0.0.2"


async def test_release_runs_without_new_privileges_with_the_kept_capabilities_and_default_limits(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
) -> None:
    """no-new-privileges, cap_drop ALL plus the kept set, and the [docker] release_* limits when the spec sets none."""
    command = f"grep -e '^CapEff' -e '^NoNewPrivs' /proc/self/status; exec {' '.join(HTTPD)}"
    handle = await runtime.start_release(make_spec(command=command), log)
    await serves_index(handle)
    host = (await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id))["HostConfig"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == sorted(KEPT_CAPABILITIES)
    defaults = DockerSettings()
    assert host["Memory"] == defaults.release_memory_bytes
    assert host["NanoCpus"] == int(defaults.release_cpus * 1e9)
    assert host["PidsLimit"] == defaults.release_pids
    await eventually(in_thread(lambda: len(release_output(log.path, "stdout")) >= 2), what="the status lines")
    status = status_fields(release_output(log.path, "stdout"))
    assert status["NoNewPrivs"] == "1"
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID NET_BIND_SERVICE: bits 0 1 3 4 5 6 7 10.
    assert int(status["CapEff"], 16) == 0x4FB and len(KEPT_CAPABILITIES) == 8


async def test_release_limits_from_the_spec_are_applied_and_enforced(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
) -> None:
    """run.memory, run.cpus and run.pids reach the container; beyond the PID limit a fork fails."""
    command = "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo spawned; exec sleep 30"
    spec = make_spec(command=command, ports=(), memory=64 * 1024**2, cpus=0.5, pids=16)
    handle = await runtime.start_release(spec, log)
    host = (await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id))["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (64 * 1024**2, 500_000_000, 16)
    await eventually(
        in_thread(lambda: any("fork" in line for line in release_output(log.path, "stderr"))), what="a refused fork"
    )


async def test_release_is_published_on_exactly_the_bound_address(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
) -> None:
    """run.bind publishes run.port there only, the handle's host is the address Docker bound; other ports on loopback."""
    address = OTHER_ADDRESS
    handle = await runtime.start_release(make_spec(bind=address, ports=(8080, 9090)), log)
    assert handle.host == address
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
    published = attrs["NetworkSettings"]["Ports"]
    assert [binding["HostIp"] for binding in published["8080/tcp"]] == [address]
    assert [binding["HostIp"] for binding in published["9090/tcp"]] == ["127.0.0.1"]
    await serves_index(handle)
    loopback = f"http://127.0.0.1:{handle.ports[8080]}/index.html"
    if await asyncio.to_thread(http_get, loopback) is not None:
        # Ports are free per address: a parallel test's container may hold this number on loopback.
        listed = await asyncio.to_thread(docker_client.api.containers)
        holders = [
            entry["Id"]
            for entry in listed
            for port in entry.get("Ports") or []
            if port.get("PublicPort") == handle.ports[8080] and port.get("IP") in ("127.0.0.1", "0.0.0.0")
        ]
        assert holders and handle.container_id not in holders, f"{loopback} answers and no other container holds it"
    await asyncio.to_thread(docker_client.api.restart, handle.container_id, timeout=1)
    refreshed = await runtime.refresh_release(handle)
    assert refreshed is not None and refreshed.host == address and list(refreshed.ports) == [8080, 9090]
    await serves_index(refreshed)


async def test_release_bound_on_every_interface_is_reached_on_loopback(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
) -> None:
    """bind 0.0.0.0 publishes on every interface (as Docker reports) and the handle reaches it on 127.0.0.1."""
    handle = await runtime.start_release(make_spec(bind="0.0.0.0"), log)
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
    assert attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostIp"] == "0.0.0.0"
    assert handle.host == "127.0.0.1"
    await serves_index(handle)
    answer = await asyncio.to_thread(http_get, f"http://{OTHER_ADDRESS}:{handle.ports[8080]}/index.html")
    assert answer == (200, INDEX_HTML + "\n")


async def test_release_of_a_build_with_secrets_sees_only_its_run_env(
    runtime: ContainerRuntime,
    make_spec: Callable[..., ReleaseSpec],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """build.env is in neither the release image nor the release container (inspect and exec); run.env is."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    image = await build_release_image(
        runtime, workspace, tmp_path / "build.log", env={"DB_PASSWORD": "s3cr3t-value", "BUILD_ONLY": "1"}
    )
    try:
        image_env = (await asyncio.to_thread(docker_client.api.inspect_image, image))["Config"]["Env"]
        base_env = (await asyncio.to_thread(docker_client.api.inspect_image, "local/busybox"))["Config"]["Env"]
        assert image_env == base_env
        handle = await runtime.start_release(make_spec(image=image, env={"GREETING": "hello"}), log)
        attrs = await asyncio.to_thread(docker_client.api.inspect_container, handle.container_id)
        env = attrs["Config"]["Env"]
        assert "GREETING=hello" in env
        assert not any(entry.startswith(("DB_PASSWORD=", "BUILD_ONLY=")) for entry in env)
        container = docker_client.containers.get(handle.container_id)
        exit_code, output = await asyncio.to_thread(container.exec_run, ["env"])
        assert exit_code == 0
        seen = output.decode()
        assert "GREETING=hello" in seen and "DB_PASSWORD" not in seen and "s3cr3t-value" not in seen
        await runtime.remove_release(handle, grace_s=0)
    finally:
        docker_client.images.remove(image, force=True)
