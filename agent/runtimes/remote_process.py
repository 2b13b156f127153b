"""Builds and process releases on a remote server, over SSH.

Every command runs on a session channel of the server's shared connection as

    exec /bin/sh -c 'cd DIR && export K=V ...; echo MARKER $$ STARTTIME; read go; exec CMD'

The command runs only once the agent has recorded its pid (it answers "go" on stdin). sshd
makes the session's shell a session and process-group leader, and `exec` keeps its pid, so the
reported pid is the command's and also its process group. STARTTIME is field 22 of
`/proc/<pid>/stat` (clock ticks since the server booted): with the pid it names the process, and
every later signal is sent only after `/proc/<pid>/stat` still shows that start time. The shell
also exports `DEPLOY_AGENT_GROUP=<pid>:<starttime>`, which every descendant inherits: once the
leader is gone, a live member of group <pid> that carries the tag still proves the group ours.

A release is started differently (`release_script`): the shell starts a small supervisor with
`setsid`, detached, its output going to files in `run_dir(id)`, reports the supervisor's pid and
start time, and exits. The supervisor writes the command's exit code next to its output, and
`OutputFollower` copies the files into the log over SFTP, so a release needs neither the
connection nor one of sshd's few session slots (MaxSessions) while it runs.

Signals always go on a fresh channel as `kill -TERM -PGID` (sshd refuses signal requests for
root logins, and the command's own channel dies with a dropped connection). Output streams into
the deployment's log line by line as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import random
import re
import shlex
import signal
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import asyncssh

from agent.errors import AgentError, RuntimeFailure
from agent.logs import DEFAULT_POLICY, DeploymentLog, LineSplitter, LogPolicy
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.remote_output import LIVENESS_EVERY_S, OutputFollower
from agent.workspace import redact_url

_REMOTE_GIT_OPTIONS = (
    "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never", "-c", "protocol.file.allow=always",
    "-c", "submodule.recurse=false",
)

Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]
OnStart = Callable[[int, float], Awaitable[None]]

BUILD_STAGE = "build"
SOURCE_STAGE = "source"
MARKER = "__deploy_agent_started__"
GROUP_TAG_VARIABLE = "DEPLOY_AGENT_GROUP"
UNKNOWN_EXIT_CODE = -1
# How long a command may take to report its pid once its channel is open.
START_TIMEOUT_S = 10.0
# After the command exits, how long its channel may take to deliver the rest of its output.
DRAIN_S = 2.0
# After a kill, how long the command's channel may take to report the exit.
EXIT_REPORT_S = 2.0
# How long SIGKILLed processes may take to disappear before kill_group gives up.
GONE_TIMEOUT_S = 5.0
# Budget of a short remote query (state, rm, git rev-parse) on a fresh channel.
QUERY_TIMEOUT_S = 30.0
# Budget for stopping a build's processes after its connection dropped.
LOST_CLEANUP_S = 10.0
# Output lines of each release kept for last_output.
OUTPUT_LINES_KEPT = 50
UPLOAD_CHUNK_BYTES = 256 * 1024
UPLOAD_CONCURRENCY = 8
# Ports handed to remote releases without a fixed one: below the usual ephemeral range (32768+),
# so that outgoing connections on the server do not take them meanwhile.
REMOTE_PORTS = range(20000, 32000)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONNECTION_ERRORS = (asyncssh.Error, OSError)

# Proves group $pid ours (its leader with start time $want, or a tagged live member once the
# leader is gone), then SIGTERM to the group, polls every 0.1 s up to $polls times, SIGKILL,
# and confirms. Prints one word: not-ours, gone, killed or survived. Only shell builtins in the
# polling loops; tr and grep only to read a member's tag when the leader has gone.
_KILL_SCRIPT = r"""
read_stat() {
  st_state=; st_pgrp=; st_start=
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  set -- $s
  st_state=$1; st_pgrp=$3; st_start=${20}
}
alive_members() {
  kill -s 0 -- "-$pid" 2>/dev/null || return 1
  for d in /proc/[0-9]*; do
    read_stat "${d#/proc/}" || continue
    [ "$st_pgrp" = "$pid" ] && [ "$st_state" != Z ] && return 0
  done
  return 1
}
tagged_member() {
  kill -s 0 -- "-$pid" 2>/dev/null || return 1
  for d in /proc/[0-9]*; do
    read_stat "${d#/proc/}" || continue
    [ "$st_pgrp" = "$pid" ] && [ "$st_state" != Z ] || continue
    tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qxF "$tag" && return 0
  done
  return 1
}
pause() { sleep 0.1 2>/dev/null || sleep 1; }
if read_stat "$pid"; then
  [ "$st_start" = "$want" ] || { echo not-ours; exit 0; }
else
  tagged_member || { echo gone; exit 0; }
