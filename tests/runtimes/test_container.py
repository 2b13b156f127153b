"""The container runtime against a real Docker engine: builds, output, timeouts, stops, commits."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import docker
import pytest

from agent.config import DockerSettings
from agent.errors import RuntimeFailure, Unavailable
from agent.logs import DeploymentLog
from agent.models import new_deployment_id
from agent.runtimes.container import KEPT_CAPABILITIES, BuildJob, BuildResult, ContainerRuntime
from tests.conftest import containers_of

MEMORY = 256 * 1024**2
PIDS = 128
CPUS = 1.0
KILL_GRACE_S = 2.0
# Agents started by other tests on the same engine clean up build containers of no instance only.
INSTANCE = f"tests-{uuid.uuid4().hex[:12]}"
# Bit numbers of the capabilities in /proc/<pid>/status (linux/capability.h).
CAPABILITY_BITS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
    "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
KEPT_MASK = sum(1 << CAPABILITY_BITS[name] for name in KEPT_CAPABILITIES)


class Starts:
    """Records on_start calls and lets a test wait for the container to be running."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.started = asyncio.Event()

    async def __call__(self, container_id: str, pid: int) -> None:
        self.calls.append((container_id, pid))
        self.started.set()


@pytest.fixture
async def runtime() -> AsyncIterator[ContainerRuntime]:
    """A runtime with small limits, a short kill grace and its own instance label."""
    settings = DockerSettings(build_memory_bytes=MEMORY, build_cpus=CPUS, build_pids=PIDS)
    runtime = ContainerRuntime(settings, max_streams=4, kill_grace_s=KILL_GRACE_S, instance=INSTANCE)
    yield runtime
    await runtime.close()


@pytest.fixture
def deployment_id(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh deployment id whose containers and images are removed after the test."""
    deployment_id = new_deployment_id()
    yield deployment_id
    for container in containers_of(docker_client, deployment_id):
        container.remove(force=True)
    for image in docker_client.images.list(filters={"label": f"deploy-agent.deployment={deployment_id}"}):
        docker_client.images.remove(image.id, force=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace holding hello.txt and a nested file."""
    root = tmp_path / "workspace"
    (root / "nested").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the workspace\n")
    (root / "nested" / "deep.txt").write_text("deep\n")
    return root


@pytest.fixture
def make_job(deployment_id: str, base_image: str, workspace: Path) -> Callable[..., BuildJob]:
    """Builds a BuildJob for this test's deployment with overridable fields."""

    def make(command: tuple[str, ...] | str, **overrides: object) -> BuildJob:
        fields: dict[str, object] = {
            "deployment_id": deployment_id,
            "application": "web",
            "image": base_image,
            "command": command,
            "env": {},
            "timeout_s": 60.0,
            "workspace": workspace,
        }
        fields.update(overrides)
        return BuildJob(**fields)  # type: ignore[arg-type]

    return make


def log_lines(log: DeploymentLog) -> list[tuple[str, str, str]]:
    """The log as (stage, stream, text) triples."""
    entries = []
    for line in log.path.read_text().splitlines():
        head, _, text = line.partition(" | ")
        _, stage, stream = head.split(" ")
        entries.append((stage, stream, text))
    return entries


def output_of(log: DeploymentLog, stream: str) -> list[str]:
    return [text for stage, name, text in log_lines(log) if stage == "build" and name == stream]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls `condition` (run in a thread, it may call Docker) until true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.05)


async def start_build(
    runtime: ContainerRuntime, job: BuildJob, log: DeploymentLog
) -> tuple[asyncio.Task[BuildResult], Starts]:
    """Starts run_build as a task and returns once its container is running."""
    starts = Starts()
    task = asyncio.create_task(runtime.run_build(job, log, starts))
    started = asyncio.create_task(starts.started.wait())
    await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if not starts.started.is_set():
        started.cancel()
        task.cancel()
        pytest.fail(f"build container never started: {task}")
    return task, starts


