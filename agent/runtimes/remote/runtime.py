"""`RemoteProcessRuntime`: builds and process releases on one server, composed of the remote parts.

Builds and releases run under a detached supervisor whose output files `OutputFollower` copies
into the log (`output`), so both outlive the agent; short commands run on a command channel
(`channel`, `commands`); workspaces are
filled and removed by `workspaces` over `transfer`, all under the server's `RemoteLayout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from agent.errors import RuntimeFailure
from agent.logs import DEFAULT_POLICY, DeploymentLog, LogPolicy
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.remote.channel import CommandSession, Connect, LineSink, RemoteShell, describe, peer_host
from agent.runtimes.remote.commands import (
    BUILD_STAGE, EXIT_REPORT_S, OnStart, RemoteCommands,
)
from agent.runtimes.remote.layout import REMOTE_ROOT, RemoteLayout
from agent.runtimes.remote.output import LIVENESS_EVERY_S, OutputFollower
from agent.runtimes.remote.scripts import (
    LIST_PORTS_SCRIPT, LIST_SUPERVISORS_SCRIPT, display, listening_ports, pick_free_port, read_supervisors,
    release_script,
)
from agent.runtimes.remote.transfer import SftpTransfer
from agent.runtimes.remote.workspaces import RemoteWorkspaces

# How long a command may take to report its pid once its channel is open.
START_TIMEOUT_S = 10.0
# Output lines of each release kept for last_output.
OUTPUT_LINES_KEPT = 50


@dataclass(frozen=True)
class RemoteBuildJob:
    """One build on a server: the command, its environment, and the remote workspace it runs in."""

    deployment_id: str
    command: tuple[str, ...] | str
    env: Mapping[str, str]
    timeout_s: float
    # Remote workspace directory, created when missing; relative paths are under the login's home.
    remote_dir: str


@dataclass
class _Release:
    """A release this runtime follows: its pid and start time, and the follower copying its output."""

    pid: int
    started_at: float
    follower: OutputFollower
    task: asyncio.Task[None]


class RemoteProcessRuntime:
    """Runs builds and process releases on one server; implements `ReleaseRuntime` for "process"."""

    def __init__(
        self,
        server_name: str,
        connect: Connect,
        *,
        kill_grace_s: float = 10.0,
        remote_root: str = REMOTE_ROOT,
        state_dir: Path | None = None,
    ) -> None:
        self.server_name = server_name
        # Where the read offsets of release output are kept, so a restarted agent resumes them.
        self.state_dir = state_dir
        self.layout = RemoteLayout(remote_root)
        self._shell = RemoteShell(server_name, connect)
        self._commands = RemoteCommands(self._shell, kill_grace_s)
        self._transfer = SftpTransfer(self._shell)
        self._workspaces = RemoteWorkspaces(self._commands, self._transfer, self.layout)
        self._releases: dict[str, _Release] = {}

    @property
    def kill_grace_s(self) -> float:
        return self._commands.kill_grace_s

    @property
    def remote_root(self) -> str:
        return self.layout.root

    def workspace_dir(self, deployment_id: str) -> str:
        """The remote workspace directory of a deployment, under `remote_root`."""
        return self.layout.workspace_dir(deployment_id)

    def run_dir(self, deployment_id: str) -> str:
        """Where a release's output files and exit code live on the server."""
        return self.layout.run_dir(deployment_id)

    # -- workspaces ----------------------------------------------------------------------------

    async def upload_workspace(self, local_dir: Path, remote_dir: str, log: DeploymentLog) -> None:
        """Copies `local_dir` into `remote_dir` (created) over SFTP, keeping modes, times and symlinks."""
        await self._workspaces.upload(local_dir, remote_dir, log)

    async def clone_workspace(self, url: str, ref: str | None, remote_dir: str, log: DeploymentLog) -> None:
        """Clones `url` into `remote_dir` on the server and checks out `ref`; output goes to stage "source"."""
        await self._workspaces.clone(url, ref, remote_dir, log)

    async def download_archive(self, remote_dir: str, dest: Path) -> None:
        """Writes a tar of `remote_dir`'s contents (entries `./...`) to the local file `dest`.

        Lets a workspace prepared on the server (a git clone) go into a build container of the
        server's Docker engine without the agent's host ever fetching the source itself.
        """
        await self._transfer.download_archive(remote_dir, dest)

    async def has_dir(self, remote_dir: str) -> bool:
        """Whether `remote_dir` is a directory on the server."""
        return await self._transfer.is_dir(remote_dir)

    async def remove_dir(self, remote_dir: str) -> None:
        """Deletes a directory under `remote_root` on the server; a missing one is fine."""
        await self._workspaces.remove(remote_dir)

    async def free_port(self) -> int:
        """A TCP port nothing listens on on the server, from the range the agent hands out."""
        code, output, error = await self._shell.query(LIST_PORTS_SCRIPT, "listing listening ports")
        if code != 0:
            raise RuntimeFailure(f"listing the listening ports of server {self.server_name} failed: {error}")
        return pick_free_port(listening_ports(output))

    async def stop_supervised(self, deployment_id: str) -> int:
        """Stops whatever of the deployment runs under a supervisor (its release, its build), recorded or not.

        After a crash between starting one and recording its pid, only the supervisor's argv (its
        run directory, named by the deployment id) tells it is there. Returns how many groups were stopped.
        """
        code, output, error = await self._shell.query(LIST_SUPERVISORS_SCRIPT, "listing supervisors")
        if code != 0:
            raise RuntimeFailure(f"listing the processes of server {self.server_name} failed: {error}")
        stopped = 0
        for pid, started_at, key in read_supervisors(output):
            if key in (deployment_id, _build_key(deployment_id)) and await self.kill_group(pid, started_at, 0):
                stopped += 1
        return stopped

    # -- builds --------------------------------------------------------------------------------

    async def run_build(self, job: RemoteBuildJob, log: DeploymentLog, on_start: OnStart) -> tuple[int | None, bool]:
        """Runs the build command in its workspace; returns (exit code, timed out).

        It runs under the same detached supervisor as a release, its output going to files on
        the server that a follower copies into the log: the build outlives the agent and its
        connection, and `reattach_build` takes it back after a restart. `on_start(pid,
        starttime)` is awaited once the remote pid is known; a timeout kills the group.
        """
        log.agent(BUILD_STAGE, f"running on server {self.server_name}: {display(job.command)}")
        key = _build_key(job.deployment_id)
        follower = self._follower(key, log.path, log.policy, fresh=True, stage=BUILD_STAGE)
        script = release_script(job.remote_dir, job.env, job.command, self.run_dir(key), create_dir=True)
        pid, started_at, _ = await self._launch(script, follower, "the build")
        try:
            await on_start(pid, started_at)
        except BaseException:
            follower.log.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._commands.cleanup_group((pid, started_at), log, BUILD_STAGE))
            raise
        return await self._await_build(job, follower, pid, started_at, job.timeout_s, log)

    async def reattach_build(
        self, job: RemoteBuildJob, log: DeploymentLog, pid: int, started_at: float, ran_s: float
    ) -> tuple[int | None, bool] | None:
        """After a restart: follows the build again from where its log stopped; None when it vanished.

        `ran_s` is how long it has run already: its timeout counts from its real start.
        """
        follower = self._follower(_build_key(job.deployment_id), log.path, log.policy, fresh=False, stage=BUILD_STAGE)
        log.agent("recovery", f"the agent restarted; following the build again (process {pid} on server {self.server_name})")
        code, timed_out = await self._await_build(job, follower, pid, started_at, job.timeout_s - ran_s, log)
        if code is None and not timed_out:
            return None
        return code, timed_out

    async def _await_build(
        self, job: RemoteBuildJob, follower: OutputFollower, pid: int, started_at: float, remaining_s: float,
        log: DeploymentLog,
    ) -> tuple[int | None, bool]:
        """Copies the build's output until it ends or its time is up (then its group is killed)."""
        build = self._follow(_build_key(job.deployment_id), pid, started_at, follower)
        timed_out = False
        try:
            try:
                async with asyncio.timeout(max(0.0, remaining_s)):
                    await asyncio.shield(build.task)
            except TimeoutError:
                timed_out = True
                log.agent(BUILD_STAGE, f"build timed out after {job.timeout_s:g}s; stopping")
                await self.kill_group(pid, started_at, self.kill_grace_s)
                await _wait_ended(build, EXIT_REPORT_S + LIVENESS_EVERY_S)
        except BaseException:
            # Killed: stop the group, then let the follower copy its last lines (within a budget).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.kill_group(pid, started_at, self.kill_grace_s))
            with contextlib.suppress(BaseException):
                await asyncio.shield(_wait_ended(build, EXIT_REPORT_S + LIVENESS_EVERY_S))
            await _forget(build)
            raise
        await _forget(build)
        code = follower.exit_code
        if not timed_out and code is not None:
            # A container ends with its build; here, whatever the build left behind in its group goes now.
            await self._commands.cleanup_group((pid, started_at), log, BUILD_STAGE)
            log.agent(BUILD_STAGE, f"build exited with code {code}")
        if code is not None or timed_out:
            await self._forget_build_files(job.deployment_id)
        return code, timed_out

    async def _forget_build_files(self, deployment_id: str) -> None:
        key = _build_key(deployment_id)
        if self.state_dir is not None:
            self._offsets_file(key).unlink(missing_ok=True)
        with contextlib.suppress(RuntimeFailure):
            await self.remove_dir(self.run_dir(key))

    async def kill_group(self, pid: int, started_at: float, grace_s: float) -> bool:
        """SIGTERM to the group of `pid`, SIGKILL after `grace_s`; True if it was ours and is now gone."""
        return await self._commands.kill_group(pid, started_at, grace_s)

    # -- ReleaseRuntime ------------------------------------------------------------------------

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the command in `spec.workdir` (a remote path) under a supervisor; returns once its pid is known.

        The supervisor writes the output to files in `run_dir` and the exit code after it, so the
        release does not depend on the agent's connection; a follower copies the files into the log.
        """
        if not spec.command:
            raise RuntimeFailure("a process release needs a command")
        if spec.workdir is None:
            raise RuntimeFailure("a process release needs a working directory")
        env = {"PORT": str(spec.ports[0])} if spec.ports else {}
        env.update({str(key): str(value) for key, value in spec.env.items()})
        script = release_script(str(spec.workdir), env, spec.command, self.run_dir(spec.deployment_id))
        previous = self._releases.pop(spec.deployment_id, None)
        if previous is not None:
            await _forget(previous)
        # The follower outlives `log` and writes through its own writer, held to the same policy.
        follower = self._follower(spec.deployment_id, spec.log_path, log.policy, fresh=True)
        pid, started_at, host = await self._launch(script, follower, "the release")
        self._releases[spec.deployment_id] = self._follow(spec.deployment_id, pid, started_at, follower)
        log.agent(RELEASE_STAGE, f"started process {pid} on server {self.server_name}: {display(spec.command)}")
        return ReleaseHandle(
            runtime="process",
            deployment_id=spec.deployment_id,
            application=spec.application,
            host=host,
            ports={port: port for port in spec.ports},
            pid=pid,
            pid_started_at=started_at,
            process_group=pid,
        )

    async def _launch(self, script: str, follower: OutputFollower, what: str) -> tuple[int, float, str]:
        """Starts a `release_script` and returns (pid, starttime, the server's address) once it reported them.

        Its output goes to files, not to the channel: the launching shell exits right after the
        report. On failure the follower's writer is closed and RuntimeFailure says why.
        """
        try:
            connection = await self._shell.connection()
            host = peer_host(connection)
            session = await self._shell.open(
                script, LineSink(follower.log, follower.stage, follower.tail), what, connection=connection
            )
        except BaseException:
            follower.log.close()
            raise
        session.proceed()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                started = await session.wait_started()
                await session.closed.wait()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                # Killed while it started: it may run already, unknown to anyone. Its pid comes on
                # the channel within moments; stop its group before the cancellation goes on.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._stop_if_started(session))
            session.close()
            follower.log.close()
            if isinstance(exc, TimeoutError):
                raise RuntimeFailure(f"{what} did not start within {START_TIMEOUT_S:g}s") from exc
            raise
        if started is None:
            session.close()
            follower.log.close()
            if session.lost is not None:
                raise RuntimeFailure(
                    f"connection to server {self.server_name} was lost while starting {what}: {describe(session.lost)}"
                )
            reason = f": {follower.tail[-1]}" if follower.tail else ""
            raise RuntimeFailure(
                f"{what} command could not start (exit code {session.exit_code}){reason}", exit_code=session.exit_code
            )
        session.close()
        return started[0], started[1], host

    async def _stop_if_started(self, session: CommandSession) -> None:
        async with asyncio.timeout(START_TIMEOUT_S):
            started = await session.wait_started()
        if started is not None:
            await self.kill_group(*started, 0)

    def follow_release(self, handle: ReleaseHandle, log_path: Path, policy: LogPolicy = DEFAULT_POLICY) -> None:
        """Copies a running release's output into `log_path` again, from where it stopped (after a restart).

        `policy` is the deployment's (LogPolicy.for_spec), so that the log stays masked and capped.
        """
        if handle.pid is None or handle.pid_started_at is None or self._release_of(handle) is not None:
            return
        follower = self._follower(handle.deployment_id, log_path, policy, fresh=False)
        self._releases[handle.deployment_id] = self._follow(
            handle.deployment_id, handle.pid, handle.pid_started_at, follower
        )

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Running while its pid has the same start time and is no zombie; else the exit code it left."""
        if handle.pid is None or handle.pid_started_at is None:
            return ReleaseState(running=False)
        running, exit_code = await self._commands.state(
            handle.pid, handle.pid_started_at, self.run_dir(handle.deployment_id)
        )
        if running:
            return ReleaseState(running=True, pid=handle.pid)
        return ReleaseState(running=False, exit_code=exit_code)

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """SIGTERM to the release's group, SIGKILL after `grace_s`; keeps what resume needs."""
        group = handle.process_group or handle.pid
        if group is None or handle.pid_started_at is None:
            return
        if handle.process_group is not None and handle.process_group != handle.pid:
            raise RuntimeFailure(f"release {handle.deployment_id}: its process group is not its pid")
        await self.kill_group(group, handle.pid_started_at, grace_s)
        release = self._release_of(handle)
        if release is not None:
            # Let the follower copy the last lines and the exit before the caller moves on.
            await _wait_ended(release, EXIT_REPORT_S + LIVENESS_EVERY_S)

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """A process cannot be resumed: makes sure the old one is gone and starts the command again."""
        await self.stop_release(handle, self.kill_grace_s)
        return await self.start_release(spec, log)

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops the release and removes its output files; its directory belongs to the engine."""
        await self.stop_release(handle, grace_s)
        release = self._releases.get(handle.deployment_id)
        if release is not None and release.pid == handle.pid:
            del self._releases[handle.deployment_id]
            await _forget(release)
        if self.state_dir is not None:
            self._offsets_file(handle.deployment_id).unlink(missing_ok=True)
        await self.remove_dir(self.run_dir(handle.deployment_id))

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """The release's last output lines (stdout and stderr) this agent saw; at most 50."""
        release = self._release_of(handle)
        if release is None or lines <= 0:
            return []
        if not (await self._commands.state(release.pid, release.started_at, release.follower.run_dir))[0]:
            # It ended: let the follower copy its last lines first (it polls every quarter second).
            await _wait_ended(release, EXIT_REPORT_S)
        return list(release.follower.tail)[-lines:]

    async def close(self) -> None:
        """Stops following every release (they keep running, writing to their files) and closes channels."""
        releases = list(self._releases.values())
        self._releases.clear()
        for release in releases:
            await _forget(release)
        self._transfer.close()

    # -- internals -----------------------------------------------------------------------------

    def _release_of(self, handle: ReleaseHandle) -> _Release | None:
        release = self._releases.get(handle.deployment_id)
        if release is None or release.pid != handle.pid or release.started_at != handle.pid_started_at:
            return None
        return release

    def _offsets_file(self, deployment_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{deployment_id}.offsets"

    def _follower(
        self, key: str, log_path: Path, policy: LogPolicy, *, fresh: bool, stage: str = RELEASE_STAGE
    ) -> OutputFollower:
        """A follower of the output files of `key` (a deployment id, or `<id>.build` for its build)."""
        offsets = self._offsets_file(key) if self.state_dir is not None else None
        if fresh and offsets is not None:
            offsets.unlink(missing_ok=True)
        return OutputFollower(
            server_name=self.server_name, run_dir=self.run_dir(key), log=DeploymentLog(log_path, policy),
            open_sftp=self._transfer.shared_sftp, discard_sftp=self._transfer.discard_sftp, offsets_file=offsets,
            tail=deque(maxlen=OUTPUT_LINES_KEPT), stage=stage,
        )

    def _follow(self, key: str, pid: int, started_at: float, follower: OutputFollower) -> _Release:
        async def is_running() -> bool:
            return (await self._commands.state(pid, started_at, follower.run_dir))[0]

        task = asyncio.create_task(follower.run(pid, is_running), name=f"remote-output-{key}")
        return _Release(pid=pid, started_at=started_at, follower=follower, task=task)


def _build_key(deployment_id: str) -> str:
    """Where a deployment's build keeps its output files and read offsets (apart from its release's)."""
    return f"{deployment_id}.build"


async def _wait_ended(release: _Release, timeout_s: float) -> None:
    """Wakes the release's follower and gives it `timeout_s` to copy the last output and the exit."""
    release.follower.wake.set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await release.follower.ended.wait()


async def _forget(release: _Release) -> None:
    """Stops following a release (it keeps running): ends its follower."""
    release.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await release.task