fi
alive_members || { echo gone; exit 0; }
kill -s TERM -- "-$pid" 2>/dev/null
i=0
while [ "$i" -lt "$polls" ] && alive_members; do pause; i=$((i + 1)); done
if alive_members; then
  kill -s KILL -- "-$pid" 2>/dev/null
  i=0
  while [ "$i" -lt 50 ] && alive_members; do pause; i=$((i + 1)); done
fi
if alive_members; then echo survived; else echo killed; fi
"""

# Prints "running" while $pid is the process started at $want and not a zombie, else "gone" and
# the exit code its supervisor left in $run/exit_code, if any.
_STATE_SCRIPT = r"""
if { read -r s < "/proc/$pid/stat"; } 2>/dev/null; then
  s=${s##*) }
  set -- $s
  if [ "${20}" = "$want" ] && [ "$1" != Z ]; then echo running; exit 0; fi
fi
code=
[ -r "$run/exit_code" ] && read -r code < "$run/exit_code"
echo gone $code
"""

# Runs a release as its child and writes its exit code to $run/exit_code when it ends. It
# survives SIGTERM to the group (trap) just long enough to record how the command ended.
_SUPERVISOR_SCRIPT = r"""
run=$1; shift
ticks=$(read -r s < "/proc/$$/stat"; s=${s##*) }; IFS=' '; set -- $s; echo "${20}")
DEPLOY_AGENT_GROUP="$$:$ticks"
export DEPLOY_AGENT_GROUP
unset ticks
trap : TERM INT HUP
"$@" &
child=$!
while :; do
  wait "$child"; code=$?
  kill -0 "$child" 2>/dev/null || break
done
echo "$code" > "$run/exit_code.tmp" && mv -f "$run/exit_code.tmp" "$run/exit_code"
exit "$code"
"""


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
        remote_root: str = ".deploy-agent",
        state_dir: Path | None = None,
    ) -> None:
        self.server_name = server_name
        # Where the read offsets of release output are kept, so a restarted agent resumes them.
        self.state_dir = state_dir
        self.kill_grace_s = kill_grace_s
        self.remote_root = posixpath.normpath(remote_root)
        self._connect = connect
        self._releases: dict[str, _Release] = {}
        # One SFTP session serves every release follower: sshd allows few channels per connection.
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_connection: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()

    def workspace_dir(self, deployment_id: str) -> str:
        """The remote workspace directory of a deployment, under `remote_root`."""
        return f"{self.remote_root}/workspaces/{deployment_id}"

    def run_dir(self, deployment_id: str) -> str:
        """Where a release's output files and exit code live on the server."""
        return f"{self.remote_root}/run/{deployment_id}"

    # -- workspaces ----------------------------------------------------------------------------

    async def upload_workspace(self, local_dir: Path, remote_dir: str, log: DeploymentLog) -> None:
        """Copies `local_dir` into `remote_dir` (created) over SFTP, keeping modes, times and symlinks."""
        log.agent(SOURCE_STAGE, f"uploading {local_dir} to {remote_dir} on server {self.server_name}")
        entries = await asyncio.to_thread(_scan_tree, Path(local_dir))
        await self._clear_owned(remote_dir)
        connection = await self._connection()
        try:
            async with connection.start_sftp_client() as sftp:
                await sftp.makedirs(remote_dir, exist_ok=True)
                directories = [entry for entry in entries if entry.kind == "dir"]
                for entry in directories:
                    await sftp.makedirs(posixpath.join(remote_dir, entry.relative), exist_ok=True)
                limit = asyncio.Semaphore(UPLOAD_CONCURRENCY)

                async def upload(entry: _Entry) -> None:
                    async with limit:
                        await _upload_entry(sftp, entry, posixpath.join(remote_dir, entry.relative))

                # Every upload settles before the SFTP session closes; the first failure is reported.
                results = await asyncio.gather(
                    *(upload(entry) for entry in entries if entry.kind != "dir"), return_exceptions=True
                )
                failure = next((result for result in results if isinstance(result, BaseException)), None)
                if failure is not None:
                    raise failure
                # Directory modes last, deepest first: a read-only directory would refuse its children.
                for entry in sorted(directories, key=lambda entry: entry.relative.count("/"), reverse=True):
                    await _set_attributes(sftp, posixpath.join(remote_dir, entry.relative), entry)
        except (asyncssh.SFTPError, *_CONNECTION_ERRORS) as exc:
            raise RuntimeFailure(
                f"uploading the workspace to server {self.server_name} failed: {_describe(exc)}"
            ) from exc
        skipped = [entry.relative for entry in entries if entry.kind == "other"]
        if skipped:
            log.agent(SOURCE_STAGE, f"skipped {len(skipped)} special file(s), first {skipped[0]}")
        log.agent(SOURCE_STAGE, f"uploaded {sum(e.kind == 'file' for e in entries)} file(s) to {remote_dir}")

    async def clone_workspace(self, url: str, ref: str | None, remote_dir: str, log: DeploymentLog) -> None:
        """Clones `url` into `remote_dir` on the server and checks out `ref`; output goes to stage "source"."""
        shown = redact_url(url)
        log.agent(SOURCE_STAGE, f"cloning {shown} into {remote_dir} on server {self.server_name}")
        # As on the agent's host: never `ext::` (it runs a command), never follow submodules.
        # Local paths stay allowed: on a server they name the login's own repositories.
        git_env = {"GIT_TERMINAL_PROMPT": "0", "GIT_PROTOCOL_FROM_USER": "0"}
        await self._clear_owned(remote_dir)
        # From the login's home, where relative paths (remote_dir, a path url) are meant; git creates
        # the leading directories.
        code = await self._run_to_end(
            ".", git_env, ("git", *_REMOTE_GIT_OPTIONS, "clone", "--", url, remote_dir), log, SOURCE_STAGE
        )
        if code != 0:
            raise RuntimeFailure(f"git clone of {shown} on server {self.server_name} failed with exit code {code}",
                                 exit_code=code)
        if ref is None:
            return
        commit = await self._resolve_ref(remote_dir, ref)
        if commit is None:
            raise RuntimeFailure(f"ref {ref!r} is not a branch, tag or commit of {shown}")
        code = await self._run_to_end(
            remote_dir, git_env, ("git", "checkout", "--quiet", "--detach", commit, "--"), log, SOURCE_STAGE
        )
        if code != 0:
            raise RuntimeFailure(f"git checkout of {ref} on server {self.server_name} failed with exit code {code}",
                                 exit_code=code)
        log.agent(SOURCE_STAGE, f"checked out {ref} at {commit[:12]}")

    async def download_archive(self, remote_dir: str, dest: Path) -> None:
        """Writes a tar of `remote_dir`'s contents (entries `./...`) to the local file `dest`.

        Lets a workspace prepared on the server (a git clone) go into a build container of the
        server's Docker engine without the agent's host ever fetching the source itself.
        """
        connection = await self._connection()
        script = f"cd -- {shlex.quote(remote_dir)} && exec tar -cf - ."
        try:
            async with connection.create_process(
                f"exec /bin/sh -c {shlex.quote(script)}", encoding=None, stdin=asyncssh.DEVNULL
            ) as process:
                target = await asyncio.to_thread(open, dest, "wb")
                try:
                    while chunk := await process.stdout.read(UPLOAD_CHUNK_BYTES):
                        await asyncio.to_thread(target.write, chunk)
                finally:
                    await asyncio.to_thread(target.close)
                error = (await process.stderr.read()).decode(errors="replace").strip()
                await process.wait()
        except _CONNECTION_ERRORS as exc:
            raise RuntimeFailure(
                f"fetching the workspace {remote_dir} from server {self.server_name} failed: {_describe(exc)}"
            ) from exc
        if process.exit_status != 0:
            raise RuntimeFailure(
                f"archiving the workspace {remote_dir} on server {self.server_name} failed "
                f"(exit code {process.exit_status}): {error or 'no output'}"
            )

    async def free_port(self) -> int:
        """A TCP port nothing listens on on the server, from the range the agent hands out."""
        code, output, error = await self._query(
            "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true", "listing listening ports"
        )
        if code != 0:
            raise RuntimeFailure(f"listing the listening ports of server {self.server_name} failed: {error}")
        return pick_free_port(listening_ports(output))

    async def has_dir(self, remote_dir: str) -> bool:
        """Whether `remote_dir` is a directory on the server."""
        sftp = await self._shared_sftp()
        try:
            return bool(await sftp.isdir(remote_dir))
        except (asyncssh.SFTPError, *_CONNECTION_ERRORS) as exc:
            self._discard_sftp(sftp)
            raise RuntimeFailure(f"looking for {remote_dir} on server {self.server_name} failed: {_describe(exc)}") from exc

    async def remove_dir(self, remote_dir: str) -> None:
        """Deletes a directory under `remote_root` on the server; a missing one is fine."""
        path = self._owned_path(remote_dir)
        if path is None:
            raise RuntimeFailure(f"refusing to remove {remote_dir!r} on server {self.server_name}: "
                                 f"not under {self.remote_root!r}")
        script = f"chmod -R u+rwX -- {shlex.quote(path)} 2>/dev/null; rm -rf -- {shlex.quote(path)}"
        code, _, error = await self._query(script, f"removing {path}")
        if code != 0:
            raise RuntimeFailure(f"removing {path} on server {self.server_name} failed: {error or code}")

    # -- builds --------------------------------------------------------------------------------

    async def run_build(self, job: RemoteBuildJob, log: DeploymentLog, on_start: OnStart) -> tuple[int, bool]:
        """Runs the build command in its workspace; returns (exit code, timed out).

        `on_start(pid, starttime)` is awaited once the remote pid is known; a timeout kills the group.
        """
        log.agent(BUILD_STAGE, f"running on server {self.server_name}: {_display(job.command)}")
        script = launch_script(job.remote_dir, job.env, job.command, create_dir=True)
        session = await self._open(script, _LineSink(log, BUILD_STAGE), "the build")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.timeout_s
        started: tuple[int, float] | None = None
        timed_out = False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    started = await session.wait_started()
                    if started is not None:
                        await on_start(*started)
                    session.proceed()
                    await session.exited.wait()
            except TimeoutError:
                timed_out = True
        except BaseException:
            # Cancelled (the deployment was killed) or on_start failed: nothing of it may keep running.
            if started is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._cleanup_group(started, log, BUILD_STAGE))
            session.close()
            raise
        if session.lost is not None:
            await self._raise_lost(session, started, log)
        if timed_out:
            log.agent(BUILD_STAGE, f"build timed out after {job.timeout_s:g}s; stopping")
            if started is not None:
                await self.kill_group(*started, self.kill_grace_s)
            await session.wait_closed(EXIT_REPORT_S)
            code = session.exit_code if session.exit_code is not None else UNKNOWN_EXIT_CODE
            session.close()
            return code, True
        await session.wait_closed(DRAIN_S)
        session.close()
        if started is not None:
            # A container ends with its build; here, whatever the build left behind in its group goes now.
            await self._cleanup_group(started, log, BUILD_STAGE)
        code = session.exit_code if session.exit_code is not None else UNKNOWN_EXIT_CODE
        log.agent(BUILD_STAGE, f"build exited with code {code}")
        return code, False

    async def kill_group(self, pid: int, started_at: float, grace_s: float) -> bool:
        """SIGTERM to the group of `pid`, SIGKILL after `grace_s`; True if it was ours and is now gone.

        Nothing is signalled unless `pid` still has start time `started_at` (or, its leader gone, a
        live member of its group carries the tag of that start). Runs on a fresh channel.
        """
        if pid <= 1 or not float(started_at).is_integer():
            return False
        polls = max(0, int(grace_s * 10 + 0.999))
        script = (
            f"pid={int(pid)}; want={int(started_at)}; polls={polls}; "
            f"tag={GROUP_TAG_VARIABLE}={int(pid)}:{int(started_at)}\n{_KILL_SCRIPT}"
        )
        _, output, error = await self._query(
            script, f"stopping process group {pid}", timeout_s=grace_s + GONE_TIMEOUT_S + QUERY_TIMEOUT_S
        )
        verdict = output.strip()
        if verdict == "killed":
            return True
        if verdict in ("not-ours", "gone"):
            return False
        if verdict == "survived":
            raise RuntimeFailure(f"processes of group {pid} on server {self.server_name} survived SIGKILL")
        raise RuntimeFailure(f"stopping process group {pid} on server {self.server_name} failed: {error or verdict}")

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
        try:
            connection = await self._connection()
            host = _peer_host(connection)
            session = await self._open(
                script, _LineSink(follower.log, RELEASE_STAGE, follower.tail), "the release", connection=connection
            )
        except BaseException:
            follower.log.close()
            raise
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                started = await session.wait_started()
                # The launching shell exits right after the report; its channel closes with it.
                await session.closed.wait()
        except BaseException as exc:
            session.close()
            follower.log.close()
            if isinstance(exc, TimeoutError):
                raise RuntimeFailure(f"the release did not start within {START_TIMEOUT_S:g}s") from exc
            raise
        if started is None:
            session.close()
            follower.log.close()
            if session.lost is not None:
                raise RuntimeFailure(
                    f"connection to server {self.server_name} was lost while starting the release: "
                    f"{_describe(session.lost)}"
                )
            reason = f": {follower.tail[-1]}" if follower.tail else ""
            raise RuntimeFailure(
                f"the release command could not start (exit code {session.exit_code}){reason}",
                exit_code=session.exit_code,
            )
        pid, started_at = started
        session.close()
        self._releases[spec.deployment_id] = self._follow(spec.deployment_id, pid, started_at, follower)
        log.agent(RELEASE_STAGE, f"started process {pid} on server {self.server_name}: {_display(spec.command)}")
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
        running, exit_code = await self._state(handle.pid, handle.pid_started_at, self.run_dir(handle.deployment_id))
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
            release.follower.wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_REPORT_S + LIVENESS_EVERY_S):
                    await release.follower.ended.wait()

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
        if not (await self._state(release.pid, release.started_at, release.follower.run_dir))[0]:
            # It ended: let the follower copy its last lines first (it polls every quarter second).
            release.follower.wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_REPORT_S):
                    await release.follower.ended.wait()
        return list(release.follower.tail)[-lines:]

    async def close(self) -> None:
        """Stops following every release (they keep running, writing to their files) and closes channels."""
        releases = list(self._releases.values())
        self._releases.clear()
        for release in releases:
            await _forget(release)
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.exit()
            self._sftp = None

    # -- internals -----------------------------------------------------------------------------

    async def _connection(self) -> asyncssh.SSHClientConnection:
        try:
            return await self._connect()
        except AgentError:
            raise
        except _CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"cannot reach server {self.server_name}: {_describe(exc)}") from exc

    async def _open(
        self, script: str, sink: "_LineSink", what: str, *, connection: asyncssh.SSHClientConnection | None = None
    ) -> "_CommandSession":
        """Opens a session channel running `script`; the command waits for `proceed()` to exec."""
        connection = connection or await self._connection()
        try:
            _, session = await connection.create_session(lambda: _CommandSession(sink), script, encoding=None)
        except _CONNECTION_ERRORS as exc:
            raise RuntimeFailure(
                f"cannot start {what} on server {self.server_name}: {_describe(exc)}"
            ) from exc
        return session

    async def _query(self, script: str, what: str, *, timeout_s: float = QUERY_TIMEOUT_S) -> tuple[int, str, str]:
        """Runs a short POSIX sh script on a fresh channel; returns (exit status, stdout, stderr)."""
        connection = await self._connection()
        try:
            result = await connection.run(
                f"exec /bin/sh -c {shlex.quote(script)}", check=False, timeout=timeout_s, encoding="utf-8",
                errors="replace", stdin=asyncssh.DEVNULL,
            )
        except asyncssh.TimeoutError as exc:
            raise RuntimeFailure(f"{what} on server {self.server_name} took more than {timeout_s:g}s") from exc
        except _CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"{what} on server {self.server_name} failed: {_describe(exc)}") from exc
        code = result.exit_status if result.exit_status is not None else UNKNOWN_EXIT_CODE
        return code, str(result.stdout or ""), str(result.stderr or "").strip()

    async def _run_to_end(
        self, directory: str, env: Mapping[str, str], command: tuple[str, ...], log: DeploymentLog, stage: str
    ) -> int:
        """Runs a command to its end with output in `log`; a cancel or lost connection stops its group."""
        session = await self._open(launch_script(directory, env, command),
                                   _LineSink(log, stage), "git")
        started: tuple[int, float] | None = None
        try:
            started = await session.wait_started()
            session.proceed()
            await session.exited.wait()
        except BaseException:
            if started is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._cleanup_group(started, log, stage))
            session.close()
            raise
        if session.lost is not None:
            await self._raise_lost(session, started, log, stage, "git")
        await session.wait_closed(DRAIN_S)
        session.close()
        return session.exit_code if session.exit_code is not None else UNKNOWN_EXIT_CODE

    async def _resolve_ref(self, repository: str, ref: str) -> str | None:
        """The commit a branch, tag or sha names; branches first, as `git clone --branch` does."""
        for candidate in (f"refs/remotes/origin/{ref}", ref):
            script = (
                f"cd -- {shlex.quote(repository)} && git rev-parse --verify --quiet --end-of-options "
                f"{shlex.quote(candidate + '^{commit}')}"
            )
            code, output, _ = await self._query(script, "resolving a git ref")
            if code == 0 and output.strip():
                return output.strip()
        return None

    async def _state(self, pid: int, started_at: float, run_dir: str) -> tuple[bool, int | None]:
        """(running, exit code once it has ended and its supervisor recorded one)."""
        if not float(started_at).is_integer():
            return False, None
        script = f"pid={int(pid)}; want={int(started_at)}; run={shlex.quote(run_dir)}\n{_STATE_SCRIPT}"
        _, output, error = await self._query(script, f"checking process {pid}")
        verdict = output.split()
        if not verdict or verdict[0] not in ("running", "gone"):
            raise RuntimeFailure(f"checking process {pid} on server {self.server_name} failed: {error or output}")
        code = int(verdict[1]) if len(verdict) > 1 and verdict[1].lstrip("-").isdigit() else None
        return verdict[0] == "running", code

    async def _shared_sftp(self) -> asyncssh.SFTPClient:
        """The SFTP session on the current connection, opened again after the connection changed."""
        async with self._sftp_lock:
            connection = await self._connection()
            if self._sftp is None or self._sftp_connection is not connection or connection.is_closed():
                if self._sftp is not None:
                    with contextlib.suppress(Exception):
                        self._sftp.exit()
                self._sftp = None
                try:
                    self._sftp = await connection.start_sftp_client()
                except (asyncssh.SFTPError, *_CONNECTION_ERRORS) as exc:
                    raise RuntimeFailure(
                        f"cannot open an SFTP session on server {self.server_name}: {_describe(exc)}"
                    ) from exc
                self._sftp_connection = connection
            return self._sftp

    def _discard_sftp(self, client: asyncssh.SFTPClient) -> None:
        if self._sftp is client:
            with contextlib.suppress(Exception):
                client.exit()
            self._sftp = None

    def _offsets_file(self, deployment_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{deployment_id}.offsets"

    def _follower(self, deployment_id: str, log_path: Path, policy: LogPolicy, *, fresh: bool) -> OutputFollower:
        offsets = self._offsets_file(deployment_id) if self.state_dir is not None else None
        if fresh and offsets is not None:
            offsets.unlink(missing_ok=True)
        return OutputFollower(
            server_name=self.server_name, run_dir=self.run_dir(deployment_id), log=DeploymentLog(log_path, policy),
            open_sftp=self._shared_sftp, discard_sftp=self._discard_sftp, offsets_file=offsets,
            tail=deque(maxlen=OUTPUT_LINES_KEPT),
        )

    def _follow(
        self, deployment_id: str, pid: int, started_at: float, follower: OutputFollower
    ) -> _Release:
        async def is_running() -> bool:
            return (await self._state(pid, started_at, follower.run_dir))[0]

        task = asyncio.create_task(follower.run(pid, is_running), name=f"remote-release-{deployment_id}")
        return _Release(pid=pid, started_at=started_at, follower=follower, task=task)

    async def _cleanup_group(self, started: tuple[int, float], log: DeploymentLog, stage: str) -> None:
        """Ends whatever is left of a command's group, within a budget; failures only go to the log."""
        try:
            async with asyncio.timeout(LOST_CLEANUP_S + self.kill_grace_s):
                if await self.kill_group(*started, self.kill_grace_s):
                    log.agent(stage, f"stopped the processes left in group {started[0]}")
        except (AgentError, TimeoutError) as exc:
            log.agent(stage, f"could not stop process group {started[0]} on server {self.server_name}: {exc}")

    async def _raise_lost(
        self, session: "_CommandSession", started: tuple[int, float] | None, log: DeploymentLog,
        stage: str = BUILD_STAGE, what: str = "the build",
    ) -> None:
        session.close()
        reason = _describe(session.lost) if session.lost is not None else "connection closed"
        aftermath = ""
        if started is not None:
            # The dropped channel does not end the remote tree: try a new connection to stop it.
            try:
                async with asyncio.timeout(LOST_CLEANUP_S + self.kill_grace_s):
                    await self.kill_group(*started, self.kill_grace_s)
                aftermath = f"; its processes (group {started[0]}) were stopped"
            except (AgentError, TimeoutError):
                aftermath = f"; its processes (group {started[0]}, start time {started[1]:g}) may still run"
        message = f"connection to server {self.server_name} was lost during {what}: {reason}{aftermath}"
        log.agent(stage, message)
        raise RuntimeFailure(message)

    def _release_of(self, handle: ReleaseHandle) -> _Release | None:
        release = self._releases.get(handle.deployment_id)
        if release is None or release.pid != handle.pid or release.started_at != handle.pid_started_at:
            return None
        return release

    def _owned_path(self, remote_dir: str) -> str | None:
        """`remote_dir` normalised, if it lies strictly under `remote_root`; the agent deletes nothing else."""
        path = posixpath.normpath(remote_dir)
        if ".." in remote_dir.split("/") or not path.startswith(self.remote_root.rstrip("/") + "/"):
            return None
        return path

    async def _clear_owned(self, remote_dir: str) -> None:
        """Empties a workspace about to be filled, so it holds its source and nothing older.

        Only under `remote_root`: a directory elsewhere is filled as it is.
        """
        if self._owned_path(remote_dir) is not None:
            await self.remove_dir(remote_dir)


# -- the command channel ---------------------------------------------------------------------


class _LineSink:
    """Where a command's output lines go: the log, and optionally a bounded tail."""

    def __init__(self, log: DeploymentLog, stage: str, tail: deque[str] | None = None) -> None:
        self.log = log
        self.stage = stage
        self.tail = tail

    def write(self, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        self.log.write_lines(self.stage, stream, lines)
        if self.tail is not None:
            # The tail ends up in error messages: masked like the log.
            self.tail.extend(self.log.mask(line) for line in lines)


class _CommandSession(asyncssh.SSHClientSession[bytes]):
    """One remote command: finds the pid marker, streams lines, records exit and loss."""

    channel: asyncssh.SSHClientChannel[bytes]

    def __init__(self, sink: _LineSink) -> None:
        self._sink = sink
        self._stdout = LineSplitter()
        self._stderr = LineSplitter()
        self._started: asyncio.Future[tuple[int, float] | None] = asyncio.get_running_loop().create_future()
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()
        self.exit_code: int | None = None
        self.lost: BaseException | None = None
        self._closing = False
        self._proceeded = False

    async def wait_started(self) -> tuple[int, float] | None:
        """(pid, start time) once reported; None when the command ended or the channel closed first."""
        return await asyncio.shield(self._started)

    async def wait_closed(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self.closed.wait()
        except TimeoutError:
            return False
        return True

    def proceed(self) -> None:
        """Lets the command run (it waits after reporting its pid), then closes its stdin."""
        if not self.closed.is_set() and not self._proceeded:
            self._proceeded = True
            with contextlib.suppress(OSError, asyncssh.Error):
                self.channel.write(b"go\n")
                self.channel.write_eof()

    def close(self) -> None:
        if not self.closed.is_set():
            self._closing = True
            self.channel.close()

    def connection_made(self, chan: asyncssh.SSHChannel[bytes]) -> None:  # type: ignore[override]
        self.channel = chan  # type: ignore[assignment]

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._sink.write("stderr", self._stderr.feed(data))
            return
        lines = self._stdout.feed(data)
        if not self._started.done():
            lines = self._take_marker(lines)
        self._sink.write("stdout", lines)

    # Output may still arrive after the exit report: lines are flushed only when the channel closes.
    def exit_status_received(self, status: int) -> None:
        self.exit_code = status
        self.exited.set()

    def exit_signal_received(self, signal_name: str, core_dumped: bool, msg: str, lang: str) -> None:
        try:
            self.exit_code = 128 + signal.Signals[f"SIG{signal_name}"].value
        except KeyError:
            self.exit_code = UNKNOWN_EXIT_CODE
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        # sshd always reports how a command ended before it closes the channel: without that
        # report (and without our own close), the connection went away under the command.
        if self.exit_code is None and not self._closing:
            self.lost = exc or asyncssh.ConnectionLost("connection closed")
        if not self._started.done():
            # It ended without reporting a pid (cd failed, no /bin/sh, ...).
            self._started.set_result(None)
        self.exited.set()
        self.closed.set()

    def _take_marker(self, lines: list[str]) -> list[str]:
        for index, line in enumerate(lines):
            fields = line.split()
            if len(fields) == 3 and fields[0] == MARKER and fields[1].isdigit() and fields[2].isdigit():
                self._started.set_result((int(fields[1]), float(fields[2])))
                return lines[:index] + lines[index + 1:]
        return lines

    def _flush(self) -> None:
        stdout = self._stdout.flush()
        if not self._started.done():
            stdout = self._take_marker(stdout)
        self._sink.write("stdout", stdout)
        self._sink.write("stderr", self._stderr.flush())


# -- command lines ---------------------------------------------------------------------------


def launch_script(
    directory: str,
    env: Mapping[str, str],
    command: tuple[str, ...] | list[str] | str,
    *,
    create_dir: bool = False,
) -> str:
    """The remote command line: cd, env, report `MARKER pid starttime`, wait for "go", exec the command.

    Runs under /bin/sh whatever the login shell is; `exec` keeps the session leader's pid.
    """
    _check_env(env)
    target = _command_line(command)
    quoted_dir = shlex.quote(directory)
    lines = ["unset CDPATH"]
    if create_dir:
        lines.append(f"mkdir -p -- {quoted_dir} || exit")
    lines += [
        f"cd -- {quoted_dir} || exit",
        # Read before the command's env is exported: an IFS in it must not change the splitting.
        '{ read -r _da_stat < "/proc/$$/stat"; } || exit',
        '_da_stat=${_da_stat##*) }',
        "set -- $_da_stat",
        f'{GROUP_TAG_VARIABLE}="$$:${{20}}"',
        f"export {GROUP_TAG_VARIABLE}",
        f'_da_marker="{MARKER} $$ ${{20}}"',
        "unset _da_stat",
        "set --",
    ]
    if env:
        lines.append("export " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in env.items()))
    # The agent records the pid (on_start) before it lets the command run; EOF instead (the
    # agent gone) ends the shell before it ever runs the command.
    lines += ['echo "$_da_marker"', "unset _da_marker", "read -r _da_go || exit 125", "unset _da_go",
              f"exec {target}"]
    return f"exec /bin/sh -c {shlex.quote(chr(10).join(lines))}"


def release_script(
    directory: str, env: Mapping[str, str], command: tuple[str, ...] | list[str] | str, run_dir: str
) -> str:
    """The remote command line of a release: start the supervisor detached, report `MARKER pid starttime`.

    `setsid` makes the supervisor a session and group leader of its own, and its output goes to
    files in `run_dir`: once the launching shell has exited, sshd holds nothing of the release
    (not even one of its few session slots), and the release outlives the connection.
    """
    _check_env(env)
    target = _command_line(command)
    run = shlex.quote(run_dir)
    lines = [
        "unset CDPATH",
        "command -v setsid >/dev/null 2>&1 || { echo 'setsid is not installed on the server' >&2; exit 127; }",
        # Prepared from the login's home, where relative run directories are meant.
        f"mkdir -p -- {run} || exit",
        f"rm -f -- {run}/exit_code",
        f": > {run}/stdout && : > {run}/stderr || exit",
        f"_da_run=$(cd -- {run} && pwd) || exit",
        f"cd -- {shlex.quote(directory)} || exit",
    ]
    if env:
        lines.append("export " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in env.items()))
    lines += [
        f'setsid /bin/sh -c {shlex.quote(_SUPERVISOR_SCRIPT)} deploy-agent-supervisor "$_da_run" {target}'
        ' </dev/null >>"$_da_run/stdout" 2>>"$_da_run/stderr" &',
        "_da_pid=$!",
        # The child may have ended already; unreaped, its stat is still there.
        '{ read -r _da_stat < "/proc/$_da_pid/stat"; } || exit 126',
        "_da_stat=${_da_stat##*) }",
        "IFS=' '",
        "set -- $_da_stat",
        f'echo "{MARKER} $_da_pid ${{20}}"',
    ]
    return f"exec /bin/sh -c {shlex.quote(chr(10).join(lines))}"


def _check_env(env: Mapping[str, str]) -> None:
    for name in env:
        if not _ENV_NAME.match(name):
            raise RuntimeFailure(f"environment variable name {name!r} cannot be passed to a remote command")


def _command_line(command: tuple[str, ...] | list[str] | str) -> str:
    if isinstance(command, str):
        if not command.strip():
            raise RuntimeFailure("empty command")
        return f"/bin/sh -c {shlex.quote(command)}"
    if not command:
        raise RuntimeFailure("empty command")
    return shlex.join(str(part) for part in command)


def listening_ports(proc_net_tcp: str) -> set[int]:
    """The local ports in LISTEN state (0A) of /proc/net/tcp and tcp6 text."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            with contextlib.suppress(ValueError):
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def pick_free_port(taken: set[int]) -> int:
    """A random port of REMOTE_PORTS that is not in `taken`."""
    for port in random.sample(REMOTE_PORTS, 64):
        if port not in taken:
            return port
    free = [port for port in REMOTE_PORTS if port not in taken]
    if not free:
        raise RuntimeFailure(f"no free port between {REMOTE_PORTS.start} and {REMOTE_PORTS.stop - 1} on the server")
    return random.choice(free)


def _display(command: tuple[str, ...] | list[str] | str) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    text = str(exc)
    return text or type(exc).__name__


def _peer_host(connection: asyncssh.SSHClientConnection) -> str:
    peer = connection.get_extra_info("peername")
    return str(peer[0]) if peer else "127.0.0.1"


async def _forget(release: _Release) -> None:
    """Stops following a release (it keeps running): ends its follower."""
    release.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await release.task


# -- uploads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One thing to upload, relative to the workspace root."""

    relative: str
    kind: str  # "dir", "file", "symlink" or "other"
    local: Path
    mode: int
    atime: float
    mtime: float
    target: str | None = None


def _scan_tree(root: Path) -> list[_Entry]:
    """Everything under `root` without following symlinks, directories before their contents."""
    if not root.is_dir():
        raise RuntimeFailure(f"workspace {root} is not a directory on the agent's host")
    entries: list[_Entry] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            info = path.lstat()
            relative = path.relative_to(root).as_posix()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                entries.append(_Entry(relative, "symlink", path, mode, info.st_atime, info.st_mtime,
                                      os.readlink(path)))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(_Entry(relative, "dir", path, mode, info.st_atime, info.st_mtime))
            elif stat.S_ISREG(info.st_mode):
                entries.append(_Entry(relative, "file", path, mode, info.st_atime, info.st_mtime))
            else:
                entries.append(_Entry(relative, "other", path, mode, info.st_atime, info.st_mtime))
        # os.walk lists symlinks to directories among dirnames but does not descend into them.
    return entries


async def _upload_entry(sftp: asyncssh.SFTPClient, entry: _Entry, remote_path: str) -> None:
    if entry.kind == "symlink":
        assert entry.target is not None
        if await sftp.exists(remote_path) or await sftp.islink(remote_path):
            await sftp.remove(remote_path)
        await sftp.symlink(entry.target, remote_path)
    elif entry.kind == "file":
        local = await asyncio.to_thread(open, entry.local, "rb")
        try:
            async with sftp.open(remote_path, "wb") as remote:
                offset = 0
                while True:
                    chunk = await asyncio.to_thread(local.read, UPLOAD_CHUNK_BYTES)
                    if not chunk:
                        break
                    await remote.write(chunk, offset)
                    offset += len(chunk)
        finally:
            await asyncio.to_thread(local.close)
        await _set_attributes(sftp, remote_path, entry)


async def _set_attributes(sftp: asyncssh.SFTPClient, remote_path: str, entry: _Entry) -> None:
    await sftp.setstat(remote_path, asyncssh.SFTPAttrs(permissions=entry.mode, atime=int(entry.atime),
                                                       mtime=int(entry.mtime)))
