"""The agent's side of build output pumps (build_pump): start one, hand it its job, find it again, wait for it.

A pump is recorded in `logs/<id>.build-pump` (its pid and start time) before its build starts,
so that a restarted agent finds it again, and never mistakes another process that got its pid
for it: the start time must match too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import agent
from agent.errors import RuntimeFailure
from agent.logs import LOG_FILE_MODE, DeploymentLog, notify_growth
from agent.runtimes.docker.build_pump import ATTACHED
from agent.runtimes.docker.output import OUTPUT_DRAIN_S

PUMP_SUFFIX = ".build-pump"
# How often a watched pump's log is looked at: followers see its lines this soon.
POLL_S = 0.05
# Once the container exited, its pump ends within a millisecond or two: looked at this often.
EXIT_POLL_S = 0.002
# How long a pump may take to start and attach.
HANDSHAKE_S = 30.0
DEFAULT_SOCKET = "/var/run/docker.sock"
# The package's parent: the pump imports agent.logs from the same tree as the agent, installed or not.
_PACKAGE_ROOT = str(Path(agent.__file__).resolve().parent.parent)


def unix_socket_of(url: str | None) -> str | None:
    """The path of the engine's unix socket for a docker.url (None: the default one); None when it is no unix socket."""
    if url is None:
        return DEFAULT_SOCKET
    for scheme in ("unix://", "http+unix://"):
        if url.startswith(scheme):
            return "/" + url[len(scheme):].lstrip("/")
    return None


def pump_file(log_path: Path) -> Path:
    """Where a build's pump is recorded: `logs/<id>.build-pump`."""
    return Path(log_path).with_suffix(PUMP_SUFFIX)


@dataclass
class PumpProcess:
    """A build's pump: this agent's child (a first run), or found again from its record (after a restart)."""

    pid: int
    started: float
    popen: subprocess.Popen[str] | None = None

    def running(self) -> bool:
        """Whether it still copies; never confused with another process that got its pid."""
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def kill(self) -> None:
        """SIGKILL, only while it is still this pump."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def take_counts(self, log: DeploymentLog) -> None:
        """After it ended: what it dropped at the cap or failed to write becomes the agent's writer's to note."""
        if self.popen is None or self.popen.stdout is None:
            return
        with self.popen.stdout as answers:
            for line in answers:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    log.take_over(json.loads(line))


def spawn() -> subprocess.Popen[str]:
    """Starts a pump, which waits for its job (see hand_job): its start-up overlaps the container's creation."""
    return subprocess.Popen(
        # -S: no site (and no editable-install finder importing typing); PYTHONPATH finds the package.
        [sys.executable, "-S", "-m", "agent.runtimes.docker.build_pump"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        # Its own session: it outlives the agent, and signals to the agent's group never reach it.
        start_new_session=True, cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _PACKAGE_ROOT},
    )


def dismiss(popen: subprocess.Popen[str]) -> None:
    """Lets a pump that got no job go: with its input closed it exits at once."""
    with contextlib.suppress(OSError):
        if popen.stdin is not None:
            popen.stdin.close()
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def hand_job(
    popen: subprocess.Popen[str], socket_path: str, container_id: str, log: DeploymentLog, stage: str
) -> PumpProcess:
    """Attaches the pump to the (created, not yet started) container and records it; blocks: run in a thread.

    Once this returns, everything the container writes after its start is copied.
    """
    process = PumpProcess(popen.pid, _start_time(popen.pid), popen)
    try:
        job = {
            "socket": socket_path, "container": container_id, "log": str(log.path), "stage": stage,
            "max_bytes": log.policy.max_bytes, "secrets": list(log.policy.secrets),
        }
        assert popen.stdin is not None and popen.stdout is not None
        try:
            popen.stdin.write(json.dumps(job) + "\n")
            popen.stdin.close()
            answer = popen.stdout.readline().strip()
        except OSError as exc:  # it died before it read its job
            raise RuntimeFailure(f"starting the build's output pump failed: {exc.strerror or exc}") from exc
        if answer != ATTACHED:
            raise RuntimeFailure(f"following the build's output failed: {answer.removeprefix('error ') or 'no answer'}")
        try:
            _save(pump_file(log.path), process)
        except OSError as exc:
            raise RuntimeFailure(f"recording the build's output pump failed: {exc.strerror or exc}") from exc
    except BaseException:
        process.kill()
        popen.wait()
        raise
    return process


def find(log_path: Path) -> PumpProcess | None:
    """The pump recorded for this log, if it still runs; blocks: run in a thread."""
    try:
        fields = json.loads(pump_file(log_path).read_text())
        process = PumpProcess(int(fields["pid"]), float(fields["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return process if process.running() else None


def forget(log_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pump_file(log_path))


def _start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _save(path: Path, process: PumpProcess) -> None:
    """Replaces the record in one step: a kill leaves the old one or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_FILE_MODE)
    with open(descriptor, "w") as handle:
        handle.write(json.dumps({"pid": process.pid, "started": process.started}))
    os.replace(temporary, path)


async def watch(process: PumpProcess, log: DeploymentLog, stage: str, exited: asyncio.Event) -> None:
    """Waits for the pump to end; meanwhile tells this process's followers of the log when it grows.

    The pump ends with the container's stream, a moment after the container (`exited`): from
    then on it is looked at every EXIT_POLL_S. A pump whose log has not grown for
    OUTPUT_DRAIN_S after the exit is stopped: its stream did not end with the container. After
    it ended, `log` takes over what it dropped or failed to write (see take_counts).
    """
    size, quiet_since = -1, time.monotonic()
    seen_exit = False
    while process.running():
        current = _size(log.path)
        now = time.monotonic()
        if exited.is_set() and not seen_exit:
            seen_exit, quiet_since = True, now
        if current != size:
            size, quiet_since = current, now
            notify_growth(log.path)
        elif seen_exit and now - quiet_since >= OUTPUT_DRAIN_S:
            log.agent(stage, "the output stream did not end with the container; closing it")
            process.kill()
            break
        if seen_exit:
            await asyncio.sleep(EXIT_POLL_S)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(exited.wait(), POLL_S)
    if process.popen is not None:
        await asyncio.to_thread(_reap_and_take_counts, process, log)
    notify_growth(log.path)


def _reap_and_take_counts(process: PumpProcess, log: DeploymentLog) -> None:
    assert process.popen is not None
    process.popen.wait()
    process.take_counts(log)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1
