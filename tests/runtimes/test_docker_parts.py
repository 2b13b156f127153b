"""The pure parts of the Docker runtime (agent/runtimes/docker/), checked without a Docker engine."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.config import DockerSettings
from agent.errors import RuntimeFailure
from agent.runtimes.base import ReleaseHandle, ReleaseSpec
from agent.runtimes.docker.gateway import DockerGateway, command_line, is_running
from agent.runtimes.docker.images import archive_workspace, extract_workspace
from agent.runtimes.docker.release import _port_in_use, _published_bindings, _with_bindings

DETAILS = {
    "State": {"Running": True, "Pid": 4321},
    "NetworkSettings": {
        "Ports": {
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}],
            "9090/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49154"}],
            "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "49155"}],
        }
    },
}


def _spec(bind: str = "127.0.0.1") -> ReleaseSpec:
    return ReleaseSpec("d-1", "web", "container", None, {}, Path("/dev/null"), ports=(8080,), bind=bind)


def _tar(*members: tarfile.TarInfo) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    buffer.seek(0)
    return buffer


def _file(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size, member.mode = 1, mode
    return member


def test_a_string_command_runs_through_the_shell_and_a_tuple_as_given() -> None:
    """A string command is `/bin/sh -c STRING`; a tuple is the argv itself."""
    assert command_line("echo hi && exit 3") == ["/bin/sh", "-c", "echo hi && exit 3"]
    assert command_line(("httpd", "-f")) == ["httpd", "-f"]


def test_a_restarting_container_does_not_count_as_running() -> None:
    """Docker reports Running and Restarting both while it waits to restart a crashed container."""
    assert is_running({"Running": True})
    assert not is_running({"Running": True, "Restarting": True})
    assert not is_running({})


async def test_labels_always_carry_the_instance_even_when_empty() -> None:
    """Release, snapshot and copy labels set the instance label, empty for no instance."""
    for instance, expected in ((None, ""), ("agent-a", "agent-a")):
        gateway = DockerGateway(DockerSettings(), max_streams=1, instance=instance)
        try:
            assert gateway.labels("release", "d-1", "web") == {
                "deploy-agent.role": "release",
                "deploy-agent.instance": expected,
                "deploy-agent.deployment": "d-1",
                "deploy-agent.application": "web",
            }
            assert gateway.labels("copy") == {"deploy-agent.role": "copy", "deploy-agent.instance": expected}
        finally:
            await gateway.close()


def test_published_bindings_are_the_tcp_ports_docker_reports() -> None:
    """Without wanted ports every published tcp port is listed; with them, only those, in their order."""
    assert _published_bindings(DETAILS) == {8080: ("0.0.0.0", 49153), 9090: ("127.0.0.1", 49154)}
    assert list(_published_bindings(DETAILS, (9090, 8080))) == [9090, 8080]
    assert _published_bindings(DETAILS, (7000,)) == {}


def test_the_handle_takes_the_address_docker_bound_its_first_port_on() -> None:
    """An any-address binding is reached on loopback; no binding keeps the handle's host."""
    handle = ReleaseHandle(runtime="container", deployment_id="d-1", application="web", host="10.0.0.5")
    refreshed = _with_bindings(handle, _published_bindings(DETAILS, (8080, 9090)), DETAILS)
    assert (refreshed.host, refreshed.ports, refreshed.pid) == ("127.0.0.1", {8080: 49153, 9090: 49154}, 4321)
    assert _with_bindings(handle, {}, {"State": {}}).host == "10.0.0.5"


def test_a_taken_host_port_is_named_in_the_failure() -> None:
    """Both of Docker's wordings of a taken port become one message naming the port and bind address."""
    allocated = RuntimeFailure("starting failed: Bind for 0.0.0.0:8080 failed: port is already allocated")
    in_use = RuntimeFailure("starting failed: listen tcp4 10.0.0.5:9000: bind: address already in use")
    assert str(_port_in_use(allocated, _spec("0.0.0.0"))) == (
        "cannot start the release: host port 8080 is already in use on 0.0.0.0"
    )
    assert "host port 9000 is already in use on *" in str(_port_in_use(in_use, _spec("")))
    assert _port_in_use(RuntimeFailure("no such image"), _spec()) is None


def test_the_workspace_archive_is_owned_by_root_with_git_modes(tmp_path: Path) -> None:
    """Files enter the container as root's, 0755 when executable and 0644 otherwise; a missing workspace is an empty folder."""
    workspace = tmp_path / "workspace"
    workspace.mkdir(mode=0o700)
    (workspace / "run.sh").write_text("#!/bin/sh\n")
    (workspace / "run.sh").chmod(0o700)
    (workspace / "notes.txt").write_text("notes\n")
    (workspace / "notes.txt").chmod(0o600)
    with archive_workspace(workspace) as archive, tarfile.open(fileobj=archive) as tar:
        members = {member.name: member for member in tar}
    assert {(name, member.uid, member.uname, oct(member.mode)) for name, member in members.items()} == {
        ("workspace", 0, "root", "0o755"),
        ("workspace/run.sh", 0, "root", "0o755"),
        ("workspace/notes.txt", 0, "root", "0o644"),
    }
    with archive_workspace(tmp_path / "absent") as archive, tarfile.open(fileobj=archive) as tar:
        assert [(member.name, member.isdir()) for member in tar] == [("workspace", True)]


def test_the_extracted_workspace_loses_its_folder_and_is_owner_only(tmp_path: Path) -> None:
    """`workspace/...` lands in dest itself, executables 0700 and other files 0600."""
    folder = tarfile.TarInfo("workspace")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    extract_workspace(_tar(folder, _file("workspace/app.py"), _file("workspace/run", 0o755)), tmp_path, "img")
    assert (tmp_path / "app.py").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", ["workspace/../escape", "elsewhere/file", "/workspace/abs"])
def test_members_outside_the_workspace_are_refused(tmp_path: Path, name: str) -> None:
    """A member outside `workspace/`, or climbing out of it, fails the copy and writes nothing."""
    with pytest.raises(RuntimeFailure, match="refusing unsafe path"):
        extract_workspace(_tar(_file(name)), tmp_path / "dest", "img")
    assert not (tmp_path / "escape").exists()


def test_devices_in_the_workspace_are_refused(tmp_path: Path) -> None:
    """A device node or pipe in the image's /workspace fails the copy."""
    pipe = tarfile.TarInfo("workspace/pipe")
    pipe.type = tarfile.FIFOTYPE
    with pytest.raises(RuntimeFailure, match="refusing device or pipe"):
        extract_workspace(_tar(pipe), tmp_path, "img")
