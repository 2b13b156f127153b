"""The remote process runtime against a real sshd: uploads, clones, builds, kills, releases, lost connections.

The "remote" server is this machine (or a network namespace on it), so psutil sees the remote processes.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import asyncssh
import psutil
import pytest

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.base import ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.remote import RemoteBuildJob, RemoteProcessRuntime
from tests.conftest import log_entries
from tests.sshd import SshServer, free_port

DEADLINE_S = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class Connections:
    """The `connect` callable a pool would provide: one shared connection, reopened once it closed."""

    def __init__(self, server: SshServer) -> None:
        self.server = server
        self.current: asyncssh.SSHClientConnection | None = None
        self.opened: list[asyncssh.SSHClientConnection] = []

    async def __call__(self) -> asyncssh.SSHClientConnection:
        if self.current is None or self.current.is_closed():
            self.current = await asyncssh.connect(
                self.server.host, port=self.server.port, username=self.server.user,
                client_keys=[str(self.server.identity_file)], known_hosts=str(self.server.known_hosts),
            )
            self.opened.append(self.current)
        return self.current

    async def close(self) -> None:
        for connection in self.opened:
            connection.close()
            await connection.wait_closed()


class Started:
    """Records every (pid, start ticks) a build reports, and SIGKILLs what is left of them at teardown."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, float]] = []
        self.event = asyncio.Event()

    async def __call__(self, pid: int, started_at: float) -> None:
        self.groups.append((pid, started_at))
        self.event.set()

    async def first(self) -> tuple[int, float]:
        async with asyncio.timeout(DEADLINE_S):
            await self.event.wait()
        return self.groups[0]

    def cleanup(self) -> None:
        for pid, ticks in self.groups:
            if start_ticks(pid) == ticks:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
async def connections(sshd: SshServer) -> AsyncIterator[Connections]:
    connect = Connections(sshd)
    yield connect
    await connect.close()


@pytest.fixture
def remote_root(tmp_path: Path) -> Path:
    return tmp_path / "remote-root"


@pytest.fixture
async def runtime(connections: Connections, remote_root: Path) -> AsyncIterator[RemoteProcessRuntime]:
    runtime = RemoteProcessRuntime("edge", connections, kill_grace_s=1.0, remote_root=str(remote_root))
    yield runtime
    await runtime.close()


