"""A build's output, read back from its container's Docker log into the deployment log.

Docker keeps what a build writes while the agent is away (its json-file log); the copier
reads that log (from the file itself when the engine runs on this host, see json_log, else
through the engine's logs endpoint), and a cursor file next to the deployment log
(`logs/<id>.build-cursor`) says how far the copy got, so that a restarted agent continues
exactly there: no line lost, none repeated.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import docker
from docker.types.daemon import CancellableStream

from agent.logs import MAX_LINE_BYTES, READ_CHUNK_BYTES, DeploymentLog, LineSplitter, replace_beside_log
from agent.runtimes.docker.gateway import explain
from agent.runtimes.docker.frames import whole_frames
from agent.runtimes.docker.json_log import Entry, FilePosition, JsonLogReader

BUILD_CURSOR_SUFFIX = ".build-cursor"
# How often, at most, the copy's cursor is written: per line would cost the API its speed.
CURSOR_SAVE_S = 0.25
_READ_BYTES = 256 * 1024
# A text of this many characters is at most MAX_LINE_BYTES long in UTF-8.
_MAX_CHARS = MAX_LINE_BYTES // 4
ROTATED_AWAY = "Docker's log no longer holds all the output written while the agent was away"


@dataclass(frozen=True)
class BuildCursor:
    """How far a build's output was copied: Docker's frame and the deployment log's size just after it.

    `stamp` is the Docker timestamp of the last frame copied and `frames` how many frames carried
    it up to there (the pieces of a long line share one stamp); `log_bytes` is the log's size
    once the lines of those frames were written; `since` is where to read Docker's log from
    again (Unix seconds, a little before `stamp`). A copy from the log file also keeps the
    file's inode and the byte after the last entry copied (both 0 otherwise). A cursor is only
    taken where no line is unfinished, so that lines are split the same way when the copy resumes.
    """

    stamp: str
    frames: int
    log_bytes: int
    since: int
    inode: int = 0
    offset: int = 0

    @property
    def file_position(self) -> FilePosition | None:
        """Where a copy from the log file stopped; None for a copy through the logs endpoint."""
        return FilePosition(self.inode, self.offset) if self.inode else None


def cursor_path(log_path: Path) -> Path:
    """The cursor file of a deployment's build output: `logs/<id>.build-cursor`."""
    return Path(log_path).with_suffix(BUILD_CURSOR_SUFFIX)


