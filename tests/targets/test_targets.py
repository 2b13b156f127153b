"""What each target decides without running anything: specs, ports, addresses, retention, leftovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.errors import BuildFailed, BuildTimedOut, StopRequested
from agent.health import HealthTarget
from agent.models import BuildSpec, DeploymentSpec, HealthCheckSpec, RunSpec, SourceSpec
from agent.runtimes.base import ReleaseHandle
from agent.runtimes.remote import RemoteLayout
from agent.ssh import SshConnections
from agent.targets.base import check_build
from agent.targets.builds import ProcessBuilder
from agent.targets.local_process import LocalProcessTarget
from agent.targets.remote_process import RemoteProcessTarget
from agent.targets.resolver import Targets
from agent.targets.server import RemoteServer
from tests.targets.conftest import deployment

PROCESS_RUN = RunSpec(runtime="process", command="sleep 60")


class FakeLog:
    """Just the part of DeploymentLog the targets write to."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def agent(self, stage: str, message: str) -> None:
        self.lines.append(f"{stage}: {message}")


class FakeShell:
    """A RemoteProcessRuntime that records what it was asked."""

    server_name = "edge"

    def __init__(self) -> None:
        self.layout = RemoteLayout()
        self.calls: list[tuple[Any, ...]] = []

    async def clone_workspace(self, url: str, ref: str | None, remote_dir: str, log: Any) -> None:
        self.calls.append(("clone", url, remote_dir))

    async def upload_workspace(self, local_dir: Path, remote_dir: str, log: Any) -> None:
        self.calls.append(("upload", remote_dir))

    async def free_port(self) -> int:
        return 20123

    async def has_dir(self, remote_dir: str) -> bool:
        self.calls.append(("has_dir", remote_dir))
        return True

    async def remove_dir(self, remote_dir: str) -> None:
        self.calls.append(("remove_dir", remote_dir))

    async def kill_group(self, pid: int, started_at: float, grace_s: float) -> bool:
        self.calls.append(("kill_group", pid, started_at, grace_s))
        return True

    async def stop_supervised(self, deployment_id: str) -> int:
        self.calls.append(("stop_supervised", deployment_id))
        return 0


class FakeWatch:
    def __init__(self, stopped: bool = False) -> None:
        self.stopped = stopped

    def raise_if_stopped(self) -> None:
        if self.stopped:
            raise StopRequested()


def remote_process_target(config: Config) -> tuple[RemoteProcessTarget, FakeShell]:
    server = RemoteServer("edge", config, SshConnections(config.servers), 2.0)
    shell = FakeShell()
    server.shell = shell  # type: ignore[assignment]
    builder = ProcessBuilder(config, shell, 2.0)  # type: ignore[arg-type]
    return RemoteProcessTarget(config, server, builder, 2.0), shell


async def test_a_container_release_listens_on_run_and_health_ports_with_the_docker_limits(
    targets: Targets, config: Config
) -> None:
    """Container: ports run.port then health_check.port, the run's image else the built one, no PORT."""
    spec = DeploymentSpec(
        application="web", run=RunSpec(command="httpd", port=8080, host_port=9000, env={"A": "1"}),
        health_check=HealthCheckSpec(port=8081),
    )
    target = targets.for_deployment(deployment(spec))
    release = await target.prepare_release(deployment(spec), FakeLog(), "deploy-agent/web:dep_1")  # type: ignore[arg-type]
    assert release.runtime == "container" and release.image == "deploy-agent/web:dep_1"
    assert release.ports == (8080, 8081) and dict(release.env) == {"A": "1"}
    assert release.memory == config.docker.release_memory_bytes and release.workdir is None
    assert target.fixed_port(spec.run) == 9000  # type: ignore[arg-type]


async def test_a_host_process_gets_a_free_port_in_its_env_and_a_fresh_directory(targets: Targets, config: Config) -> None:
    """Local process: no run.port picks a free one and exports PORT; the workdir is releases_dir/<id>."""
    spec = DeploymentSpec(application="web", run=PROCESS_RUN)
    record = deployment(spec)
    target = targets.for_deployment(record)
    release = await target.prepare_release(record, FakeLog(), None)  # type: ignore[arg-type]
    assert len(release.ports) == 1 and release.env["PORT"] == str(release.ports[0])
    assert release.workdir == config.releases_dir / record.id and release.workdir.is_dir()
    assert release.image is None and target.fixed_port(PROCESS_RUN) is None
    with_port = DeploymentSpec(application="web", run=RunSpec(runtime="process", command="x", port=7000,
                                                               env={"PORT": "mine"}))
    release = await target.prepare_release(deployment(with_port), FakeLog(), None)  # type: ignore[arg-type]
    assert release.ports == (7000,) and release.env["PORT"] == "mine"


async def test_a_local_rollback_copies_its_targets_directory_and_needs_it_to_come_back(
    targets: Targets, config: Config
) -> None:
    """A process rollback runs in a copy of its target's workspace; pruning that directory rules it out."""
    original = deployment(DeploymentSpec(application="web", run=PROCESS_RUN))
    (config.releases_dir / original.id).mkdir(parents=True)
    (config.releases_dir / original.id / "app.sh").write_text("echo hi\n")
    target = targets.for_deployment(original)
    assert isinstance(target, LocalProcessTarget)
    assert await target.can_bring_back(original)
    rollback = deployment(original.spec, release_from=original.id)
    log = FakeLog()
    release = await target.prepare_release(rollback, log, None)  # type: ignore[arg-type]
    assert (release.workdir / "app.sh").read_text() == "echo hi\n"  # type: ignore[operator]
    assert log.lines == [f"release: copying the workspace of {original.id}"]
    await target.remove_release_files(original, set())
    assert not await target.can_bring_back(original)


