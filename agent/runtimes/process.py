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
- `log_path`: the deployment's log file, for `last_output`;
- `cgroup`: the path of the release's own cgroup, where it has one (see agent.runtimes.cgroups).
  Written before the supervisor starts and read back by every stop, so that a restarted agent
  ends the release the way it was started: its whole cgroup, or (no such file) its process group.

(Over 400 lines: start, state and stop share these files and the identity proofs below.)

Nothing is ever signalled unless its identity is proven: the command by its create time, the
supervisor by its command line (this module and this release's pid file) and a create time no
later than the command's, other processes by being in the proven tree, group or session, or in
the release's cgroup: a child that calls `setsid` or double-forks leaves its group, not its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from agent.runtimes.cgroups import Cgroup, CgroupError, Isolation, ReleaseCgroups, end_cgroup, recorded_cgroup
from agent.runtimes.process_tree import (
    CREATE_TIME_TOLERANCE_S,
    ProcessTree,
    collect,
    is_alive,
    is_running,
    killpg,
    proven_process,
    stop_tree,
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
# The log line of a release that has no cgroup although the host has them.
NO_CGROUP_NOTE = "{}; the release is kept together by its process group only"
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

    @property
    def cgroup(self) -> Path:
        return self.directory / "cgroup"


# `cgroups=DISCOVER`: find this host's cgroups on first use (None: process groups only).
DISCOVER = "discover"


class ProcessRuntime:
    """Runs releases as supervised host processes; implements `ReleaseRuntime` for runtime "process"."""

    def __init__(
        self, run_dir: Path, kill_grace_s: float = 10.0, cgroups: ReleaseCgroups | None | str = DISCOVER
    ) -> None:
        # Absolute: the supervisor runs elsewhere, and its command line is matched against these paths.
        self.run_dir = Path(run_dir).resolve()
        self.kill_grace_s = kill_grace_s
        self._cgroups = cgroups
        self._cgroups_lock = threading.Lock()

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
        supervisor, cgroup, note = await asyncio.to_thread(self._spawn, spec, argv, files, log.policy)
        if note:
            log.agent(RELEASE_STAGE, note)
        try:
            pid, started_at = await self._wait_for_pid(supervisor, files)
        except RuntimeFailure:
            if cgroup is not None:
                await asyncio.to_thread(self._end_cgroup, cgroup, files)
            raise
        if cgroup is not None:
            log.agent(RELEASE_STAGE, f"the release runs in cgroup {cgroup.path}")
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
        """SIGTERM to the release's group, cgroup and escaped descendants, SIGKILL after `grace_s`.

        A release with a cgroup ends with `cgroup.kill`, a check that the cgroup is empty, and
        its removal: whatever left the group (setsid, double fork) goes too.
        """
        files = self.files(handle.deployment_id)
        tree = await asyncio.to_thread(self._prove_tree, handle)
        if tree is None:
            return
        processes = await asyncio.to_thread(collect, tree, {})
        if processes:
            left = await stop_tree(
                tree, processes, files.stopping, grace_s, supervisor_exit_s=SUPERVISOR_EXIT_S, gone_s=GONE_TIMEOUT_S
            )
            if left:
                pids = ", ".join(str(process.pid) for process in left)
                raise RuntimeFailure(f"processes of release {handle.deployment_id} survived SIGKILL: {pids}")
        if tree.cgroup is not None:
            await asyncio.to_thread(self._end_cgroup, tree.cgroup, files)

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

    async def isolation(self) -> Isolation:
        """What keeps this runtime's new releases together: a cgroup each, or process groups only."""
        return "cgroup" if await asyncio.to_thread(self.cgroups) is not None else "process_group"

    async def remove_stray_cgroups(self, keep: set[str]) -> int:
        """After a restart: kills and removes the cgroups of this agent's releases not in `keep`."""
        return await asyncio.to_thread(self._remove_stray_cgroups, keep)

    def cgroups(self) -> ReleaseCgroups | None:
        """This runtime's release cgroups, found on first use; None where the host has none for us."""
        with self._cgroups_lock:
            if isinstance(self._cgroups, str):
                self._cgroups = ReleaseCgroups.discover(self.run_dir)
            return self._cgroups

    async def adopt(self, handle: ReleaseHandle) -> bool:
        """After an agent restart: whether the release of this handle still runs."""
        return await asyncio.to_thread(is_running, handle.pid, handle.pid_started_at)

    async def recorded_releases(self) -> list[ReleaseHandle]:
        """After a restart: a handle for each release whose files here record a command, running or not.

        Built from the release's own pid file (command pid and create time), with the command's
        parent as the supervisor to prove: stopping it signals nothing whose identity fails.
        """
        return await asyncio.to_thread(self._recorded_releases)

    def files(self, deployment_id: str) -> ReleaseFiles:
        """The runtime files of a deployment's release."""
        if not _DEPLOYMENT_ID.match(deployment_id):
            raise ValueError(f"not a usable deployment id: {deployment_id!r}")
        return ReleaseFiles(self.run_dir / deployment_id)

    # -- internals (run on worker threads) -----------------------------------------------------

    def _recorded_releases(self) -> list[ReleaseHandle]:
        try:
            directories = [entry for entry in self.run_dir.iterdir() if _DEPLOYMENT_ID.match(entry.name)]
        except OSError:
            return []
        handles: list[ReleaseHandle] = []
        for directory in directories:
            started = _read_pid_file(self.files(directory.name).pid)
            if started is None:
                continue  # no command ever ran (or not a release's directory)
            command = proven_process(*started)
            try:
                supervisor = command.ppid() if command is not None else None
            except psutil.Error:
                supervisor = None
            handles.append(ReleaseHandle(
                runtime="process", deployment_id=directory.name, application="", host="127.0.0.1",
                pid=started[0], pid_started_at=started[1], process_group=supervisor,
            ))
        return handles

    def _spawn(
        self, spec: ReleaseSpec, argv: list[str], files: ReleaseFiles, policy: LogPolicy
    ) -> tuple[subprocess.Popen[bytes], Cgroup | None, str | None]:
        """Starts the supervisor (in the release's cgroup where there is one); returns it, the cgroup, a note."""
        files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in (files.pid, files.exit, files.stopping):
            stale.unlink(missing_ok=True)
        cgroup, note = self._prepare_cgroup(spec.deployment_id, files)
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
            *(["--cgroup", str(cgroup.path)] if cgroup is not None else []),
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
        if cgroup is not None:
            # The supervisor starts the command only once stdin closes: moved now, the whole tree starts inside.
            try:
                cgroup.add(supervisor.pid)
            except CgroupError as exc:
                with contextlib.suppress(RuntimeFailure):  # an empty cgroup left over: the next sweep takes it
                    self._end_cgroup(cgroup, files)
                cgroup, note = None, NO_CGROUP_NOTE.format(exc)
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
        return supervisor, cgroup, note

    def _prepare_cgroup(self, deployment_id: str, files: ReleaseFiles) -> tuple[Cgroup | None, str | None]:
        """A fresh cgroup for the release, recorded in its files; None (and why) where there is none."""
        files.cgroup.unlink(missing_ok=True)
        cgroups = self.cgroups()
        if cgroups is None:
            return None, None
        try:
            return cgroups.prepare(deployment_id, files.cgroup, GONE_TIMEOUT_S), None
        except CgroupError as exc:
            return None, NO_CGROUP_NOTE.format(exc)

    def _end_cgroup(self, cgroup: Cgroup, files: ReleaseFiles) -> None:
        try:
            end_cgroup(cgroup, files.cgroup, self.cgroups(), GONE_TIMEOUT_S)
        except CgroupError as exc:
            raise RuntimeFailure(str(exc)) from None

    def _remove_stray_cgroups(self, keep: set[str]) -> int:
        cgroups = self.cgroups()
        if cgroups is None:
            return 0
        return cgroups.sweep(keep, lambda deployment_id: self.files(deployment_id).cgroup, GONE_TIMEOUT_S)

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
        cgroup = recorded_cgroup(self.files(handle.deployment_id).cgroup, handle.deployment_id)
        if supervisor is None and command is None and cgroup is None:
            return None
        return ProcessTree(supervisor=supervisor, command=command, group=group, cgroup=cgroup)

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
