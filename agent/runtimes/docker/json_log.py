"""A build container's json-file log, read straight from the disk of an engine on this host.

Read through the engine's logs endpoint, every line costs dockerd a JSON decode and an HTTP
frame on top of the encode it already did to write it, on the cores the builds and the API
share; and a followed logs request can end before it reached the end of the file once the
container stopped. Read from the file, a line costs one slice of a batch parsed in one call,
and the copy ends exactly where the file does: dockerd has closed the log before it reports
the container stopped.
"""

from __future__ import annotations

import orjson
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# How long the reader sleeps at the end of the file before looking for more.
POLL_S = 0.05
# A batch's parse, join and split each hold the GIL for one C call: kept well under a
# millisecond, so that the event loop gets the GIL back as quickly as the switch interval says.
_READ_BYTES = 128 * 1024
# Docker rotates the file to this name (max-file 2): a resumed copy may still have to finish it.
ROTATED_SUFFIX = ".1"

# One log entry as Docker writes it: "log" (a line, or a piece of one: Docker splits lines at
# 16 KiB and never puts two lines in one entry), "stream" ("stdout", "stderr"), "time".
Entry = dict[str, Any]


@dataclass(frozen=True)
class FilePosition:
    """Where a copy is in the file: its inode (which survives Docker's rename) and the byte after the last entry."""

    inode: int
    offset: int


def readable_log_path(details: dict[str, object]) -> Path | None:
    """The container's json-file log when this process can read it, else None (the engine is elsewhere)."""
    value = details.get("LogPath")
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    container_id = str(details.get("Id") or "")
    # The path is the engine's; it names this container's log only if it holds its id.
    if not container_id or container_id not in path.name or not os.access(path, os.R_OK):
        return None
    return path


class JsonLogReader:
    """Hands out a json-file log's entries in batches, from a position on, following the file as it grows."""

    def __init__(self, path: Path, start: FilePosition | None = None) -> None:
        self._path = path
        self._start = start
        self.position = FilePosition(0, 0)
        # Set when the entries at `start` were rotated away before the copy resumed.
        self.lost_entries = False

    def batches(
        self, ended: Callable[[], bool], closing: threading.Event, wake: threading.Event | None = None
    ) -> Iterator[list[Entry]]:
        """Entries as they come, until the file is read to its end after `ended()` or `closing` is set.

        At the file's end it sleeps until `wake` is set (the container's exit: its last lines are
        read at once, not a poll later) or POLL_S pass; without `wake`, until `closing`.
        """
        sleeper = wake or closing
        handle = self._open()
        try:
            pending = b""
            while not closing.is_set():
                # Looked at before the read: once the container stopped, the file is complete.
                finished = ended()
                data = handle.read(_READ_BYTES)
                if data:
                    pending += data
                    cut = pending.rfind(b"\n") + 1
                    if cut:
                        whole, pending = pending[:cut], pending[cut:]
                        self.position = FilePosition(self.position.inode, self.position.offset + cut)
                        yield parse_entries(whole)
                    continue
                if self._rotated(handle):
                    # Docker renamed the file and writes a new one: this one is complete, go on there.
                    handle.close()
                    handle = open(self._path, "rb")
                    pending = b""
                    self.position = FilePosition(os.fstat(handle.fileno()).st_ino, 0)
                    continue
                if finished:
                    return
                sleeper.wait(POLL_S)
        finally:
            handle.close()

    def _open(self):  # type: ignore[no-untyped-def]
        start = self._start
        if start is not None:
            for candidate in (self._path, self._path.with_name(self._path.name + ROTATED_SUFFIX)):
                try:
                    handle = open(candidate, "rb")
                except FileNotFoundError:
                    continue
                if os.fstat(handle.fileno()).st_ino == start.inode:
                    handle.seek(start.offset)
                    self.position = start
                    return handle
                handle.close()
            self.lost_entries = True
        handle = open(self._path, "rb")
        self.position = FilePosition(os.fstat(handle.fileno()).st_ino, 0)
        return handle

    def _rotated(self, handle) -> bool:  # type: ignore[no-untyped-def]
        try:
            return os.stat(self._path).st_ino != os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False  # the container is being removed: what is left is read from the open file


def parse_entries(whole: bytes) -> list[Entry]:
    """The entries of whole json-file lines, parsed in one call (JSON strings hold no raw newline)."""
    try:
        objects = orjson.loads(b"[" + whole[:-1].replace(b"\n", b",") + b"]")
        if all(type(entry) is dict for entry in objects):
            return objects
    except orjson.JSONDecodeError:
        pass
    # A line torn by a crash of the engine, or not Docker's: each line on its own, the bad ones passed over.
    entries: list[Entry] = []
    for line in whole.split(b"\n"):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("log"), str):
            entries.append(entry)
    return entries
