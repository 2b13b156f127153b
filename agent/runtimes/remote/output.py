"""Copies a remote release's output files into its local deployment log, over SFTP.

A remote release writes its stdout and stderr to files on the server (so that it
never depends on the agent's connection staying up), and its supervisor writes
`exit_code` when the command ends. This follower polls those files: new bytes
go into the log as lines, and how far it got is kept in a small local file, so
that an agent restarted later resumes where it stopped instead of repeating or
losing output. Polling needs no process of its own on the server, so nothing is
left behind there when the agent goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import asyncssh
import structlog

from agent.errors import AgentError
from agent.logs import DeploymentLog, LineSplitter
from agent.runtimes.base import RELEASE_STAGE

logger = structlog.get_logger("agent.remote_output")

POLL_S = 0.25
# Without an exit_code file (the supervisor was SIGKILLed), how often the process itself is checked.
LIVENESS_EVERY_S = 2.0
READ_LIMIT_BYTES = 1024 * 1024
RECONNECT_DELAY_S = 1.0
MAX_RECONNECT_DELAY_S = 30.0
STREAMS = ("stdout", "stderr")
EXIT_CODE_FILE = "exit_code"

OpenSftp = Callable[[], Awaitable[asyncssh.SFTPClient]]
IsRunning = Callable[[], Awaitable[bool]]


@dataclass
class OutputFollower:
    """Follows one release's (or build's) output directory until it ends or the follower is stopped."""

    server_name: str
    run_dir: str  # on the server, holding stdout, stderr and exit_code
    log: DeploymentLog  # the follower's own writer; closed when it ends
    open_sftp: OpenSftp  # a shared session: the follower never closes it
    discard_sftp: Callable[[asyncssh.SFTPClient], None]  # after it failed, so the next open starts anew
    offsets_file: Path | None  # local; None keeps offsets in memory only
    tail: deque[str]
    # The stage its lines are logged under: a release's, or a build's (builds run under the same supervisor).
    stage: str = RELEASE_STAGE
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _offsets: dict[str, int] = field(init=False)
    _splitters: dict[str, LineSplitter] = field(init=False)

    def __post_init__(self) -> None:
        self._offsets = _load_offsets(self.offsets_file)
        self._splitters = {stream: LineSplitter() for stream in STREAMS}

    async def run(self, pid: int, is_running: IsRunning) -> None:
        """Copies output until the release has ended and every byte of it is in the log."""
        delay = RECONNECT_DELAY_S
        sftp: asyncssh.SFTPClient | None = None
        loop = asyncio.get_running_loop()
        next_liveness = loop.time() + LIVENESS_EVERY_S
        try:
            while True:
                try:
                    sftp = await self.open_sftp()
                    await self._copy_new(sftp)
                    code = await self._read_exit_code(sftp)
                    gone = code is not None
                    if not gone and loop.time() >= next_liveness:
                        next_liveness = loop.time() + LIVENESS_EVERY_S
                        gone = not await is_running()
                        if gone:
                            # It may have written its exit code and ended since the read above.
                            code = await self._read_exit_code(sftp)
                    if gone:
                        # The supervisor writes exit_code after the command's last write: one more read.
                        await self._copy_new(sftp)
                        self.exit_code = code
                        self._flush()
                        ending = f"exited with code {code}" if code is not None else "is gone (no exit code)"
                        self.log.agent(self.stage, f"process {pid} on server {self.server_name} {ending}")
                        return
                    delay = RECONNECT_DELAY_S
                except (asyncssh.Error, OSError, AgentError) as exc:
                    # The connection dropped: the release keeps running; read on once it is back.
                    logger.info("release output paused", server=self.server_name, error=str(exc), retry_in_s=delay)
                    if sftp is not None:
                        self.discard_sftp(sftp)
                        sftp = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RECONNECT_DELAY_S)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self.wake.wait()
                self.wake.clear()
        finally:
            self.log.close()
            self.ended.set()

    async def _copy_new(self, sftp: asyncssh.SFTPClient) -> None:
        for stream in STREAMS:
            path = posixpath.join(self.run_dir, stream)
            while True:
                try:
                    size = (await sftp.stat(path)).size or 0
                except asyncssh.SFTPNoSuchFile:
                    break
                offset = self._offsets.get(stream, 0)
                if size < offset:
                    offset = 0  # the file was started anew (the release was started again)
                if size == offset:
                    break
                if self.log.full:
                    # Nothing more goes into the log: count the new bytes instead of downloading them.
                    self.log.count_dropped(self.stage, size - offset)
                    self._offsets[stream] = size
                    self._save_offsets()
                    break
                async with sftp.open(path, "rb") as remote:
                    chunk = await remote.read(min(size - offset, READ_LIMIT_BYTES), offset)
                if not chunk:
                    break
                lines = self._splitters[stream].feed(chunk)
                self._write(stream, lines)
                self._offsets[stream] = offset + len(chunk)
                self._save_offsets()

    async def _read_exit_code(self, sftp: asyncssh.SFTPClient) -> int | None:
        try:
            async with sftp.open(posixpath.join(self.run_dir, EXIT_CODE_FILE), "rb") as remote:
                text = (await remote.read()).decode(errors="replace").strip()
        except asyncssh.SFTPNoSuchFile:
            return None
        return int(text) if text.lstrip("-").isdigit() else None

    def _write(self, stream: str, lines: list[str]) -> None:
        if lines:
            self.log.write_lines(self.stage, stream, lines)
            # The tail ends up in error messages (last_output): masked like the log.
            self.tail.extend(self.log.mask(line) for line in lines)

    def _flush(self) -> None:
        for stream in STREAMS:
            self._write(stream, self._splitters[stream].flush())

    def _save_offsets(self) -> None:
        if self.offsets_file is None:
            return
        self.offsets_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.offsets_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self._offsets))
        os.replace(temporary, self.offsets_file)


def _load_offsets(path: Path | None) -> dict[str, int]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {stream: int(data[stream]) for stream in STREAMS if isinstance(data.get(stream), int)}
