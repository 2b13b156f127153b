"""Deployment log files: one line per output line, stamped with time, stage and stream.

Writers append as output arrives and never hold a whole log in memory; readers
serve a tail, a byte range, or follow the file as it grows.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

from agent.models import utc_now

# A line longer than this is cut into pieces so that one endless line cannot grow memory.
MAX_LINE_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024


class LineSplitter:
    """Turns a stream of byte chunks into complete text lines."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[str]:
        self._pending.extend(chunk)
        lines: list[str] = []
        while True:
            newline = self._pending.find(b"\n")
            if newline == -1:
                break
            lines.append(_decode(self._pending[:newline]))
            del self._pending[: newline + 1]
        while len(self._pending) >= MAX_LINE_BYTES:
            lines.append(_decode(self._pending[:MAX_LINE_BYTES]))
            del self._pending[:MAX_LINE_BYTES]
        return lines

    def flush(self) -> list[str]:
        if not self._pending:
            return []
        line = _decode(self._pending)
        self._pending.clear()
        return [line]


def _decode(raw: bytes | bytearray) -> str:
    return bytes(raw).rstrip(b"\r").decode("utf-8", errors="replace")


class DeploymentLog:
    """Appends stamped lines to one deployment's log file; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)

    def write(self, stage: str, stream: str, text: str) -> None:
        self.write_lines(stage, stream, text.splitlines() or [""])

    def write_lines(self, stage: str, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        stamp = utc_now()
        payload = "".join(f"{stamp} {stage} {stream} | {line}\n" for line in lines).encode("utf-8")
        with self._lock:
            if not self._file.closed:
                self._file.write(payload)

    def agent(self, stage: str, message: str) -> None:
        """A stage message of the agent itself (stream `agent`)."""
        self.write(stage, "agent", message)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> "DeploymentLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def log_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of the file and the offset at its end; reads backwards in blocks."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return b"", 0
    with handle:
        end = handle.seek(0, os.SEEK_END)
        if lines <= 0:
            return b"", end
        position = end
        blocks: list[bytes] = []
        newlines = 0
        # A complete final line ends in a newline that is not a separator to count.
        skip_final = True
        while position > 0 and newlines <= lines:
            size = min(READ_CHUNK_BYTES, position)
            position -= size
            handle.seek(position)
            block = handle.read(size)
            newlines += block.count(b"\n")
            if skip_final and block.endswith(b"\n"):
                newlines -= 1
            skip_final = False
            blocks.append(block)
        data = b"".join(reversed(blocks))
        body = data[:-1] if data.endswith(b"\n") else data
        parts = body.split(b"\n")
        kept = b"\n".join(parts[-lines:])
        if data.endswith(b"\n"):
            kept += b"\n"
        return kept, end


def iter_range(path: Path, offset: int, end: int | None = None) -> Iterator[bytes]:
    """Yields the file's bytes from `offset` up to `end` (or its current end) in chunks."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        handle.seek(offset)
        remaining = None if end is None else max(0, end - offset)
        while remaining is None or remaining > 0:
            size = READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining)
            chunk = handle.read(size)
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def read_chunk(path: Path, offset: int, limit: int = READ_CHUNK_BYTES) -> bytes:
    """Up to `limit` bytes from `offset`; empty when nothing new was written."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(limit)
    except FileNotFoundError:
        return b""
