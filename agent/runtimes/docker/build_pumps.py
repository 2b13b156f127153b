"""The agent's side of build output pumps (build_pump): fork one, hand it its job, find it again, wait for it.

A pump is recorded in `logs/<id>.build-pump` (its pid and start time) before its build starts,
so that a restarted agent finds it again, and never mistakes another process that got its pid
for it: the start time must match too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

import agent
from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog, log_size, notify_growth, replace_beside_log
from agent.runtimes import process_tree
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
class PumpPipes:
    """A forked pump's standard streams, from the agent's side: its job goes in, its answers come out."""

    pid: int
    # Its start time, read as soon as the starter named it: what tells it from a later process with its pid.
    started: float
    job: IO[str]
    answers: IO[str]

    def kill(self) -> None:
        PumpProcess(self.pid, self.started).kill()

    def close(self) -> None:
        """Closes both ends; a pump that got no job yet reads EOF and exits at once."""
        for stream in (self.job, self.answers):
            with contextlib.suppress(OSError):
                stream.close()


@dataclass
class PumpProcess:
    """A build's pump: one this agent started (with its pipes), or found again from its record (after a restart)."""

    pid: int
    started: float
    pipes: PumpPipes | None = None
    # Asked every POLL_S by watch, for each build: a pidfd poll rather than /proc reads.
    _liveness: process_tree.ProvenLiveness = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._liveness = process_tree.ProvenLiveness(self.pid, self.started)

    def running(self) -> bool:
        """Whether it still copies; never confused with another process that got its pid."""
        return self._liveness.running()

    def kill(self) -> None:
        """SIGKILL, only while it is still this pump."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def take_counts(self, log: DeploymentLog) -> None:
        """After it ended: what it dropped at the cap or failed to write becomes the agent's writer's to note."""
        if self.pipes is None:
            return
        try:
            for line in self.pipes.answers:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    log.take_over(json.loads(line))
        finally:
            self.pipes.close()


class PumpStarter:
    """Starts pumps by asking one pump-starter process (build_pump.serve_forks) to fork them.

    A fork costs about a millisecond; a new interpreter per build cost 0.06 s of CPU, which
    four builds starting at once took from each other on a small machine. The starter is
    started on first use, again if it died, and ends when `close` (or the agent's exit)
    closes its channel; the pumps it forked go on. Thread-safe: pumps start in pool threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channel: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def fork(self) -> PumpPipes:
        """A new pump waiting for its job (see hand_job); blocks: run in a thread."""
        with self._lock:
            for attempt in (1, 2):
                channel = self._channel or self._start()
                job_read, job_write = os.pipe()
                answers_read, answers_write = os.pipe()
                try:
                    socket.send_fds(channel, [b"p"], [job_read, answers_write])
                    reply = _receive_exactly(channel, 4)
                except OSError as exc:
                    for fd in (job_read, job_write, answers_read, answers_write):
                        os.close(fd)
                    self._stop()
                    if attempt == 2:
                        raise RuntimeFailure(f"starting the build's output pump failed: {exc.strerror or exc}") from exc
                    continue
                os.close(job_read)
                os.close(answers_write)
                pid = int.from_bytes(reply, "big")
                return PumpPipes(pid, _start_time(pid), open(job_write, "w"), open(answers_read, "r"))
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                # -S: no site (and no editable-install finder importing typing); PYTHONPATH finds the package.
                [sys.executable, "-S", "-m", "agent.runtimes.docker.build_pump", "--fork-server"],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                # Its own session: neither it nor its pumps get the signals sent to the agent's group.
                start_new_session=True, cwd="/",
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _PACKAGE_ROOT},
            )
        finally:
            theirs.close()
        self._channel = ours
        return ours

    def _stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _receive_exactly(channel: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = channel.recv(count - len(data))
        if not piece:
            raise ConnectionResetError(errno.ECONNRESET, "the pump starter ended")
        data += piece
    return data


def hand_job(pipes: PumpPipes, socket_path: str, container_id: str, log: DeploymentLog, stage: str) -> PumpProcess:
    """Attaches the pump to the (created, not yet started) container and records it; blocks: run in a thread.

    Once this returns, everything the container writes after its start is copied.
    """
    process = PumpProcess(pipes.pid, pipes.started, pipes)
    try:
        job = {
            "socket": socket_path, "container": container_id, "log": str(log.path), "stage": stage,
            "max_bytes": log.policy.max_bytes, "secrets": list(log.policy.secrets),
        }
        try:
            pipes.job.write(json.dumps(job) + "\n")
            pipes.job.close()
            answer = pipes.answers.readline().strip()
        except OSError as exc:  # it died before it read its job
            raise RuntimeFailure(f"starting the build's output pump failed: {exc.strerror or exc}") from exc
        if answer != ATTACHED:
            raise RuntimeFailure(f"following the build's output failed: {answer.removeprefix('error ') or 'no answer'}")
        try:
            replace_beside_log(pump_file(log.path), json.dumps({"pid": process.pid, "started": process.started}))
        except OSError as exc:
            raise RuntimeFailure(f"recording the build's output pump failed: {exc.strerror or exc}") from exc
    except BaseException:
        process.kill()
        pipes.close()
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
        current = log_size(log.path)
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
    if process.pipes is not None:
        await asyncio.to_thread(process.take_counts, log)
    notify_growth(log.path)

