"""A build's output pump: a process of its own that copies the build container's attach stream into the log.

One per build of an engine on this host, in a session of its own, forked by the pump starter
(`python -m agent.runtimes.docker.build_pump --fork-server`, serve_forks) so that a build pays
no interpreter start-up. It outlives the agent: a SIGKILL, a crash or an upgrade of the agent
leaves it copying, so no line is lost while the agent is away and the restarted agent only
watches it to its end (build_pumps). Out of the agent's process, the copy costs the API
nothing (no GIL shared with the event loop), and since the build's log driver is `none`,
dockerd only hands the bytes over as it does for `docker run > file` (docs/performance.md).

Protocol on its standard streams: the agent writes one JSON line, the job (socket, container,
log, stage, max_bytes, secrets: the secrets never go on a command line); the pump attaches and
answers `attached` (or `error <why>`), after which the agent starts the container. When the
stream ends (the container stopped) the pump writes, if output was dropped at the cap or some
log writes failed, one JSON line (DeploymentLog.hand_over) for the agent's own writer of the
log to take over, so that the log gets one note and a full disk decides the end; then it exits.
It imports the standard library and agent.logs only: it starts in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from agent.logs import DeploymentLog, LineSplitter, LogPolicy
from agent.runtimes.docker.frames import whole_frames

_READ_BYTES = 1024 * 1024
_HEADERS_MAX = 64 * 1024
# After this long with no output, the pump asks the engine whether its container is still there:
# Docker 20.10 never ends the attach stream of a container removed before it started.
IDLE_CHECK_S = 5.0
ATTACHED = "attached"
# Copying output is batch work; the agent's API is not. Under CPU contention (builds printing
# flat out on a small host) a pump yields to the API, and the build waits on its full pipe.
PUMP_NICENESS = 10
# The container's state in the engine's inspect answer (its first "Status" after "State").
_STATE_STATUS = re.compile(rb'"State":\s*\{[^{}]*?"Status":\s*"([a-z]+)"')


class AttachFailed(Exception):
    """The engine did not hand over the container's output stream."""


def attach(socket_path: str, container_id: str) -> tuple[socket.socket, bytes]:
    """The container's attach stream (all output from now on) and the bytes already read past the headers."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
        connection.sendall(
            f"POST /containers/{container_id}/attach?stream=1&stdout=1&stderr=1 HTTP/1.1\r\n"
            "Host: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n".encode("ascii")
        )
        received = b""
        while b"\r\n\r\n" not in received:
            data = connection.recv(4096)
            if not data or len(received) > _HEADERS_MAX:
                raise AttachFailed("the engine closed the connection before answering")
            received += data
        head, _, rest = received.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ")
        # 101 on an upgrade; engines that hijack the connection without one answer 200.
        if len(status) < 2 or status[1] not in (b"101", b"200"):
            raise AttachFailed(f"the engine answered {b' '.join(status[1:]).decode('latin-1')}: {_message(rest)}")
        return connection, rest
    except OSError as exc:
        connection.close()
        raise AttachFailed(f"attaching to the container failed: {exc.strerror or exc}") from exc
    except AttachFailed:
        connection.close()
        raise


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body.decode("utf-8", "replace")).get("message", ""))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip()


class FrameCopier:
    """Turns the multiplexed stream into log lines: runs of one stream's frames at a time, whole chunks at once."""

    def __init__(self, log: DeploymentLog, stage: str) -> None:
        self._log = log
        self._stage = stage
        self._splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        frames, used = whole_frames(self._buffer)
        del self._buffer[:used]
        run_stream = ""
        run: list[bytes] = []
        for stream, payload in frames:
            if stream != run_stream and run:
                self._write(run_stream, run)
                run = []
            run_stream = stream
            run.append(payload)
        if run:
            self._write(run_stream, run)

    def finish(self) -> None:
        for name, splitter in self._splitters.items():
            self._log.write_lines(self._stage, name, splitter.flush())

    def _write(self, stream: str, payloads: list[bytes]) -> None:
        block = self._splitters[stream].feed_block(b"".join(payloads))
        if block is not None:
            self._log.write_block(self._stage, stream, block)


