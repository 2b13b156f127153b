"""Releases that run as host processes, tracked by (pid, create time) so they outlive the agent.

Each release runs under a small supervisor (`agent.runtimes.supervise`) started in its own
session: the supervisor is the session and process-group leader, runs the command as its child
and copies its output into the deployment's log, so neither the release nor its log needs the
agent. A restarted agent finds the release again from its handle alone.

Files of a release, in `run_dir/<deployment id>/`:

- `pid`: `<command pid> <create time>`, written by the supervisor once the command runs;
- `exit`: the command's exit code (negative: the signal that ended it), then an optional reason;
- `stopping`: present while the agent stops the release (the supervisor then does not forward
  the SIGTERM the whole group already got);
- `log_path`: the deployment's log file, for `last_output`.

Nothing is ever signalled unless its identity is proven: the command by its create time, the
supervisor by its command line (this module and this release's pid file) and a create time no
later than the command's, other processes by being in the proven tree, group or session.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog, LogPolicy, read_tail
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState
from agent.runtimes.process_tree import (
    CREATE_TIME_TOLERANCE_S,
    ProcessTree,
    collect,
    is_alive,
    is_running,
    kill_all,
    kill_except_supervisor,
    killpg,
    proven_process,
    terminate,
    wait_gone,
)

SUPERVISOR_MODULE = "agent.runtimes.supervise"
# How long the supervisor may take to start the command and report its pid.
START_TIMEOUT_S = 5.0
POLL_S = 0.02
# How long a release that just ended may take to have its exit code written.
EXIT_FILE_WAIT_S = 1.0
# After its command is SIGKILLed, how long the supervisor gets to record the exit and leave by itself.
SUPERVISOR_EXIT_S = 1.0
# How long SIGKILLed processes may take to disappear before stop_release gives up.
GONE_TIMEOUT_S = 5.0
# The environment of the agent a release inherits; everything else comes from its spec.
INHERITED_ENV = ("PATH", "LANG")
_DEPLOYMENT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ReleaseFiles:
    """Where one release's runtime files live."""

    directory: Path

    @property
    def pid(self) -> Path:
        return self.directory / "pid"

    @property
    def exit(self) -> Path:
        return self.directory / "exit"

    @property
    def stopping(self) -> Path:
        return self.directory / "stopping"

    @property
    def log_path(self) -> Path:
        return self.directory / "log_path"