async def test_build_streams_stdout_and_stderr_lines_into_the_log(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A successful build's stdout and stderr lines land in the log under their stream names."""
    job = make_job("cat /workspace/hello.txt /workspace/nested/deep.txt; echo oops >&2; printf 'no newline'")
    starts = Starts()
    result = await runtime.run_build(job, log, starts)
    assert result == BuildResult(exit_code=0, timed_out=False, image=None)
    assert output_of(log, "stdout") == ["hello from the workspace", "deep", "no newline"]
    assert output_of(log, "stderr") == ["oops"]
    assert any(stream == "agent" and "starting build container" in text for _, stream, text in log_lines(log))
    assert len(starts.calls) == 1
    assert containers_of(docker_client, job.deployment_id) == []


async def test_shell_form_runs_through_sh_and_exec_form_does_not(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog
) -> None:
    """A string command is run by /bin/sh -c; a list is exec'd as is, with no shell expansion."""
    await runtime.run_build(make_job("echo $((40 + 2))"), log, Starts())
    await runtime.run_build(make_job(("echo", "$((40 + 2))", "a  b")), log, Starts())
    assert output_of(log, "stdout") == ["42", "$((40 + 2)) a  b"]


async def test_env_reaches_the_command(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog
) -> None:
    """The job's environment is the command's environment."""
    job = make_job('echo "$GREETING, $WHO"', env={"GREETING": "hello", "WHO": "world"})
    await runtime.run_build(job, log, Starts())
    assert output_of(log, "stdout") == ["hello, world"]


async def test_empty_workspace_still_exists_in_the_container(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, tmp_path: Path
) -> None:
    """With no source, /workspace exists and is empty, and it is the working directory."""
    empty = tmp_path / "empty"
    empty.mkdir()
    job = make_job("pwd; ls -A /workspace | wc -l", workspace=empty)
    result = await runtime.run_build(job, log, Starts())
    assert result.exit_code == 0
    assert [line.strip() for line in output_of(log, "stdout")] == ["/workspace", "0"]


async def test_failing_build_reports_its_exit_code(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A command that exits 3 gives exit_code 3 and no image, and its container is removed."""
    job = make_job("exit 3", commit_image=f"deploy-agent-test/web:failed-{int(time.time() * 1000)}")
    result = await runtime.run_build(job, log, Starts())
    assert result == BuildResult(exit_code=3, timed_out=False, image=None)
    assert containers_of(docker_client, job.deployment_id) == []
    assert docker_client.images.list(filters={"label": f"deploy-agent.deployment={job.deployment_id}"}) == []


async def test_large_output_is_streamed_line_by_line(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog
) -> None:
    """Every line of a long output reaches the log, in order."""
    await runtime.run_build(make_job("seq 1 100000"), log, Starts())
    lines = output_of(log, "stdout")
    assert len(lines) == 100000
    assert lines[0] == "1" and lines[-1] == "100000"


async def test_timeout_stops_the_build(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A build over its timeout is stopped promptly, reported as timed out, and removed."""
    job = make_job("sleep 30", timeout_s=1)
    started = time.monotonic()
    result = await runtime.run_build(job, log, Starts())
    assert result.timed_out is True
    assert result.exit_code != 0 and result.image is None
    assert time.monotonic() - started < 1 + KILL_GRACE_S + 5
    assert any("build timed out after 1s; stopping" in text for _, _, text in log_lines(log))
    assert containers_of(docker_client, job.deployment_id) == []


async def test_stop_deployment_ends_a_running_build(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """stop_deployment during a build ends it within 5 s, run_build returns, and no container is left."""
    job = make_job("sleep 30")
    task, _ = await start_build(runtime, job, log)
    started = time.monotonic()
    assert await runtime.stop_deployment(job.deployment_id, grace_s=KILL_GRACE_S) == 1
    result = await asyncio.wait_for(task, timeout=5)
    assert time.monotonic() - started < 5
    assert result.exit_code != 0 and result.image is None
    await eventually(lambda: containers_of(docker_client, job.deployment_id) == [])


async def test_stop_deployment_kills_a_build_that_ignores_sigterm(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A build that ignores SIGTERM is killed once the grace period is over."""
    job = make_job("trap '' TERM; sleep 30")
    task, _ = await start_build(runtime, job, log)
    started = time.monotonic()
    assert await runtime.stop_deployment(job.deployment_id, grace_s=1) == 1
    result = await asyncio.wait_for(task, timeout=5)
    assert 1 <= time.monotonic() - started < 5
    assert result.exit_code == 137
    await eventually(lambda: containers_of(docker_client, job.deployment_id) == [])


async def test_stop_deployment_from_on_start_makes_run_build_return(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """A container stopped and removed as soon as it starts ends the build as killed, not with a docker error."""
    job = make_job("sleep 30")

    async def stop_at_once(_container_id: str, _pid: int) -> None:
        await runtime.stop_deployment(job.deployment_id, grace_s=0)

    result = await asyncio.wait_for(runtime.run_build(job, log, stop_at_once), timeout=10)
    assert result == BuildResult(exit_code=137, timed_out=False, image=None)
    await eventually(lambda: containers_of(docker_client, job.deployment_id) == [])


async def test_stop_deployment_touches_only_that_deployments_build_containers(
    runtime: ContainerRuntime, docker_client: docker.DockerClient, base_image: str, deployment_id: str
) -> None:
    """Containers of other deployments, or of other roles, are left alone."""
    other = new_deployment_id()
    mine = _labelled_container(docker_client, base_image, deployment_id, "build")
    others = [
        _labelled_container(docker_client, base_image, other, "build"),
        _labelled_container(docker_client, base_image, deployment_id, "run"),
        _labelled_container(docker_client, base_image, deployment_id, "build", instance="another-agent"),
    ]
    try:
        assert await runtime.stop_deployment(deployment_id, grace_s=0) == 1
        # The low-level listing: containers.list inspects each one, and other tests remove theirs meanwhile.
        remaining = {entry["Id"] for entry in docker_client.api.containers(all=True)}
        assert mine.id not in remaining
        assert all(container.id in remaining for container in others)
    finally:
        for container in others:
            container.remove(force=True)


async def test_commit_keeps_the_built_workspace_in_an_image(
    runtime: ContainerRuntime,
    make_job: Callable[..., BuildJob],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
    deployment_id: str,
) -> None:
    """Exit 0 with commit_image gives an image, labelled, holding the built /workspace."""
    reference = f"deploy-agent-test/web:{deployment_id}"
    job = make_job("echo built > /workspace/out.txt", commit_image=reference)
    result = await runtime.run_build(job, log, Starts())
    try:
        assert result == BuildResult(exit_code=0, timed_out=False, image=reference)
        image = docker_client.images.get(reference)
        assert image.labels["deploy-agent.deployment"] == job.deployment_id
        assert image.labels["deploy-agent.application"] == "web"
        assert image.labels["deploy-agent.role"] != "build"
        # The base image's command, not the build's, is what the image runs by default.
        assert image.attrs["Config"]["Cmd"] == docker_client.images.get(job.image).attrs["Config"]["Cmd"]
        output = docker_client.containers.run(reference, ["cat", "/workspace/out.txt", "/workspace/hello.txt"], remove=True)
        assert output == b"built\nhello from the workspace\n"
        assert any(f"committed the build result as image {reference}" in text for _, _, text in log_lines(log))
    finally:
        docker_client.images.remove(reference, force=True)


async def test_one_off_build_commits_nothing(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """Without commit_image a successful build leaves no image behind."""
    job = make_job("echo built > /workspace/out.txt")
    result = await runtime.run_build(job, log, Starts())
    assert result == BuildResult(exit_code=0, timed_out=False, image=None)
    assert docker_client.images.list(filters={"label": f"deploy-agent.deployment={job.deployment_id}"}) == []


async def test_build_container_has_labels_init_and_limits(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """The running container is labelled, runs under docker-init, unprivileged, limited, without mounts."""
    job = make_job("sleep 30")
    task, starts = await start_build(runtime, job, log)
    container_id, pid = starts.calls[0]
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, container_id)
    await runtime.stop_deployment(job.deployment_id, grace_s=0)
    await asyncio.wait_for(task, timeout=5)
    assert attrs["Config"]["Labels"] == {
        "deploy-agent.deployment": job.deployment_id,
        "deploy-agent.application": "web",
        "deploy-agent.role": "build",
        "deploy-agent.instance": INSTANCE,
    }
    host = attrs["HostConfig"]
    assert host["Init"] is True
    assert host["Privileged"] is False
    assert host["Memory"] == MEMORY
    assert host["PidsLimit"] == PIDS
    assert host["NanoCpus"] == int(CPUS * 1e9)
    assert not host["Binds"] and attrs["Mounts"] == []
    assert pid == attrs["State"]["Pid"] and pid > 0


async def test_missing_image_fails_with_its_name(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """An image that is not here (and cannot be pulled) is a RuntimeFailure naming it; nothing is created."""
    job = make_job("true", image="local/no-such-image-for-tests:1")
    with pytest.raises(RuntimeFailure, match="local/no-such-image-for-tests:1"):
        await runtime.run_build(job, log, Starts())
    assert containers_of(docker_client, job.deployment_id) == []


async def test_cancelling_run_build_removes_the_container(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """Cancelling the task running a build removes its container."""
    job = make_job("sleep 30")
    task, _ = await start_build(runtime, job, log)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: containers_of(docker_client, job.deployment_id) == [])


async def test_remove_build_containers_removes_only_those_not_kept(
    runtime: ContainerRuntime, docker_client: docker.DockerClient, base_image: str
) -> None:
    """Build containers of deployments not kept are removed; kept ones, other roles and other agents' stay."""
    kept, dropped = new_deployment_id(), new_deployment_id()
    kept_container = _labelled_container(docker_client, base_image, kept, "build")
    dropped_container = _labelled_container(docker_client, base_image, dropped, "build")
    release = _labelled_container(docker_client, base_image, dropped, "run")
    foreign = _labelled_container(docker_client, base_image, dropped, "build", instance="another-agent")
    try:
        removed = await runtime.remove_build_containers(keep=lambda deployment_id: deployment_id == kept)
        assert removed == [dropped]
        # The low-level listing: containers.list inspects each one, and other tests remove theirs meanwhile.
        remaining = {entry["Id"] for entry in docker_client.api.containers(all=True)}
        assert dropped_container.id not in remaining
        assert {kept_container.id, release.id, foreign.id} <= remaining
    finally:
        for container in (kept_container, dropped_container, release, foreign):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


async def test_runtime_without_instance_leaves_labelled_instances_alone(
    docker_client: docker.DockerClient, base_image: str
) -> None:
    """A runtime with no instance (the daemon's default) removes unlabelled build containers only."""
    target = new_deployment_id()
    plain = docker_client.containers.create(
        base_image, ["true"], labels={"deploy-agent.deployment": target, "deploy-agent.role": "build"}
    )
    labelled = _labelled_container(docker_client, base_image, target, "build")
    runtime = ContainerRuntime(DockerSettings(), max_streams=1)
    try:
        assert await runtime.remove_build_containers(keep=lambda deployment_id: deployment_id != target) == [target]
        assert [container.id for container in containers_of(docker_client, target)] == [labelled.id]
    finally:
        await runtime.close()
        for container in containers_of(docker_client, target):
            container.remove(force=True)


async def test_ping_reports_the_engine_version_or_unavailable(runtime: ContainerRuntime) -> None:
    """ping returns the server version, and Unavailable when the engine cannot be reached."""
    assert await runtime.ping()
    unreachable = ContainerRuntime(DockerSettings(url="unix:///nonexistent/docker.sock"), max_streams=1)
    try:
        with pytest.raises(Unavailable, match="Docker engine unreachable"):
            await unreachable.ping()
    finally:
        await unreachable.close()


async def test_image_exists(runtime: ContainerRuntime, base_image: str) -> None:
    """image_exists is true for a local image and false for a missing one."""
    assert await runtime.image_exists(base_image) is True
    assert await runtime.image_exists("local/no-such-image-for-tests:1") is False


def status_fields(lines: list[str]) -> dict[str, str]:
    """`Name: value` lines of /proc/self/status as a mapping."""
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


async def test_build_runs_without_new_privileges_and_with_the_kept_capabilities_only(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """The build container has no-new-privileges and cap_drop ALL plus the kept set; its process sees exactly that."""
    job = make_job("grep -e '^Cap' -e '^NoNewPrivs' /proc/self/status; sleep 30")
    task, starts = await start_build(runtime, job, log)
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, starts.calls[0][0])
    await eventually(lambda: len(output_of(log, "stdout")) >= 6)
    await runtime.stop_deployment(job.deployment_id, grace_s=0)
    await asyncio.wait_for(task, timeout=10)
    host = attrs["HostConfig"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(KEPT_CAPABILITIES)
    status = status_fields(output_of(log, "stdout"))
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == KEPT_MASK
    assert int(status["CapAmb"], 16) == 0
    for dropped in ("NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE", "SETPCAP", "SETFCAP"):
        assert not KEPT_MASK & (1 << CAPABILITY_BITS[dropped]), dropped


async def test_ordinary_build_work_still_works_with_the_reduced_capabilities(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog
) -> None:
    """Writing, chown, chmod, switching user and serving HTTP on 8080 work; mknod and chroot do not."""
    script = """
set -e
echo data > /workspace/out.txt
chown 1000:1000 /workspace/out.txt && chmod 640 /workspace/out.txt
mkdir -p /tmp/other && chown 1234:1234 /tmp/other && chmod 700 /tmp/other && echo root-writes > /tmp/other/f
echo 'app:x:1000:1000::/tmp:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group
su app -c 'id -u; cat /tmp/other/f 2>/dev/null || echo denied' | sed 's/^/app /'
httpd -p 8080 -h /workspace
for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://127.0.0.1:8080/out.txt && break; sleep 0.2; done | sed 's/^/served /'
mknod /tmp/null c 1 3 2>/dev/null && echo mknod-allowed || echo mknod-refused
chroot / true 2>/dev/null && echo chroot-allowed || echo chroot-refused
ls -ln /workspace/out.txt | awk '{print "owner " $1 " " $3 ":" $4}'
"""
    result = await runtime.run_build(make_job(script), log, Starts())
    assert result.exit_code == 0, log.path.read_text()
    assert output_of(log, "stdout") == [
        "app 1000",
        "app denied",
        "served data",
        "mknod-refused",
        "chroot-refused",
        "owner -rw-r----- 1000:1000",
    ]


async def test_commit_holds_the_built_workspace_but_none_of_the_build_env(
    runtime: ContainerRuntime,
    make_job: Callable[..., BuildJob],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
    deployment_id: str,
) -> None:
    """The image's Env is the base image's exactly; it holds /workspace (owners kept) and nothing else of the build."""
    reference = f"deploy-agent-test/web:{deployment_id}"
    command = (
        "echo $DB_PASSWORD > /dev/null; echo built > /workspace/out.txt; chown 1000:1000 /workspace/out.txt; "
        "ln -s out.txt /workspace/link; echo outside > /etc/outside.txt"
    )
    job = make_job(command, env={"DB_PASSWORD": "s3cr3t-value", "OTHER": "x"}, commit_image=reference)
    result = await runtime.run_build(job, log, Starts())
    try:
        assert result == BuildResult(exit_code=0, timed_out=False, image=reference), log.path.read_text()
        image = docker_client.images.get(reference)
        base = docker_client.images.get(job.image)
        assert image.attrs["Config"]["Env"] == base.attrs["Config"]["Env"]
        assert "s3cr3t-value" not in str(image.attrs) and "DB_PASSWORD" not in str(image.attrs)
        assert image.attrs["Config"]["Cmd"] == base.attrs["Config"]["Cmd"]
        assert image.labels["deploy-agent.role"] == "image"
        script = (
            "ls -ln /workspace/out.txt | awk '{print $3 \":\" $4}'; readlink /workspace/link; "
            "cat /workspace/hello.txt; cat /etc/outside.txt 2>&1; env"
        )
        output = docker_client.containers.run(reference, ["sh", "-c", script], remove=True).decode()
        lines = output.splitlines()
        assert lines[:3] == ["1000:1000", "out.txt", "hello from the workspace"]
        assert "No such file" in lines[3], "changes outside /workspace are not kept"
        assert not any("DB_PASSWORD" in line or "OTHER=" in line for line in lines)
        # Neither the build nor the snapshot container it was committed from is left.
        assert containers_of(docker_client, job.deployment_id) == []
    finally:
        docker_client.images.remove(reference, force=True)


async def test_a_build_that_removes_its_workspace_fails_to_commit_clearly(
    runtime: ContainerRuntime, make_job: Callable[..., BuildJob], log: DeploymentLog, docker_client: docker.DockerClient
) -> None:
    """With no /workspace to keep the build fails saying so; no container or image is left."""
    job = make_job("cd / && rm -rf /workspace", commit_image=f"deploy-agent-test/web:{job_tag()}")
    with pytest.raises(RuntimeFailure, match="the build result could not be kept"):
        await runtime.run_build(job, log, Starts())
    assert containers_of(docker_client, job.deployment_id) == []
    assert docker_client.images.list(filters={"label": f"deploy-agent.deployment={job.deployment_id}"}) == []


async def test_stop_while_the_result_is_kept_ends_the_build_as_killed(
    runtime: ContainerRuntime,
    make_job: Callable[..., BuildJob],
    log: DeploymentLog,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """stop_deployment while /workspace is copied into the snapshot removes both containers; run_build reports 137."""
    workspace = tmp_path / "big"
    workspace.mkdir()
    job = make_job(
        "dd if=/dev/zero of=/workspace/big bs=1M count=400 2>/dev/null",
        workspace=workspace,
        commit_image=f"deploy-agent-test/web:{job_tag()}",
    )
    task = asyncio.create_task(runtime.run_build(job, log, Starts()))

    def snapshot_exists() -> bool:
        return bool(_containers_with_role(docker_client, job.deployment_id, "snapshot"))

    await eventually(snapshot_exists, timeout=60)
    assert await runtime.stop_deployment(job.deployment_id, grace_s=0) >= 1
    result = await asyncio.wait_for(task, timeout=30)
    assert result == BuildResult(exit_code=137, timed_out=False, image=None)
    assert any("stopped before its result was kept" in text for _, _, text in log_lines(log))
    assert containers_of(docker_client, job.deployment_id) == []
    assert docker_client.images.list(filters={"label": f"deploy-agent.deployment={job.deployment_id}"}) == []


async def test_snapshot_containers_are_removed_by_the_build_sweeps(
    runtime: ContainerRuntime, docker_client: docker.DockerClient, base_image: str
) -> None:
    """A snapshot container left by an interrupted commit goes with stop_deployment and remove_build_containers."""
    first, second = new_deployment_id(), new_deployment_id()
    by_stop = _labelled_container(docker_client, base_image, first, "snapshot")
    by_sweep = _labelled_container(docker_client, base_image, second, "snapshot")
    foreign = _labelled_container(docker_client, base_image, second, "snapshot", instance="another-agent")
    try:
        assert await runtime.stop_deployment(first, grace_s=0) == 1
        assert await runtime.remove_build_containers(keep=lambda deployment_id: deployment_id == first) == [second]
        # The low-level listing: containers.list inspects each one, and other tests remove theirs meanwhile.
        remaining = {entry["Id"] for entry in docker_client.api.containers(all=True)}
        assert by_stop.id not in remaining and by_sweep.id not in remaining
        assert foreign.id in remaining
    finally:
        for container in (by_stop, by_sweep, foreign):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


def job_tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _containers_with_role(client: docker.DockerClient, deployment_id: str, role: str) -> list:
    labels = [f"deploy-agent.deployment={deployment_id}", f"deploy-agent.role={role}"]
    return client.containers.list(all=True, filters={"label": labels})


def _labelled_container(
    client: docker.DockerClient, image: str, deployment_id: str, role: str, instance: str = INSTANCE
) -> docker.models.containers.Container:
    """A created (not started) container carrying the agent's labels."""
    labels = {
        "deploy-agent.deployment": deployment_id,
        "deploy-agent.application": "web",
        "deploy-agent.role": role,
        "deploy-agent.instance": instance,
    }
    return client.containers.create(image, ["sleep", "30"], labels=labels)