def container_may_write(socket_path: str, container_id: str) -> bool:
    """Whether the container can still write: it exists and has not stopped (True when the engine cannot tell).

    One request by hand, as for the attach: http.client (and the email parser it imports) would
    double the pump's start-up.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(IDLE_CHECK_S)
    try:
        connection.connect(socket_path)
        connection.sendall(
            f"GET /containers/{container_id}/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        received = b""
        while len(received) < _HEADERS_MAX and (data := connection.recv(65536)):
            received += data
    except OSError:
        return True  # the engine is busy or restarting: its stream says when it ends
    finally:
        connection.close()
    status = received.split(b"\r\n", 1)[0].split(b" ")
    if len(status) > 1 and status[1] == b"404":
        return False
    found = _STATE_STATUS.search(received)
    return found is None or found.group(1) not in (b"exited", b"dead", b"removing")


def pump(connection: socket.socket, already: bytes, log: DeploymentLog, stage: str, socket_path: str, container_id: str) -> None:
    """Copies until the stream ends; never stops reading early, so the build is never held up by its log."""
    copier = FrameCopier(log, stage)
    copier.feed(already)
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    connection.settimeout(IDLE_CHECK_S)
    try:
        while True:
            try:
                count = connection.recv_into(buffer)
            except TimeoutError:
                if container_may_write(socket_path, container_id):
                    continue
                break  # gone, or stopped with everything it wrote already read
            if not count:
                break
            copier.feed(view[:count])
    except OSError as exc:
        log.agent(stage, f"the output stream broke: {exc.strerror or exc}")
    finally:
        copier.finish()


def _answer(line: str) -> bool:
    """Writes one line to the agent; False when nobody reads any more (the agent is gone)."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return True
    except OSError:
        sys.stdout = open(os.devnull, "w")  # else the exit's own flush fails again, on stderr
        return False


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 2  # the agent went away before it sent the job
    job: dict[str, Any] = json.loads(line)
    try:
        connection, already = attach(str(job["socket"]), str(job["container"]))
    except AttachFailed as exc:
        _answer(f"error {exc}")
        return 1
    _answer(ATTACHED)
    # Nothing more comes from the agent; a terminal's signals never reach a process in its own session.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    policy = LogPolicy(max_bytes=int(job["max_bytes"]), secrets=tuple(str(value) for value in job["secrets"]))
    log = DeploymentLog(Path(job["log"]), policy)
    try:
        pump(connection, already, log, str(job["stage"]), str(job["socket"]), str(job["container"]))
    finally:
        connection.close()
        report = log.hand_over()
        if report is not None and not _answer(json.dumps(report)):
            # No agent to take the counts over: this writer notes them itself, if it can.
            log.take_over(report)
        log.close()
    return 0


def serve_forks(channel: socket.socket) -> int:
    """The pump starter: forks one pump per request, so that a build pays no interpreter start-up.

    Each request on `channel` (a unix socket to the agent) carries the two pipe ends that
    become the new pump's standard input and output; the answer is its pid (4 bytes). The
    pump gets a session of its own, and the kernel reaps it (SIGCHLD ignored): it outlives
    this process, which ends when the agent closes the channel (or is gone).
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 1, 2)
        except OSError:
            return 0
        if not message:
            return 0
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.setsid()
                os.nice(PUMP_NICENESS)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                channel.close()
                os.dup2(fds[0], 0)
                os.dup2(fds[1], 1)
                for fd in fds:
                    os.close(fd)
                code = main()
            finally:
                with contextlib.suppress(OSError):
                    sys.stdout.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        try:
            channel.sendall(pid.to_bytes(4, "big"))
        except OSError:
            return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        sys.exit(serve_forks(socket.socket(fileno=0)))
    sys.exit(main())