class ProcessRuntime:
    """Runs releases as supervised host processes; implements `ReleaseRuntime` for runtime "process"."""

    def __init__(self, run_dir: Path, kill_grace_s: float = 10.0) -> None:
        # Absolute: the supervisor runs elsewhere, and its command line is matched against these paths.
        self.run_dir = Path(run_dir).resolve()
        self.kill_grace_s = kill_grace_s

    # -- ReleaseRuntime ------------------------------------------------------------------------

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the command under a detached supervisor and returns once its pid is known."""
        if not spec.command:
            raise RuntimeFailure("a process release needs a command")
        if spec.workdir is None:
            raise RuntimeFailure("a process release needs a working directory")
        argv = command_argv(spec.command)
        files = self.files(spec.deployment_id)
        # The supervisor writes the log in its own process, held to the same policy as `log`.
        supervisor = await asyncio.to_thread(self._spawn, spec, argv, files, log.policy)
        pid, started_at = await self._wait_for_pid(supervisor, files)
        log.agent(RELEASE_STAGE, f"started process {pid}: {display_command(spec.command)}")
        return ReleaseHandle(
            runtime="process",
            deployment_id=spec.deployment_id,
            application=spec.application,
            host="127.0.0.1",
            ports={port: port for port in spec.ports},
            pid=pid,
            pid_started_at=started_at,
            process_group=supervisor.pid,
        )

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Running while the command (same pid and create time) lives; else its exit code if known."""
        return await asyncio.to_thread(self._state, handle)

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """SIGTERM to the release's group and escaped descendants, SIGKILL after `grace_s`."""
        files = self.files(handle.deployment_id)
        tree = await asyncio.to_thread(self._prove_tree, handle)
        if tree is None:
            return
        processes = await asyncio.to_thread(collect, tree, {})
        if not processes:
            return
        await asyncio.to_thread(terminate, tree, processes, files.stopping)
        await wait_gone(processes.values(), grace_s)
        # Leftovers and whatever they forked meanwhile.
        processes = await asyncio.to_thread(collect, tree, processes)
        if processes:
            await asyncio.to_thread(kill_except_supervisor, tree, processes)
            if tree.supervisor is not None:
                await wait_gone([tree.supervisor], SUPERVISOR_EXIT_S)
            processes = await asyncio.to_thread(collect, tree, processes)
            await asyncio.to_thread(kill_all, tree, processes)
            left = await wait_gone(processes.values(), GONE_TIMEOUT_S)
            if left:
                pids = ", ".join(str(process.pid) for process in left)
                raise RuntimeFailure(f"processes of release {handle.deployment_id} survived SIGKILL: {pids}")

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """A process cannot be resumed: makes sure the old one is gone and starts the command again."""
        await self.stop_release(handle, self.kill_grace_s)
        return await self.start_release(spec, log)

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops the release and deletes its runtime files; a no-op when it is already gone."""
        await self.stop_release(handle, grace_s)
        await asyncio.to_thread(shutil.rmtree, self.files(handle.deployment_id).directory, True)

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """The text of the release's last `lines` output lines (stdout and stderr) in its log."""
        return await asyncio.to_thread(self._last_output, handle, lines)

    # -- extras --------------------------------------------------------------------------------

    async def adopt(self, handle: ReleaseHandle) -> bool:
        """After an agent restart: whether the release of this handle still runs."""
        return await asyncio.to_thread(is_running, handle.pid, handle.pid_started_at)

    def files(self, deployment_id: str) -> ReleaseFiles:
        """The runtime files of a deployment's release."""
        if not _DEPLOYMENT_ID.match(deployment_id):
            raise ValueError(f"not a usable deployment id: {deployment_id!r}")
        return ReleaseFiles(self.run_dir / deployment_id)

    # -- internals (run on worker threads) -----------------------------------------------------

    def _spawn(
        self, spec: ReleaseSpec, argv: list[str], files: ReleaseFiles, policy: LogPolicy
    ) -> subprocess.Popen[bytes]:
        files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in (files.pid, files.exit, files.stopping):
            stale.unlink(missing_ok=True)
        files.log_path.write_text(str(Path(spec.log_path).resolve()), encoding="utf-8")
        assert spec.workdir is not None
        supervisor_env = {key: os.environ[key] for key in (*INHERITED_ENV, "PYTHONPATH") if key in os.environ}
        supervisor_env.setdefault("PATH", os.defpath)
        command = [
            sys.executable, "-P", "-m", SUPERVISOR_MODULE,
            "--log", str(Path(spec.log_path).resolve()),
            "--pid-file", str(files.pid),
            "--exit-file", str(files.exit),
            "--stop-file", str(files.stopping),
            "--workdir", str(Path(spec.workdir).resolve()),
            "--kill-grace", str(self.kill_grace_s),
            "--max-log-bytes", str(policy.max_bytes),
            "--env-from-stdin",
            "--", *argv,
        ]
        # The supervisor's cwd is ours, not the workspace's: a workspace must not shadow agent modules.
        supervisor = subprocess.Popen(
            command,
            cwd=files.directory,
            env=supervisor_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )
        # Our own child: wait for it on a thread so it never lingers as a zombie (and asyncio's
        # child watchers and psutil never reap it behind Popen's back).
        threading.Thread(target=supervisor.wait, name=f"supervisor-{supervisor.pid}", daemon=True).start()
        assert supervisor.stdin is not None
        try:
            # Secrets go on stdin, never in arguments that `ps` shows.
            payload = {"env": release_env(spec), "secrets": list(policy.secrets)}
            supervisor.stdin.write(json.dumps(payload).encode("utf-8"))
        except BrokenPipeError:
            pass  # it died already; _wait_for_pid reports why
        finally:
            try:
                supervisor.stdin.close()
            except BrokenPipeError:
                pass
        return supervisor

    async def _wait_for_pid(self, supervisor: subprocess.Popen[bytes], files: ReleaseFiles) -> tuple[int, float]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            started = await asyncio.to_thread(_read_pid_file, files.pid)
            if started is not None:
                return started
            exited = supervisor.returncode
            if exited is not None:
                # It may have written the pid file just before it exited.
                started = await asyncio.to_thread(_read_pid_file, files.pid)
                if started is not None:
                    return started
                code, reason = await asyncio.to_thread(_read_exit_file, files.exit)
                if reason:
                    raise RuntimeFailure(f"the release command could not start: {reason}", exit_code=code)
                raise RuntimeFailure(
                    f"the release supervisor exited with code {exited} before starting the command", exit_code=code
                )
            if time.monotonic() >= deadline:
                if supervisor.returncode is None:
                    # Still our unreaped child, so the group is ours.
                    killpg(supervisor.pid, signal.SIGKILL)
                raise RuntimeFailure(f"the release did not start within {START_TIMEOUT_S:g}s")
            await asyncio.sleep(POLL_S)

    def _state(self, handle: ReleaseHandle) -> ReleaseState:
        if is_running(handle.pid, handle.pid_started_at):
            return ReleaseState(running=True, pid=handle.pid)
        files = self.files(handle.deployment_id)
        code, _ = _read_exit_file(files.exit)
        if code is None:
            # The command may have just ended, with its supervisor about to write the exit code.
            deadline = time.monotonic() + EXIT_FILE_WAIT_S
            while code is None and time.monotonic() < deadline and self._prove_supervisor(handle) is not None:
                time.sleep(POLL_S)
                code, _ = _read_exit_file(files.exit)
        return ReleaseState(running=False, exit_code=code)

    def _prove_supervisor(self, handle: ReleaseHandle) -> psutil.Process | None:
        """The supervisor of this handle's release, alive, or None; never another process."""
        if handle.process_group is None or handle.pid_started_at is None:
            return None
        try:
            process = psutil.Process(handle.process_group)
            if process.create_time() > handle.pid_started_at + CREATE_TIME_TOLERANCE_S:
                return None
            cmdline = process.cmdline()
            if not is_alive(process):
                return None
        except psutil.Error:
            return None
        if SUPERVISOR_MODULE not in cmdline or str(self.files(handle.deployment_id).pid) not in cmdline:
            return None
        return process

    def _prove_tree(self, handle: ReleaseHandle) -> ProcessTree | None:
        supervisor = self._prove_supervisor(handle)
        command = proven_process(handle.pid, handle.pid_started_at)
        if command is not None and not is_alive(command):
            command = None
        group = None
        if handle.process_group is not None:
            if supervisor is not None:
                group = handle.process_group
            elif command is not None:
                # A live member keeps the group id from being reused.
                try:
                    leader = handle.process_group
                    if os.getpgid(command.pid) == leader or os.getsid(command.pid) == leader:
                        group = leader
                except OSError:
                    pass
        if supervisor is None and command is None:
            return None
        return ProcessTree(supervisor=supervisor, command=command, group=group)

    def _last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        if lines <= 0:
            return []
        try:
            log_path = Path(self.files(handle.deployment_id).log_path.read_text(encoding="utf-8").strip())
        except OSError:
            return []
        data, _ = read_tail(log_path, lines * 10 + 200)
        output: list[str] = []
        for raw in data.decode("utf-8", errors="replace").splitlines():
            head, separator, text = raw.partition(" | ")
            fields = head.split(" ")
            if separator and len(fields) == 3 and fields[1] == RELEASE_STAGE and fields[2] in ("stdout", "stderr"):
                output.append(text)
        return output[-lines:]


# -- helpers -------------------------------------------------------------------------------------


def command_argv(command: tuple[str, ...] | list[str] | str) -> list[str]:
    """A list runs as it is; a string runs under `/bin/sh -c`."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return [str(part) for part in command]


def display_command(command: tuple[str, ...] | list[str] | str) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def release_env(spec: ReleaseSpec) -> dict[str, str]:
    """PATH and LANG of the agent, PORT (the first port), then the spec's env, which wins."""
    env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
    env.setdefault("PATH", os.defpath)
    if spec.ports:
        env["PORT"] = str(spec.ports[0])
    env.update({str(key): str(value) for key, value in spec.env.items()})
    return env


def _read_pid_file(path: Path) -> tuple[int, float] | None:
    try:
        pid_text, started_text = path.read_text(encoding="utf-8").split()
        return int(pid_text), float(started_text)
    except (OSError, ValueError):
        return None


def _read_exit_file(path: Path) -> tuple[int | None, str | None]:
    try:
        code_line, _, reason = path.read_text(encoding="utf-8").partition("\n")
        return int(code_line), reason.strip() or None
    except (OSError, ValueError):
        return None, None