async def test_where_the_agent_checks_and_clients_reach_a_release(targets: Targets) -> None:
    """A container's other ports are checked on loopback; URLs bracket IPv6; a remote one uses the server's host."""
    spec = DeploymentSpec(application="web", run=RunSpec(command="httpd", port=8080, bind="0.0.0.0"))
    local = targets.for_deployment(deployment(spec))
    handle = ReleaseHandle(runtime="container", deployment_id="d", application="web", host="10.0.0.5",
                           ports={8080: 32001, 8081: 32002})
    assert await local.health_target(handle, 8080, spec.run) == HealthTarget("10.0.0.5", 32001)  # type: ignore[arg-type]
    assert await local.health_target(handle, 8081, spec.run) == HealthTarget("127.0.0.1", 32002)  # type: ignore[arg-type]
    assert await local.health_target(handle, 9999, spec.run) is None  # type: ignore[arg-type]
    assert local.url_of(handle, 8080) == "http://10.0.0.5:32001"
    assert local.url_of(handle, None) is None and local.url_of(handle, 9999) is None
    v6 = ReleaseHandle(runtime="container", deployment_id="d", application="web", host="::1", ports={80: 32003})
    assert local.url_of(v6, 80) == "http://[::1]:32003"
    remote = targets.for_deployment(deployment(DeploymentSpec(application="web", server="edge", run=spec.run)))
    assert remote.url_of(handle, 8080) == "http://edge.example:32001"
    assert remote.url_of(v6, 80) == "http://[::1]:32003"  # bound to the server's loopback


async def test_a_remote_process_release_runs_where_its_build_ran_or_gets_its_source_there(config: Config) -> None:
    """With a build: its directory, nothing sent. Without: the source is cloned there. A rollback: its target's."""
    target, shell = remote_process_target(config)
    built = deployment(DeploymentSpec(application="web", server="edge", run=PROCESS_RUN,
                                      build=BuildSpec(image=None, command="make", runtime="process")))
    release = await target.prepare_release(built, FakeLog(), None)  # type: ignore[arg-type]
    assert release.workdir == Path(f".deploy-agent/releases/{built.id}") and shell.calls == []
    assert release.ports == (20123,) and release.env["PORT"] == "20123"
    git = DeploymentSpec(application="web", server="edge", run=PROCESS_RUN,
                         source=SourceSpec(type="git", url="https://example.com/r.git"))
    fresh = deployment(git)
    await target.prepare_release(fresh, FakeLog(), None)  # type: ignore[arg-type]
    assert shell.calls == [("clone", "https://example.com/r.git", f".deploy-agent/releases/{fresh.id}")]
    rollback = deployment(DeploymentSpec(application="web", server="edge", run=PROCESS_RUN), release_from=built.id)
    release = await target.prepare_release(rollback, FakeLog(), None)  # type: ignore[arg-type]
    assert release.workdir == Path(f".deploy-agent/releases/{built.id}") and len(shell.calls) == 1


async def test_remote_retention_keeps_directories_rollbacks_run_in(config: Config) -> None:
    """An old remote release's directory goes unless a kept release runs from it; no image asks no Docker."""
    target, shell = remote_process_target(config)
    old = deployment(DeploymentSpec(application="web", server="edge", run=PROCESS_RUN))
    await target.remove_release_files(old, {old.id})
    assert shell.calls == []
    await target.remove_release_files(old, set())
    assert shell.calls == [("remove_dir", f".deploy-agent/releases/{old.id}")]
    assert await target.prune_images("web", set(), recorded=set()) == []


async def test_an_interrupted_remote_process_build_is_killed_at_once_and_its_directory_removed(config: Config) -> None:
    """After a restart: the build's group gets no grace, then the release directory goes."""
    target, shell = remote_process_target(config)
    interrupted = deployment(
        DeploymentSpec(application="web", server="edge", build=BuildSpec(image=None, command="make", runtime="process")),
        pid=4242, pid_started_at=1234.0,
    )
    assert await target.stop_interrupted(interrupted) == 1
    assert shell.calls == [
        ("kill_group", 4242, 1234.0, 0), ("stop_supervised", interrupted.id),
        ("remove_dir", f".deploy-agent/releases/{interrupted.id}"),
    ]


def test_a_build_ends_stopped_before_it_ends_failed() -> None:
    """A stop asked for wins over the exit code; a timeout and a bad exit have their own error types."""
    with pytest.raises(StopRequested):
        check_build(FakeWatch(stopped=True), 5, 137, timed_out=True)  # type: ignore[arg-type]
    with pytest.raises(BuildTimedOut) as timed_out:
        check_build(FakeWatch(), 5, 137, timed_out=True)  # type: ignore[arg-type]
    assert timed_out.value.failure_fields() == {
        "error": {"type": "timeout", "message": "build timed out after 5s and was killed"},
        "exit_code": 137, "smoke_test": None,
    }
    with pytest.raises(BuildFailed) as failed:
        check_build(FakeWatch(), 5, 2, timed_out=False)  # type: ignore[arg-type]
    assert failed.value.error_type == "build_failed" and failed.value.exit_code == 2
    assert check_build(FakeWatch(), 5, 0, False, "deploy-agent/web:x").image == "deploy-agent/web:x"  # type: ignore[arg-type]
