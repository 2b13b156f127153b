"""The command channel: one remote command on a session channel of the server's shared connection.

The command reports `MARKER pid starttime` on stdout, then waits for "go" on stdin before it execs
(see `scripts.launch_script`): the agent records the pid first, so nothing runs that it could not
stop. `CommandSession` finds the marker, streams the rest of the output line by line, and records
how the command ended or that the connection went away under it. `RemoteShell` opens such channels
and runs short scripts on fresh ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import deque
from typing import Awaitable, Callable

import asyncssh

from agent.errors import AgentError, RuntimeFailure
from agent.logs import DeploymentLog, LineSplitter
from agent.runtimes.remote.scripts import MARKER, sh_command

Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]

UNKNOWN_EXIT_CODE = -1
# Budget of a short remote query (state, rm, git rev-parse) on a fresh channel.
QUERY_TIMEOUT_S = 30.0
CONNECTION_ERRORS = (asyncssh.Error, OSError)


class LineSink:
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


class CommandSession(asyncssh.SSHClientSession[bytes]):
    """One remote command: finds the pid marker, streams lines, records exit and loss."""

    channel: asyncssh.SSHClientChannel[bytes]

    def __init__(self, sink: LineSink) -> None:
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

    @property
    def final_code(self) -> int:
        """The exit code sshd reported, or UNKNOWN_EXIT_CODE without a report."""
        return self.exit_code if self.exit_code is not None else UNKNOWN_EXIT_CODE

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


class RemoteShell:
    """Channels on one server's shared connection: command sessions, and short scripts on fresh ones."""

    def __init__(self, server_name: str, connect: Connect) -> None:
        self.server_name = server_name
        self._connect = connect

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The server's connection; an unreachable server is a RuntimeFailure."""
        try:
            return await self._connect()
        except AgentError:
            raise
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"cannot reach server {self.server_name}: {describe(exc)}") from exc

    async def open(
        self, script: str, sink: LineSink, what: str, *, connection: asyncssh.SSHClientConnection | None = None
    ) -> CommandSession:
        """Opens a session channel running `script`; the command waits for `proceed()` to exec."""
        connection = connection or await self.connection()
        opening = asyncio.ensure_future(connection.create_session(lambda: CommandSession(sink), script, encoding=None))
        try:
            _, session = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled while the channel opened: the command may run already, waiting for "go" on
            # an open channel. Closed, it reads EOF and ends before it starts anything.
            with contextlib.suppress(BaseException):
                _, opened = await opening
                opened.close()
            raise
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(
                f"cannot start {what} on server {self.server_name}: {describe(exc)}"
            ) from exc
        return session

    async def query(self, script: str, what: str, *, timeout_s: float = QUERY_TIMEOUT_S) -> tuple[int, str, str]:
        """Runs a short POSIX sh script on a fresh channel; returns (exit status, stdout, stderr)."""
        connection = await self.connection()
        try:
            result = await connection.run(
                sh_command(script), check=False, timeout=timeout_s, encoding="utf-8",
                errors="replace", stdin=asyncssh.DEVNULL,
            )
        except asyncssh.TimeoutError as exc:
            raise RuntimeFailure(f"{what} on server {self.server_name} took more than {timeout_s:g}s") from exc
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(f"{what} on server {self.server_name} failed: {describe(exc)}") from exc
        code = result.exit_status if result.exit_status is not None else UNKNOWN_EXIT_CODE
        return code, str(result.stdout or ""), str(result.stderr or "").strip()


def describe(exc: BaseException) -> str:
    """The human part of an SSH or OS error."""
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    text = str(exc)
    return text or type(exc).__name__


def peer_host(connection: asyncssh.SSHClientConnection) -> str:
    """The server's address as the connection reached it."""
    peer = connection.get_extra_info("peername")
    return str(peer[0]) if peer else "127.0.0.1"
