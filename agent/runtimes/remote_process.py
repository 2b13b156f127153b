"""Processes on a remote server over SSH: builds and process releases.

`echo $$ <start>; exec CMD` reports the remote PID, which is also its process
group (sshd makes each session's shell a session leader), and its start time
from /proc, so that a kill never reaches a PID that was reused. Kills go over a
fresh channel: sshd refuses signal requests for root logins, and a dropped
connection would leave the tree running.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import asyncssh

from agent.errors import AgentError, RuntimeFailure
from agent.logs import DeploymentLog, LineSplitter
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState

Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]
OnStart = Callable[[int, float], Awaitable[None]]
READ_BYTES = 64 * 1024
KEPT_LINES = 50
HEADER_TIMEOUT_S = 30.0
CONNECTION_ERRORS = (asyncssh.Error, OSError, asyncio.IncompleteReadError, BrokenPipeError)


@dataclass(frozen=True)
class RemoteBuildJob:
    deployment_id: str
    command: tuple[str, ...] | str
    env: Mapping[str, str]
    timeout_s: float
    remote_dir: str


@dataclass
class _Release:
    """A remote release the agent watches: its output task and what it last said."""

    task: asyncio.Task[tuple[int, bool]] | None = None
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=KEPT_LINES))
    exit_code: int | None = None
    ended: bool = False


class RemoteProcessRuntime:
    """Runs builds and process releases on one server through its shared SSH connection."""

    def __init__(
        self, server_name: str, connect: Connect, *, kill_grace_s: float = 10.0, remote_root: str = ".deploy-agent"
    ) -> None:
        self.server_name = server_name
        self._connect = connect
        self._kill_grace_s = kill_grace_s
        self._remote_root = remote_root
        self._releases: dict[str, _Release] = {}

    # --- workspaces --------------------------------------------------------------------------

    async def upload_workspace(self, local_dir: Path, remote_dir: str, log: DeploymentLog) -> None:
        """Copies the workspace's content into `remote_dir` over SFTP."""
        log.agent("source", f"copying the workspace to {self.server_name}:{remote_dir} over SFTP")
        conn = await self._connect()
        try:
            await conn.run(f"rm -rf -- {shlex.quote(remote_dir)} && mkdir -p -- {shlex.quote(remote_dir)}", check=True)
            async with conn.start_sftp_client() as sftp:
                entries = sorted(str(path) for path in Path(local_dir).iterdir()) if Path(local_dir).is_dir() else []
                if entries:
                    await sftp.put(entries, remote_dir, recurse=True, preserve=True)
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"copying the workspace to server {self.server_name} failed: {exc}") from None

    async def clone_workspace(self, url: str, ref: str | None, remote_dir: str, log: DeploymentLog) -> None:
        """Clones a git repository on the server into `remote_dir` and checks out `ref`."""
        directory = shlex.quote(remote_dir)
        script = (
            f"export GIT_TERMINAL_PROMPT=0; rm -rf -- {directory} && mkdir -p -- {directory} && "
            f"git clone -- {shlex.quote(url)} {directory}"
        )
        if ref:
            script += f" && cd -- {directory} && git checkout --detach {shlex.quote(ref)} --"
        log.agent("source", f"cloning {url} on {self.server_name}")
        exit_code, _ = await self._stream(f"exec /bin/sh -c {shlex.quote(script)}", log, "source", None, None)
        if exit_code != 0:
            raise RuntimeFailure(f"git clone of {url} on server {self.server_name} failed with exit code {exit_code}")

    async def remove_dir(self, remote_dir: str) -> None:
        conn = await self._connect()
        with contextlib.suppress(*CONNECTION_ERRORS):
            await conn.run(f"rm -rf -- {shlex.quote(remote_dir)}")

    # --- builds ------------------------------------------------------------------------------

    async def run_build(self, job: RemoteBuildJob, log: DeploymentLog, on_start: OnStart) -> tuple[int, bool]:
        """Runs the build command in `remote_dir`; returns (exit code, timed out)."""
        log.agent("build", f"running the build on {self.server_name} in {job.remote_dir}")
        script = _script(job.remote_dir, job.env, job.command)
        exit_code, timed_out = await self._stream(script, log, "build", on_start, job.timeout_s)
        log.agent("build", f"remote build exited with code {exit_code}")
        return exit_code, timed_out

    async def kill_group(self, pid: int, started_at: float, grace_s: float) -> bool:
        """SIGTERM to the remote group, SIGKILL after the grace; only if the PID's start time matches."""
        polls = max(1, int(grace_s * 10))
        script = f"""
p={int(pid)}; t={int(started_at)}
[ -r /proc/$p/stat ] || exit 3
[ "$(cut -d' ' -f22 /proc/$p/stat)" = "$t" ] || exit 4
# A member still counts while it is not a zombie (a zombie is dead, waiting for its parent).
alive() {{ awk -v g=$p '$5 == g && $3 != "Z" {{ found = 1 }} END {{ exit !found }}' /proc/[0-9]*/stat 2>/dev/null; }}
kill -TERM -$p 2>/dev/null
i=0
while alive; do
  [ $i -eq {polls} ] && kill -KILL -$p 2>/dev/null
  [ $i -gt {polls + 100} ] && exit 5
  sleep 0.1; i=$((i+1))
done
exit 0
"""
        conn = await self._connect()
        try:
            # A fresh channel: never a signal request on the channel that runs the process.
            result = await conn.run(f"/bin/sh -c {shlex.quote(script)}")
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"could not signal process {pid} on server {self.server_name}: {exc}") from None
        if result.exit_status == 5:
            raise RuntimeFailure(f"process group {pid} on server {self.server_name} survived SIGKILL")
        return result.exit_status == 0

    # --- releases ----------------------------------------------------------------------------

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the release command on the server; its output streams into the deployment's log."""
        if spec.command is None:
            raise RuntimeFailure("a process release needs run.command")
        release = _Release()
        self._releases[spec.deployment_id] = release
        started: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()

        async def on_start(pid: int, started_at: float) -> None:
            if not started.done():
                started.set_result((pid, started_at))

        release_log = DeploymentLog(spec.log_path)
        script = _script(str(spec.workdir or "."), spec.env, spec.command)
        release.task = asyncio.create_task(self._watch(release, script, release_log, on_start))
        waiting = asyncio.ensure_future(started)
        done, _ = await asyncio.wait({waiting, release.task}, timeout=HEADER_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            if release.task.done():
                release.task.result()  # raises what went wrong
                raise RuntimeFailure(f"the release on server {self.server_name} exited at once")
            release.task.cancel()
            raise RuntimeFailure(f"the release on server {self.server_name} did not start within {HEADER_TIMEOUT_S:g}s")
        pid, started_at = waiting.result()
        conn = await self._connect()
        peer = conn.get_extra_info("peername")
        log.agent(RELEASE_STAGE, f"started process {pid} on {self.server_name}")
        return ReleaseHandle(
            runtime="process", deployment_id=spec.deployment_id, application=spec.application,
            host=str(peer[0]) if peer else "127.0.0.1", ports={p: p for p in spec.ports},
            pid=pid, pid_started_at=started_at, process_group=pid,
        )

    async def _watch(self, release: _Release, script: str, log: DeploymentLog, on_start: OnStart) -> tuple[int, bool]:
        try:
            result = await self._stream(script, log, RELEASE_STAGE, on_start, None, release.last_lines)
            release.exit_code = result[0]
            return result
        finally:
            release.ended = True
            log.close()

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        release = self._releases.get(handle.deployment_id)
        if release is not None and release.ended:
            return ReleaseState(running=False, exit_code=release.exit_code)
        if handle.pid is None:
            return ReleaseState(running=False)
        script = (
            f"s=$(cat /proc/{int(handle.pid)}/stat 2>/dev/null) || exit 1; "
            f"[ \"$(echo \"$s\" | cut -d' ' -f22)\" = \"{int(handle.pid_started_at or 0)}\" ] || exit 1; "
            f"[ \"$(echo \"$s\" | cut -d' ' -f3)\" != Z ]"
        )
        conn = await self._connect()
        try:
            result = await conn.run(f"/bin/sh -c {shlex.quote(script)}")
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"could not check the release on server {self.server_name}: {exc}") from None
        running = result.exit_status == 0
        return ReleaseState(running=running, pid=handle.pid if running else None)

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        if handle.pid is not None:
            await self.kill_group(handle.pid, handle.pid_started_at or 0, grace_s)
        release = self._releases.get(handle.deployment_id)
        if release is not None and release.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, AgentError):
                await asyncio.wait_for(asyncio.shield(release.task), timeout=5)

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        await self.stop_release(handle, self._kill_grace_s)
        return await self.start_release(spec, log)

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        await self.stop_release(handle, grace_s)
        release = self._releases.pop(handle.deployment_id, None)
        if release is not None and release.task is not None and not release.task.done():
            release.task.cancel()

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        release = self._releases.get(handle.deployment_id)
        return list(release.last_lines)[-lines:] if release is not None and lines > 0 else []

    # --- streaming ---------------------------------------------------------------------------

    async def _stream(
        self,
        script: str,
        log: DeploymentLog,
        stage: str,
        on_start: OnStart | None,
        timeout_s: float | None,
        last_lines: deque[str] | None = None,
    ) -> tuple[int, bool]:
        """Runs `script` on a channel, streams its lines into the log; returns (exit code, timed out)."""
        conn = await self._connect()
        try:
            process = await conn.create_process(script, encoding=None)
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"could not start a command on server {self.server_name}: {exc}") from None
        pid_info: list[tuple[int, float]] = []
        try:
            if on_start is not None:
                header = await process.stdout.readline()
                parts = header.decode(errors="replace").split()
                if len(parts) == 2 and parts[0].isdigit():
                    pid_info.append((int(parts[0]), float(parts[1])))
                    await on_start(*pid_info[0])
            pumps = asyncio.gather(
                _pump(process.stdout, log, stage, "stdout", last_lines),
                _pump(process.stderr, log, stage, "stderr", last_lines),
            )
            timed_out = False
            try:
                await asyncio.wait_for(asyncio.shield(pumps), timeout=timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
                log.agent(stage, f"timed out after {timeout_s:g}s; stopping the remote process group")
                if pid_info:
                    await self.kill_group(pid_info[0][0], pid_info[0][1], self._kill_grace_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pumps, timeout=self._kill_grace_s + 5)
            await process.wait_closed()
        except asyncio.CancelledError:
            if pid_info:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.kill_group(pid_info[0][0], pid_info[0][1], self._kill_grace_s))
            process.close()
            raise
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"the connection to server {self.server_name} was lost: {exc}") from None
        if process.exit_status is not None:
            return process.exit_status, timed_out
        if process.exit_signal is not None:
            return 128 + _signal_number(process.exit_signal[0]), timed_out
        raise RuntimeFailure(
            f"the connection to server {self.server_name} was lost while the command ran; its exit is unknown"
        )


async def _pump(
    stream: asyncssh.SSHReader, log: DeploymentLog, stage: str, name: str, last_lines: deque[str] | None
) -> None:
    splitter = LineSplitter()
    while True:
        chunk = await stream.read(READ_BYTES)
        if not chunk:
            break
        lines = splitter.feed(chunk)
        log.write_lines(stage, name, lines)
        if last_lines is not None:
            last_lines.extend(lines)
    rest = splitter.flush()
    log.write_lines(stage, name, rest)
    if last_lines is not None:
        last_lines.extend(rest)


def _script(directory: str, env: Mapping[str, str], command: tuple[str, ...] | str) -> str:
    """`cd DIR; export ...; echo $$ <start ticks>; exec CMD`, every value shell-quoted."""
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in env.items())
    if isinstance(command, str):
        run = f"/bin/sh -c {shlex.quote(command)}"
    else:
        run = " ".join(shlex.quote(part) for part in command)
    quoted = shlex.quote(directory)
    return (
        f"mkdir -p -- {quoted} && cd -- {quoted} || exit 126; {exports}"
        f"echo $$ $(cut -d' ' -f22 /proc/$$/stat); exec {run}"
    )


def _signal_number(name: str) -> int:
    import signal

    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return 0