@pytest.fixture
def started() -> Iterator[Started]:
    record = Started()
    yield record
    record.cleanup()


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "index.html").write_text("<h1>hello over sftp</h1>\n")
    (source / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (source / "sub" / "run.sh").chmod(0o750)
    (source / "link.html").symlink_to("index.html")
    return source


def start_ticks(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rpartition(")")[2].split()[19])


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def eventually(check: Callable[[], Awaitable[T | None] | T | None], what: str, timeout_s: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except (urllib.error.URLError, OSError):
        return None


def job(remote_dir: Path, command: tuple[str, ...] | str, timeout_s: float = 30, **env: str) -> RemoteBuildJob:
    return RemoteBuildJob(deployment_id="dep_remote", command=command, env=env, timeout_s=timeout_s,
                          remote_dir=str(remote_dir))


# -- workspaces and builds -----------------------------------------------------------------------


async def test_uploaded_workspace_build_streams_stdout_and_stderr_and_returns_its_code(
    runtime: RemoteProcessRuntime, log: DeploymentLog, source_dir: Path, remote_root: Path, started: Started
) -> None:
    """Upload then `cat file; echo err >&2; exit 4`: lines land in the log under stage build, code 4 comes back."""
    workspace = remote_root / "workspaces" / "dep_remote"
    await runtime.upload_workspace(source_dir, str(workspace), log)
    assert (workspace / "index.html").read_text() == "<h1>hello over sftp</h1>\n"
    assert (workspace / "sub" / "run.sh").stat().st_mode & 0o777 == 0o750
    assert os.readlink(workspace / "link.html") == "index.html"

    result = await runtime.run_build(job(workspace, "cat index.html; echo err >&2; exit 4"), log, started)

    assert result == (4, False)
    lines = log_entries(log.path)
    assert ("build", "stdout", "<h1>hello over sftp</h1>") in lines
    assert ("build", "stderr", "err") in lines
    assert not any("__deploy_agent_started__" in text for _, _, text in lines)


async def test_output_arrives_while_the_build_runs(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """Lines reach the log as they are printed, not when the command ends."""
    build = asyncio.create_task(
        runtime.run_build(job(remote_root / "w", "echo first; sleep 2; echo second"), log, started)
    )
    await eventually(lambda: ("build", "stdout", "first") in log_entries(log.path), "the first line")
    assert not build.done() and ("build", "stdout", "second") not in log_entries(log.path)
    assert await build == (0, False)


async def test_on_start_reports_the_remote_pid_its_start_time_and_group(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """on_start gets the pid and /proc start time of the build's supervisor, which leads the group the command runs in."""
    checked: list[int] = []
    workspace = remote_root / "w"

    async def on_start(pid: int, started_at: float) -> None:
        await started(pid, started_at)
        process = psutil.Process(pid)
        assert process.create_time() == pytest.approx(psutil.boot_time() + started_at / CLOCK_TICKS, abs=0.05)
        assert start_ticks(pid) == started_at
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
        checked.append(pid)

    # The command prints its process group (field 5 of /proc/self/stat): the reported pid's.
    command = ("sh", "-c", "sleep 0.5; touch ran; cut -d ' ' -f 5 /proc/$$/stat")
    assert await runtime.run_build(job(workspace, command), log, on_start) == (0, False)
    assert (workspace / "ran").exists()
    assert ("build", "stdout", str(checked[0])) in log_entries(log.path)


async def test_env_values_with_spaces_and_quotes_arrive_intact(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """Env values and list arguments keep their spaces, quotes, dollars and newlines."""
    value = "it's a \"quoted\" $HOME `value`  with  spaces"
    command = ("sh", "-c", 'printf "%s|%s\\n" "$VALUE" "$1"', "sh", "arg with 'quote'")
    assert await runtime.run_build(job(remote_root / "w", command, VALUE=value), log, started) == (0, False)
    assert ("build", "stdout", f"{value}|arg with 'quote'") in log_entries(log.path)


async def test_a_build_that_times_out_is_killed(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """`sleep 60` with a 1 s timeout: timed out, killed by SIGTERM, gone from the host."""
    begun = time.monotonic()
    exit_code, timed_out = await runtime.run_build(job(remote_root / "w", "sleep 60", timeout_s=1), log, started)
    assert timed_out is True and exit_code == 128 + signal.SIGTERM
    assert time.monotonic() - begun < 10
    pid, ticks = started.groups[0]
    await eventually(lambda: not psutil.pid_exists(pid) or start_ticks(pid) != ticks, "the build's supervisor to exit")


async def test_kill_group_ends_the_process_and_its_children(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """kill_group on a fresh channel ends the command and every child in its group."""
    build = asyncio.create_task(
        runtime.run_build(job(remote_root / "w", ("sh", "-c", "sleep 300 & sleep 300 & wait")), log, started)
    )
    pid, ticks = await started.first()
    leader = psutil.Process(pid)  # the supervisor; the command and its two sleeps below it

    def sleeps() -> list[psutil.Process]:
        return [child for child in leader.children(recursive=True) if child.name() == "sleep"]

    children = await eventually(lambda: len(sleeps()) == 2 and leader.children(recursive=True), "two sleeps")
    tree = [leader, *children]

    assert await runtime.kill_group(pid, ticks, 1.0) is True

    assert not any(alive(process) for process in tree)
    exit_code, timed_out = await asyncio.wait_for(build, DEADLINE_S)
    assert exit_code == 128 + signal.SIGTERM and not timed_out
    assert await runtime.kill_group(pid, ticks, 1.0) is False


async def test_kill_group_with_another_start_time_signals_nothing(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """A start time that differs (the PID was reused) means not ours: nothing is signalled."""
    build = asyncio.create_task(runtime.run_build(job(remote_root / "w", "sleep 300"), log, started))
    pid, ticks = await started.first()

    assert await runtime.kill_group(pid, ticks + 1, 0.5) is False
    assert await runtime.kill_group(pid, ticks - 1, 0.5) is False
    await asyncio.sleep(0.2)
    assert alive(psutil.Process(pid)) and not build.done()

    assert await runtime.kill_group(pid, ticks, 0.5) is True
    await asyncio.wait_for(build, DEADLINE_S)


async def test_leftovers_of_a_finished_build_are_ended(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, started: Started
) -> None:
    """A build that exits with a child still running: the child goes too, as it would with a container."""
    command = "sleep 300 > /dev/null 2>&1 & echo $! > child.pid; exit 0"
    assert await runtime.run_build(job(remote_root / "w", command), log, started) == (0, False)
    child = int((remote_root / "w" / "child.pid").read_text())
    await eventually(lambda: not alive(psutil.Process(child)) if psutil.pid_exists(child) else True, "child gone")


@pytest.mark.parametrize("how", ["abort", "kill-sshd-session"])
async def test_a_dropped_connection_does_not_stop_the_build(
    how: str, runtime: RemoteProcessRuntime, connections: Connections, sshd: SshServer, log: DeploymentLog,
    remote_root: Path, started: Started,
) -> None:
    """The connection dies mid-build: the build runs on under its supervisor; its output follows once reconnected."""
    build = asyncio.create_task(
        runtime.run_build(job(remote_root / "w", "echo started; sleep 2; echo finished"), log, started)
    )
    await started.first()
    await eventually(lambda: ("build", "stdout", "started") in log_entries(log.path), "the first line")
    if how == "abort":
        assert connections.current is not None
        connections.current.abort()
    else:
        for session in psutil.Process(sshd.process.pid).children():
            session.send_signal(signal.SIGKILL)

    assert await asyncio.wait_for(build, 60) == (0, False)
    lines = [text for stage, stream, text in log_entries(log.path) if stream == "stdout"]
    assert lines == ["started", "finished"]


async def test_git_clone_on_the_server_checks_out_the_ref(
    runtime: RemoteProcessRuntime, log: DeploymentLog, tmp_path: Path, remote_root: Path
) -> None:
    """clone_workspace clones a repository path on the server, checks out a tag, streams git's output."""
    repository = tmp_path / "repository"
    repository.mkdir()
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repository / "version.txt").write_text("one\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    (repository / "version.txt").write_text("two\n")
    subprocess.run([*git, "commit", "-q", "-am", "two"], check=True)
    workspace = remote_root / "workspaces" / "clone"

    await runtime.clone_workspace(str(repository), "v1", str(workspace), log)

    assert (workspace / "version.txt").read_text() == "one\n"
    assert any(stage == "source" and "Cloning into" in text for stage, _, text in log_entries(log.path))
    with pytest.raises(RuntimeFailure, match="ref 'nope' is not a branch, tag or commit"):
        await runtime.clone_workspace(str(repository), "nope", str(workspace), log)
    with pytest.raises(RuntimeFailure, match="git clone of .* failed"):
        await runtime.clone_workspace(str(tmp_path / "missing"), None, str(workspace), log)


async def test_relative_paths_are_under_the_login_home(
    connections: Connections, sshd: SshServer, log: DeploymentLog, tmp_path: Path, started: Started
) -> None:
    """A relative remote_root (the default kind) means the SSH user's home: clone, build and remove there."""
    home = Path(pwd.getpwnam(sshd.user).pw_dir)
    root = f".deploy-agent-test-{uuid.uuid4().hex[:12]}"
    runtime = RemoteProcessRuntime("edge", connections, kill_grace_s=1.0, remote_root=root)
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "version.txt").write_text("relative\n")
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    workspace = runtime.workspace_dir("dep_relative")
    try:
        await runtime.clone_workspace(str(repository), None, workspace, log)
        assert (home / workspace / "version.txt").read_text() == "relative\n"
        assert await runtime.run_build(job(Path(workspace), "cat version.txt"), log, started) == (0, False)
        assert ("build", "stdout", "relative") in log_entries(log.path)
        await runtime.remove_dir(workspace)
        assert not (home / workspace).exists()
    finally:
        shutil.rmtree(home / root, ignore_errors=True)
        await runtime.close()


async def test_remove_dir_deletes_only_under_the_remote_root(
    runtime: RemoteProcessRuntime, remote_root: Path, tmp_path: Path
) -> None:
    """remove_dir deletes a workspace (read-only parts too) and refuses paths outside remote_root."""
    workspace = remote_root / "workspaces" / "gone"
    (workspace / "locked").mkdir(parents=True)
    (workspace / "locked" / "file").write_text("x")
    (workspace / "locked").chmod(0o500)
    await runtime.remove_dir(str(workspace))
    assert not workspace.exists()
    await runtime.remove_dir(str(workspace))  # already gone: fine
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (str(outside), str(remote_root), f"{remote_root}/workspaces/../../outside"):
        with pytest.raises(RuntimeFailure, match="refusing to remove"):
            await runtime.remove_dir(path)
    assert outside.exists()


# -- releases ------------------------------------------------------------------------------------


async def release_end(runtime: RemoteProcessRuntime, handle: ReleaseHandle, what: str) -> ReleaseState:
    """The state of `handle` once its release has ended by itself."""

    async def ended() -> ReleaseState | None:
        state = await runtime.release_state(handle)
        return None if state.running else state

    return await eventually(ended, what)


def release_spec(tmp_path: Path, workdir: Path, command: tuple[str, ...] | str, port: int) -> ReleaseSpec:
    return ReleaseSpec(
        deployment_id="dep_release", application="web", runtime="process", command=command, env={"GREETING": "hi there"},
        log_path=tmp_path / "release.log", ports=(port,), workdir=workdir,
    )


async def serve_and_stop(runtime: RemoteProcessRuntime, spec: ReleaseSpec, log: DeploymentLog, host: str) -> None:
    handle = await runtime.start_release(spec, log)
    try:
        port = spec.ports[0]
        assert handle.host == host and handle.ports == {port: port}
        assert handle.pid == handle.process_group and handle.pid_started_at == start_ticks(handle.pid)
        body = await eventually(lambda: asyncio.to_thread(http_get, f"http://{handle.host}:{port}/"), "httpd")
        assert body == b"<h1>hello over sftp</h1>\n"
        assert (await runtime.release_state(handle)).running
        assert await eventually(lambda: runtime.last_output(handle, 5), "output") == ["hi there"]

        await runtime.stop_release(handle, 1.0)

        assert not psutil.pid_exists(handle.pid) or not alive(psutil.Process(handle.pid))
        state = await runtime.release_state(handle)
        assert not state.running and state.exit_code == 128 + signal.SIGTERM
        assert await asyncio.to_thread(http_get, f"http://{handle.host}:{port}/") is None
    finally:
        await runtime.remove_release(handle, 1.0)
    assert ("release", "stdout", "hi there") in log_entries(spec.log_path)


async def test_httpd_release_answers_at_the_handle_address_and_stop_ends_it(
    runtime: RemoteProcessRuntime, log: DeploymentLog, source_dir: Path, remote_root: Path, tmp_path: Path
) -> None:
    """`busybox httpd` in an uploaded dir serves at handle.host:PORT; stop_release ends it with SIGTERM."""
    workdir = remote_root / "releases" / "dep_release"
    await runtime.upload_workspace(source_dir, str(workdir), log)
    command = 'echo "$GREETING"; exec busybox httpd -f -p "$PORT" -h .'
    await serve_and_stop(runtime, release_spec(tmp_path, workdir, command, free_port()), log, "127.0.0.1")


async def test_a_release_that_exits_reports_its_code_and_output(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, tmp_path: Path
) -> None:
    """A release that ends by itself: not running, its exit code and last lines are known."""
    workdir = remote_root / "releases" / "dep_release"
    workdir.mkdir(parents=True)
    spec = release_spec(tmp_path, workdir, 'echo "$GREETING"; echo oops >&2; exit 3', free_port())
    handle = await runtime.start_release(spec, log)
    state = await release_end(runtime, handle, "the release to end")
    assert state.exit_code == 3
    assert await runtime.last_output(handle, 10) == ["hi there", "oops"]
    await runtime.remove_release(handle, 1.0)


async def test_releases_that_end_at_once_still_start_and_report_their_code(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, tmp_path: Path
) -> None:
    """A release over before its launcher looks at it (maybe reaped already) still starts, and its code is known."""
    workdir = remote_root / "releases" / "dep_quick"
    workdir.mkdir(parents=True)
    for attempt in range(12):
        spec = replace(
            release_spec(tmp_path, workdir, "exit 7", free_port()),
            deployment_id=f"dep_quick{attempt}", log_path=tmp_path / f"quick{attempt}.log",
        )
        handle = await runtime.start_release(spec, log)
        assert handle.pid is not None and handle.pid > 1 and handle.pid_started_at
        assert (await release_end(runtime, handle, "the quick release to end")).exit_code == 7
        await runtime.remove_release(handle, 1.0)


async def test_a_release_in_a_missing_directory_fails_to_start(
    runtime: RemoteProcessRuntime, log: DeploymentLog, remote_root: Path, tmp_path: Path
) -> None:
    """start_release in a directory that does not exist raises RuntimeFailure saying why."""
    spec = release_spec(tmp_path, remote_root / "nowhere", ("sleep", "30"), free_port())
    with pytest.raises(RuntimeFailure, match="could not start.*nowhere"):
        await runtime.start_release(spec, log)


async def test_a_server_in_its_own_network_namespace_runs_builds_and_releases(
    sshd_remote: SshServer, log: DeploymentLog, source_dir: Path, tmp_path: Path
) -> None:
    """Against the namespaced sshd (10.23W.x.2): a build runs, and a release answers at the server's address."""
    connections = Connections(sshd_remote)
    remote_root = tmp_path / "remote-root"
    runtime = RemoteProcessRuntime("far", connections, kill_grace_s=1.0, remote_root=str(remote_root))
    started = Started()
    try:
        workdir = remote_root / "releases" / "dep_release"
        await runtime.upload_workspace(source_dir, str(workdir), log)
        result = await runtime.run_build(job(workdir, "cat index.html; exit 2"), log, started)
        assert result == (2, False)
        assert ("build", "stdout", "<h1>hello over sftp</h1>") in log_entries(log.path)
        command = ("sh", "-c", 'echo "$GREETING"; exec busybox httpd -f -p "$PORT" -h .')
        await serve_and_stop(runtime, release_spec(tmp_path, workdir, command, 8080), log, sshd_remote.host)
    finally:
        started.cleanup()
        await runtime.close()
        await connections.close()


async def test_a_release_outlives_the_agent_and_its_output_resumes_without_gaps_or_repeats(
    sshd: SshServer, remote_root: Path, tmp_path: Path
) -> None:
    """The agent's connection goes away (restart): the release keeps running and writing; a new
    runtime with the same state picks its output up where the old one stopped, then stops it."""
    state_dir = tmp_path / "state"
    workdir = remote_root / "releases" / "dep_release"
    workdir.mkdir(parents=True)
    command = 'i=0; while :; do echo "line $i"; i=$((i + 1)); sleep 0.05; done'
    spec = release_spec(tmp_path, workdir, command, free_port())

    def stdout_lines() -> list[str]:
        return [text for stage, stream, text in log_entries(spec.log_path) if stream == "stdout"]

    first_connections = Connections(sshd)
    first = RemoteProcessRuntime("edge", first_connections, kill_grace_s=1.0, remote_root=str(remote_root),
                                 state_dir=state_dir)
    with DeploymentLog(tmp_path / "agent.log") as log:
        handle = await first.start_release(spec, log)
    assert handle.pid is not None
    try:
        await eventually(lambda: len(stdout_lines()) >= 5, "the first lines")
        await first.close()
        await first_connections.close()
        seen_before = len(stdout_lines())
        await asyncio.sleep(1.0)
        process = psutil.Process(handle.pid)
        assert alive(process) and start_ticks(handle.pid) == handle.pid_started_at, "the release died with the agent"
        assert len(stdout_lines()) <= seen_before + 1, "output kept arriving with nobody following"

        second_connections = Connections(sshd)
        second = RemoteProcessRuntime("edge", second_connections, kill_grace_s=1.0, remote_root=str(remote_root),
                                      state_dir=state_dir)
        try:
            second.follow_release(handle, spec.log_path)
            await eventually(lambda: len(stdout_lines()) >= seen_before + 30, "output after the restart")
            assert (await second.release_state(handle)).running
            await second.stop_release(handle, 1.0)
            assert not alive(process)
            state = await second.release_state(handle)
            assert not state.running and state.exit_code == 128 + signal.SIGTERM
            lines = stdout_lines()
            assert lines == [f"line {n}" for n in range(len(lines))], "output was lost or repeated"
            assert any(f"process {handle.pid} on server edge exited with code 143" in raw
                       for raw in spec.log_path.read_text().splitlines())
            await second.remove_release(handle, 1.0)
            assert not (remote_root / "run" / "dep_release").exists()
            assert not list(state_dir.glob("*.offsets"))
        finally:
            await second.close()
            await second_connections.close()
    finally:
        if start_ticks(handle.pid) == handle.pid_started_at:
            os.killpg(handle.pid, signal.SIGKILL)


async def test_free_port_is_not_one_the_server_listens_on(
    runtime: RemoteProcessRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port asks the server: with all but one port of a small range listened on, it picks that one."""
    import socket

    from agent.runtimes.remote import scripts

    monkeypatch.setattr(scripts, "REMOTE_PORTS", range(20000, 20064))
    listeners = []
    try:
        for port in range(20000, 20063):  # 20063 stays free
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sock.listen()
            listeners.append(sock)
        free = set(range(20000, 20064)) - {sock.getsockname()[1] for sock in listeners}
        for _ in range(10):
            assert await runtime.free_port() in free
    finally:
        for sock in listeners:
            sock.close()


async def test_more_releases_than_sshd_allows_channels_all_run_and_stream(
    runtime: RemoteProcessRuntime, connections: Connections, remote_root: Path, tmp_path: Path, started: Started
) -> None:
    """12 releases on one connection (sshd's MaxSessions is 10): each streams its output, and a build
    still gets a channel, because a started release holds none and the followers share one SFTP session."""
    workdir = remote_root / "releases" / "many"
    workdir.mkdir(parents=True)
    handles = []
    try:
        for n in range(12):
            spec = replace(
                release_spec(tmp_path, workdir, f'while :; do echo "alive-{n}"; sleep 0.2; done', free_port()),
                deployment_id=f"dep_many_{n}", log_path=tmp_path / f"many-{n}.log",
            )
            with DeploymentLog(tmp_path / "agent.log") as agent_log:
                handles.append((await runtime.start_release(spec, agent_log), spec.log_path))
        for n, (handle, log_path) in enumerate(handles):
            await eventually(lambda: log_path.exists() and f"alive-{n}" in log_path.read_text(), f"output of {n}")
        with DeploymentLog(tmp_path / "build.log") as build_log:
            assert await runtime.run_build(job(workdir, "echo built"), build_log, started) == (0, False)
        assert len(connections.opened) == 1
    finally:
        for handle, _ in handles:
            await runtime.remove_release(handle, 1.0)
    for handle, _ in handles:
        assert handle.pid is not None and not (psutil.pid_exists(handle.pid) and alive(psutil.Process(handle.pid)))