def load_cursor(path: Path) -> BuildCursor | None:
    """The saved cursor, or None when there is none (or it is unreadable: the copy starts over)."""
    try:
        fields = json.loads(path.read_text())
        return BuildCursor(
            str(fields["stamp"]), int(fields["frames"]), int(fields["log_bytes"]), int(fields["since"]),
            int(fields.get("inode", 0)), int(fields.get("offset", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cursor(path: Path, cursor: BuildCursor) -> None:
    """Replaces the cursor file in one step: a kill leaves the old cursor or the new one, never half of one."""
    replace_beside_log(path, json.dumps(asdict(cursor)))


def remove_cursor(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def count_output_lines(log_path: Path, offset: int, stage: str) -> int:
    """How many output lines (stdout, stderr) of `stage` the log holds after byte `offset`."""
    wanted = (f" {stage} stdout | ".encode(), f" {stage} stderr | ".encode())
    count = 0
    pending = b""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(READ_CHUNK_BYTES):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                count += sum(1 for line in lines if _is_output_of(line, wanted))
    except FileNotFoundError:
        return 0
    return count + (1 if pending and _is_output_of(pending, wanted) else 0)


def _is_output_of(line: bytes, wanted: tuple[bytes, bytes]) -> bool:
    # "<time> <stage> <stream> | <text>": the time holds no space, so the marker sits after the first one.
    space = line.find(b" ")
    return space >= 0 and line.startswith(wanted, space)


def docker_time(value: str | None) -> float | None:
    """A Docker timestamp (RFC 3339, nanoseconds) as Unix seconds; None for Docker's zero time or garbage."""
    if not value or value.startswith("0001-"):
        return None
    try:
        head, _, rest = value.partition(".")
        moment = datetime.strptime(head[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    digits = "".join(character for character in rest[:9] if character.isdigit())
    return moment.timestamp() + (int(digits) / 10 ** len(digits) if digits else 0.0)


def open_build_logs(client: docker.DockerClient, container_id: str, since: int | None) -> CancellableStream:
    """The container's Docker log (stdout, stderr, timestamps), followed until it stops; raw multiplexed bytes.

    The SDK's `logs` drops which stream a frame came from, so the endpoint is read here, the
    way the SDK itself reads it. Runs in a pool thread.
    """
    api = client.api
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": 1, "tail": "all"}
    if since is not None and since > 0:
        params["since"] = since
    response = api._get(api._url("/containers/{0}/logs", container_id), params=params, stream=True)
    api._raise_for_status(response)
    # No read timeout: a build may print nothing for longer than the client's timeout.
    api._disable_socket_timeout(api._get_raw_response_socket(response))

    return CancellableStream(_body_of(response), response)


def _body_of(response: Any) -> Iterator[bytes]:
    """The response body as it arrives: all that has come in per read, without waiting for a full buffer.

    Docker sends each log frame as an HTTP chunk of its own, and the HTTP client hands chunks
    over one at a time: a build printing fast would cost one trip through the copier per line.
    Read from the connection's buffer directly (as the SDK reaches its socket), a read takes
    every chunk that is waiting, and the copier handles them as one batch.
    """
    source = response.raw._fp  # the http.client response under urllib3's
    connection = source.fp
    if not source.chunked:
        while data := connection.read1(_READ_BYTES):
            yield data
        return
    dechunker = _Dechunker()
    while not dechunker.done and (data := connection.read1(_READ_BYTES)):
        if body := dechunker.feed(data):
            yield body


class _Dechunker:
    """Undoes HTTP/1.1 chunked transfer coding, fed as bytes arrive."""

    def __init__(self) -> None:
        self.done = False
        self._buffer = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is still to come

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer
        buffer += data
        position, end = 0, len(buffer)
        pieces: list[bytes] = []
        while position < end and not self.done:
            if self._left:
                take = min(self._left, end - position)
                pieces.append(bytes(buffer[position : position + take]))
                position += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if end - position < 2:
                    break
                position += 2
                self._crlf = False
            else:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
                position = line_end + 2
                self.done = size == 0
                self._left = size
        del buffer[:position]
        return b"".join(pieces)


class _Position:
    """Where a copy is in Docker's log: the last frame's stamp and how many frames carried each stamp still in play."""

    def __init__(self) -> None:
        self.stamp = ""
        self._counts: dict[str, int] = {}
        # Each stream's unfinished line (Docker's partial messages), by the stamp its pieces share.
        self.unfinished: dict[str, str] = {}

    def see(self, stream: str, stamp: str, complete: bool) -> int:
        """Counts one frame; returns how many frames carried its stamp so far."""
        count = self._counts.get(stamp, 0) + 1
        self._counts[stamp] = count
        self.stamp = stamp
        if complete:
            self.unfinished.pop(stream, None)
        else:
            self.unfinished[stream] = stamp
        if len(self._counts) > 3:
            # Only the last stamp and those of unfinished lines can be carried by a later frame.
            in_play = {stamp, *self.unfinished.values()}
            self._counts = {key: value for key, value in self._counts.items() if key in in_play}
        return count

    def count_of(self, stamp: str) -> int:
        return self._counts.get(stamp, 0)


class BuildOutputCopier:
    """Copies a build container's Docker log into the deployment log, from a cursor on; runs in a pool thread.

    On a first run it copies everything. When resumed from `cursor`, frames up to the cursor are
    passed over, and then the first `skip_lines` output lines, which the log got after the cursor
    was saved. Lines are batched per read, and the cursor is saved at most every CURSOR_SAVE_S,
    after the lines it covers.
    """

    def __init__(
        self, log: DeploymentLog, stage: str, cursor_file: Path, cursor: BuildCursor | None = None, skip_lines: int = 0
    ) -> None:
        self._log = log
        self._stage = stage
        self._cursor_file = cursor_file
        self._resume_at = cursor
        self._skip_lines = skip_lines
        self._first_frame = True
        self._splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        self._position = _Position()
        self._batch: list[tuple[str, list[str]]] = []
        self._saved_at = time.monotonic()
        self._unsaved = False
        # When output last came in (monotonic): a drain waits while it still does.
        self.last_data_at = self._saved_at
        self._file: FilePosition | None = None

    def copy(self, stream: CancellableStream, closing: threading.Event | None = None) -> None:
        """Copies until the stream ends (the container stopped) or is closed (`closing`: on purpose)."""
        buffer = bytearray()
        try:
            for chunk in stream:
                self.last_data_at = time.monotonic()
                buffer += chunk
                del buffer[: self._take_frames(buffer)]
                self._write_batch()
                self._save_cursor_now_and_then()
        except Exception as exc:  # noqa: BLE001 - a broken stream loses output, not the build
            if closing is None or not closing.is_set():
                self._log.agent(self._stage, f"the output stream broke: {explain(exc)}")
        finally:
            self._finish(closing)

    def copy_file(self, reader: JsonLogReader, ended: threading.Event, closing: threading.Event) -> None:
        """Copies from the log file until it is read to its end after `ended`, or `closing` is set.

        Resumed, the reader starts at the cursor's file position, so no frame needs passing
        over: only the lines the log got after the cursor was saved.
        """
        self._resume_at = None
        try:
            batches = reader.batches(ended.is_set, closing, wake=ended)
            for batch in batches:
                if reader.lost_entries:
                    self._log.agent(self._stage, ROTATED_AWAY)
                    reader.lost_entries, self._skip_lines = False, 0
                self.last_data_at = time.monotonic()
                self._take_entries(batch)
                self._write_batch()
                self._file = reader.position
                self._save_cursor_now_and_then()
        except Exception as exc:  # noqa: BLE001 - an unreadable log loses output, not the build
            if not closing.is_set():
                self._log.agent(self._stage, f"reading the build's log file failed: {explain(exc)}")
        finally:
            self._finish(closing)

    def _finish(self, closing: threading.Event | None) -> None:
        if closing is None or not closing.is_set():
            # The container's last line may lack its newline; let go on purpose, it is read again later.
            for name, splitter in self._splitters.items():
                self._emit(name, splitter.flush())
        self._write_batch()

    def _take_frames(self, buffer: bytearray) -> int:
        """Handles every whole frame in `buffer`; returns how many bytes they took."""
        frames, used = whole_frames(buffer)
        for stream, payload in frames:
            self._take_frame(stream, payload)
        return used

    def _take_entries(self, entries: list[Entry]) -> None:
        """Entries of the log file, a run of one stream's at a time, with whole-string operations where they can be."""
        streams = [entry.get("stream") or "stdout" for entry in entries]
        texts = [entry["log"] for entry in entries]
        if not entries:
            return
        if streams.count(streams[0]) == len(streams):
            self._take_run(streams[0], texts, str(entries[-1].get("time") or ""))
            return
        start = 0
        while start < len(entries):
            stop = _run_end(streams, start)
            self._take_run(streams[start], texts[start:stop], str(entries[stop - 1].get("time") or ""))
            start = stop

    def _take_run(self, stream: str, texts: list[str], last_stamp: str) -> None:
        block = "".join(texts)
        # Whole lines only (one newline per entry), after no unfinished one: split in one call.
        if stream in self._position.unfinished or block.count("\n") != len(texts) or max(map(len, texts)) > _MAX_CHARS:
            for text in texts:
                self._take_text(stream, last_stamp, text)
            return
        lines = block[:-1].split("\n")
        self._emit(stream, [line.rstrip("\r") for line in lines] if "\r" in block else lines)
        # For the cursor's stamp; a copy from the file resumes at its file position, never by frames.
        self._position.see(stream, last_stamp, True)
        self._unsaved = True

    def _take_text(self, stream: str, stamp: str, text: str) -> None:
        """One entry of the log file: a line, or a piece of one (Docker splits lines at 16 KiB)."""
        whole = stream not in self._position.unfinished and text.find("\n") == len(text) - 1 and len(text) <= _MAX_CHARS
        # Counted for the cursor only: a resumed copy from the file seeks, it never passes frames over.
        self._position.see(stream, stamp, text.endswith("\n"))
        if whole:
            self._emit(stream, [text[:-1].rstrip("\r")])
        else:
            self._emit(stream, self._splitters[stream].feed(text.encode("utf-8")))
        self._unsaved = True

    def _take_frame(self, stream: str, payload: bytes) -> None:
        stamp, _, text = payload.partition(b" ")
        stamp_text = stamp.decode("ascii", "replace")
        # A whole line in one frame (the usual case), after no unfinished one: no splitting needed.
        whole = (
            stream not in self._position.unfinished and len(text) <= MAX_LINE_BYTES
            and text.find(b"\n") == len(text) - 1
        )
        count = self._position.see(stream, stamp_text, text.endswith(b"\n"))
        if self._resume_at is not None:
            if self._first_frame and _rotated_past(stamp_text, self._resume_at):
                self._log.agent(self._stage, ROTATED_AWAY)
                self._resume_at, self._skip_lines = None, 0
            else:
                self._first_frame = False
                if stamp_text == self._resume_at.stamp and count >= self._resume_at.frames:
                    self._resume_at = None  # this frame was the cursor's: the next one is new
                return
        self._first_frame = False
        if whole:
            # Exactly what LineSplitter makes of it, at a fraction of the cost.
            self._emit(stream, [text[:-1].rstrip(b"\r").decode("utf-8", errors="replace")])
        else:
            self._emit(stream, self._splitters[stream].feed(text))
        self._unsaved = True

    def _emit(self, stream: str, lines: list[str]) -> None:
        if self._skip_lines and lines:
            skipped = min(self._skip_lines, len(lines))
            self._skip_lines -= skipped
            lines = lines[skipped:]
        if not lines:
            return
        if self._batch and self._batch[-1][0] == stream:
            self._batch[-1][1].extend(lines)
        else:
            self._batch.append((stream, lines))

    def _write_batch(self) -> None:
        for stream, lines in self._batch:
            self._log.write_lines(self._stage, stream, lines)
        self._batch = []

    def _save_cursor_now_and_then(self) -> None:
        # Only where no line is unfinished: the lines after it are then split alike on a resume.
        if not self._unsaved or self._position.unfinished or self._resume_at is not None:
            return
        now = time.monotonic()
        if now - self._saved_at < CURSOR_SAVE_S:
            return
        stamp = self._position.stamp
        seconds = docker_time(stamp)
        if seconds is None:
            return
        at = self._file or FilePosition(0, 0)
        cursor = BuildCursor(
            stamp=stamp, frames=self._position.count_of(stamp), log_bytes=self._log_size(), since=int(seconds) - 1,
            inode=at.inode, offset=at.offset,
        )
        save_cursor(self._cursor_file, cursor)
        self._saved_at, self._unsaved = now, False

    def _log_size(self) -> int:
        try:
            return os.stat(self._log.path).st_size
        except FileNotFoundError:
            return 0


def _run_end(streams: list[str], start: int) -> int:
    """Where the run of entries of one stream that begins at `start` ends."""
    stream, index = streams[start], start + 1
    while index < len(streams) and streams[index] == stream:
        index += 1
    return index


def _rotated_past(stamp: str, cursor: BuildCursor) -> bool:
    """Whether the first frame Docker still has comes well after the cursor: the frames between were rotated away."""
    seconds, at = docker_time(stamp), docker_time(cursor.stamp)
    # A second of slack: stdout and stderr are stamped apart and written in either order.
    return seconds is not None and at is not None and seconds > at + 1.0
