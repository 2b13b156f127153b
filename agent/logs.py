"""Deployment log files: one line per output line, stamped with time, stage and stream.

Writers append as output arrives and never hold a whole log in memory; readers
serve a tail, a byte range, or follow the file as it grows. Every line a writer
appends is masked by its `LogPolicy` (no value of the deployment's env appears),
and the file stops growing at the policy's cap (further output is counted, and
one line says how much was dropped). A write that fails (a full disk) is counted
too, never raised: the caller asks the writer's `write_error`.

It runs past 400 lines for a reason: the writer and the readers share one line
format and its growth notices, which belong together.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from agent.clock import parse_time, utc_now

# Not typing.TYPE_CHECKING: importing typing alone costs the log-writing processes (see LogPolicy)
# more than the rest of this module; type checkers treat this name as true all the same.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.models import DeploymentSpec

# A line longer than this is cut into pieces so that one endless line cannot grow memory.
MAX_LINE_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
DEFAULT_MAX_LOG_BYTES = 100 * 1024**2
# Shorter values are too likely to occur by chance (CI systems draw the same line).
MIN_SECRET_CHARS = 8
MASK = "***"
LOG_FILE_MODE = 0o600


class LineSplitter:
    """Turns a stream of byte chunks into complete text lines, a chunk's whole lines in a few C calls."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[str]:
        block = self.feed_block(chunk)
        return [] if block is None else lines_of(block)

    def feed_block(self, chunk: bytes) -> bytes | None:
        """The whole lines `chunk` completes, as bytes joined by newlines (none at the end); None if none.

        Each line is cut at MAX_LINE_BYTES, wherever the chunks that brought it began or ended.
        """
        pending = self._pending
        whole: bytes | None = None
        if not pending:
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                whole = chunk[:cut]
                chunk = chunk[cut + 1 :]
            pending.extend(chunk)
        else:
            pending.extend(chunk)
            cut = pending.rfind(b"\n")
            if cut >= 0:
                whole = bytes(pending[:cut])
                del pending[: cut + 1]
        pieces = [] if whole is None else [_cut_long_lines(whole)]
        while len(pending) >= MAX_LINE_BYTES:
            pieces.append(bytes(pending[:MAX_LINE_BYTES]))
            del pending[:MAX_LINE_BYTES]
        return b"\n".join(pieces) if pieces else None

    def flush(self) -> list[str]:
        if not self._pending:
            return []
        line = _decode(self._pending)
        self._pending.clear()
        return [line]


def _cut_long_lines(whole: bytes) -> bytes:
    """`whole` (lines joined by newlines) with every line of MAX_LINE_BYTES or more cut into pieces."""
    if len(whole) < MAX_LINE_BYTES:
        return whole
    lines = whole.split(b"\n")
    if max(map(len, lines)) < MAX_LINE_BYTES:
        return whole
    # Cut as a line that came in pieces is (see feed_block): the same output gives the same lines.
    cut: list[bytes] = []
    for raw in lines:
        while len(raw) >= MAX_LINE_BYTES:
            cut.append(raw[:MAX_LINE_BYTES])
            raw = raw[MAX_LINE_BYTES:]
        cut.append(raw)
    return b"\n".join(cut)


def lines_of(block: bytes) -> list[str]:
    """The text lines of a block of lines joined by newlines, carriage returns at their ends dropped."""
    text = block.decode("utf-8", errors="replace")
    lines = text.split("\n")
    return [line.rstrip("\r") for line in lines] if "\r" in text else lines


def _decode(raw: bytes | bytearray) -> str:
    return bytes(raw).rstrip(b"\r").decode("utf-8", errors="replace")


# --- policy: what a log may hold ------------------------------------------------------------


class LogPolicy:
    """What one deployment's log may hold: at most `max_bytes`, and none of `secrets` (shown as ***).

    A plain class rather than a dataclass: the processes that write logs beside the agent (a
    build's output pump, a release's supervisor) start once per build or release, and the
    dataclasses module alone costs them several milliseconds of start-up (inspect, ast).
    """

    __slots__ = ("max_bytes", "secrets")

    def __init__(self, max_bytes: int = DEFAULT_MAX_LOG_BYTES, secrets: tuple[str, ...] = ()) -> None:
        self.max_bytes = max_bytes
        self.secrets = secrets

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogPolicy) and (self.max_bytes, self.secrets) == (other.max_bytes, other.secrets)

    def __hash__(self) -> int:
        return hash((self.max_bytes, self.secrets))

    def __repr__(self) -> str:
        return f"LogPolicy(max_bytes={self.max_bytes}, secrets={len(self.secrets)} hidden)"

    @classmethod
    def for_spec(cls, spec: DeploymentSpec, max_bytes: int) -> "LogPolicy":
        """The policy of a deployment's log: its build.env and run.env values masked, capped at `max_bytes`."""
        values: list[str] = []
        if spec.build is not None:
            values += spec.build.env.values()
        if spec.run is not None:
            values += spec.run.env.values()
        return cls(max_bytes=max_bytes, secrets=maskable(values))


# No secrets, the default cap: for logs that are no deployment's (tests, tools).
DEFAULT_POLICY = LogPolicy()


def maskable(values: Iterable[str]) -> tuple[str, ...]:
    """The strings a log masks for these env values, longest first.

    Output is logged line by line, so a multi-line value is masked line by line; lines
    shorter than MIN_SECRET_CHARS are left alone.
    """
    found: set[str] = set()
    for value in values:
        for line in str(value).split("\n"):
            line = line.rstrip("\r")
            if len(line) >= MIN_SECRET_CHARS:
                found.add(line)
    return tuple(sorted(found, key=lambda secret: (-len(secret), secret)))


class Masker:
    """Replaces every occurrence of any secret in a line with ***, overlapping ones as one."""

    def __init__(self, secrets: Iterable[str]) -> None:
        ordered = sorted(set(secrets), key=len, reverse=True)
        # A lookahead finds a match at every position, so secrets that overlap are all found;
        # at one position the longest alternative comes first.
        self._pattern = (
            re.compile("(?=(" + "|".join(re.escape(secret) for secret in ordered) + "))") if ordered else None
        )

    @property
    def active(self) -> bool:
        """Whether there is anything to mask."""
        return self._pattern is not None

    def __call__(self, line: str) -> str:
        if self._pattern is None:
            return line
        spans = [(match.start(), match.end(1)) for match in self._pattern.finditer(line)]
        if not spans:
            return line
        pieces: list[str] = []
        position = 0
        start, end = spans[0]
        for next_start, next_end in spans[1:]:
            if next_start <= end:
                end = max(end, next_end)
                continue
            pieces += (line[position:start], MASK)
            position, start, end = end, next_start, next_end
        pieces += (line[position:start], MASK, line[end:])
        return "".join(pieces)


# --- growth notices, for followers in this process --------------------------------------------


class _GrowthListeners:
    """Callbacks to run when a log file grows or a writer of it closes; writers call them from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copied on change, so that writers read them without the lock.
        self._callbacks: dict[str, tuple[Callable[[], None], ...]] = {}
        # Open writers that dropped output and will note it when they close, by file.
        self._pending_notes: Counter[str] = Counter()

    def add(self, key: str, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks[key] = (*self._callbacks.get(key, ()), callback)

    def remove(self, key: str, callback: Callable[[], None]) -> None:
        with self._lock:
            left = tuple(known for known in self._callbacks.get(key, ()) if known is not callback)
            if left:
                self._callbacks[key] = left
            else:
                self._callbacks.pop(key, None)

    def notify(self, key: str) -> None:
        for callback in self._callbacks.get(key, ()):
            callback()

    def note_pending(self, key: str, delta: int) -> None:
        with self._lock:
            self._pending_notes[key] += delta
            if self._pending_notes[key] <= 0:
                del self._pending_notes[key]

    def has_pending_note(self, key: str) -> bool:
        return self._pending_notes.get(key, 0) > 0


_listeners = _GrowthListeners()


def _key_of(path: Path | str) -> str:
    return os.path.abspath(path)


def watch_growth(path: Path | str, callback: Callable[[], None]) -> Callable[[], None]:
    """Runs `callback` (in the writer's thread) after each write to `path` in this process; returns the undo.

    Writers in other processes (a release supervisor) are not seen: stat the file for those.
    """
    key = _key_of(path)
    _listeners.add(key, callback)
    return lambda: _listeners.remove(key, callback)


def notify_growth(path: Path | str) -> None:
    """Tells this process's followers of `path` that it grew (written by another process, e.g. a build's pump)."""
    _listeners.notify(_key_of(path))


def dropped_note_pending(path: Path | str) -> bool:
    """Whether a writer in this process dropped output of `path` and has not yet written how much."""
    return _listeners.has_pending_note(_key_of(path))


# --- writing ------------------------------------------------------------------------------------


class DeploymentLog:
    """Appends stamped, masked lines to one deployment's log file, up to its cap; safe from any thread.

    Several writers (in this and other processes) may append to one file: the cap is decided on
    the file's real size before each write. Once a line does not fit, this writer writes nothing
    more and only counts; `close` then adds one `agent` line saying how many bytes it dropped.

    Writing never raises into the caller: a write that fails (ENOSPC, EIO, ...) is reported once
    (a warning, and `write_error` from then on), and from then on output lines are only counted,
    not written; `agent` lines are still tried, so that the log says how the deployment ended
    when there is room again. Whoever feeds this writer must keep reading its source (a build's
    output stream) whatever `write_error` says: a reader that stops leaves the producer blocked.
    """

    def __init__(self, path: Path, policy: LogPolicy = DEFAULT_POLICY) -> None:
        self.path = Path(path)
        self.policy = policy
        self.mask = Masker(policy.secrets)
        self._key = _key_of(self.path)
        self._lock = threading.Lock()
        self._closed = False
        self._dropped = 0
        self._dropped_stage = ""
        self._write_error: OSError | None = None
        self._unwritten = 0  # bytes lost to failed writes (not to the cap)
        self._last_stage = "done"
        self._note_pending = False
        # A write cut short left a line without its newline: the next write starts with one.
        self._torn = False
        self._file: io.FileIO | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
            self._file = open(descriptor, "ab", buffering=0)
        except OSError as exc:
            self._failed(exc)

    @property
    def dropped_bytes(self) -> int:
        """How many bytes of output this writer counted instead of writing (over the cap, or lost to failed writes)."""
        return self._dropped + self._unwritten

    @property
    def full(self) -> bool:
        """Whether this writer has stopped writing output: the log reached its cap, or a write failed."""
        return self._dropped > 0 or self._write_error is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def write_error(self) -> OSError | None:
        """The first write of this writer that failed (e.g. ENOSPC), or None while every write succeeded."""
        return self._write_error

    def count_dropped(self, stage: str, byte_count: int) -> None:
        """Counts output of a full log as dropped without having read it (e.g. a remote file's new bytes)."""
        if byte_count <= 0:
            return
        with self._lock:
            if self._closed:
                return
            if self._write_error is not None and not self._dropped:
                self._unwritten += byte_count
                return
            self._mark_note_pending()
            self._dropped += byte_count
            self._dropped_stage = stage

    def hand_over(self) -> dict[str, int | str] | None:
        """What this writer would note at close (bytes dropped at the cap, bytes lost to failed writes), no longer its to note.

        For a writer in another process (a build's pump) whose counts the agent's own writer of
        the same log takes over (`take_over`): one note for the log, and a failed write decides
        the deployment's end. None when there is nothing to note.
        """
        with self._lock:
            if not self._dropped and self._write_error is None:
                return None
            report: dict[str, int | str] = {"dropped": self._dropped, "stage": self._dropped_stage}
            if self._write_error is not None:
                report.update(unwritten=self._unwritten, errno=self._write_error.errno or errno.EIO,
                              error=self._write_error.strerror or str(self._write_error))
            self._dropped, self._write_error, self._unwritten = 0, None, 0
            return report

    def take_over(self, report: dict[str, int | str]) -> None:
        """Counts what another writer of this log handed over (see hand_over) as this writer's own."""
        dropped, unwritten = int(report.get("dropped", 0)), int(report.get("unwritten", 0))
        if dropped > 0:
            self.count_dropped(str(report.get("stage") or "build"), dropped)
        if "errno" in report:
            with self._lock:
                if self._closed:
                    return
                self._unwritten += unwritten
                self._failed(OSError(int(report["errno"]), str(report.get("error", ""))))

    def write_block(self, stage: str, stream: str, block: bytes) -> None:
        """Output lines as bytes joined by newlines (LineSplitter.feed_block), in a few C calls in the usual case.

        The usual case: UTF-8 text, no carriage return, nothing to mask, room in the log. Anything
        else goes line by line through write_lines, which repairs, masks and cuts at the cap.
        """
        if not self.mask.active and b"\r" not in block:
            try:
                block.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                prefix = f"{utc_now()} {stage} {stream} | ".encode("utf-8")
                data = prefix + block.replace(b"\n", b"\n" + prefix) + b"\n"
                with self._lock:
                    if self._closed:
                        return
                    if self._dropped and self._write_error is None:
                        self._dropped += len(data)  # what write_lines would count, line by line
                        return
                    if self._write_error is None and len(data) <= self.policy.max_bytes - self._size():
                        self._last_stage = stage
                        if self._append(data):
                            _listeners.notify(self._key)
                        return
        self.write_lines(stage, stream, lines_of(block))

    def write(self, stage: str, stream: str, text: str) -> None:
        self.write_lines(stage, stream, text.splitlines() or [""])

    def write_lines(self, stage: str, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        prefix = f"{utc_now()} {stage} {stream} | "
        with self._lock:
            if self._closed:
                return
            if self._write_error is not None and stream != "agent":
                self._unwritten += sum(len(prefix.encode("utf-8")) + 1 + len(line.encode("utf-8")) for line in lines)
                return
            room = 0 if self._dropped else self.policy.max_bytes - self._size()
            # All lines at once, with whole-string operations: the usual case, while the log has room.
            # Masking the joined lines is masking each: no secret holds a newline (see maskable).
            block = self.mask("\n".join(lines)).replace("\n", "\n" + prefix)
            data = f"{prefix}{block}\n".encode("utf-8")
            if len(data) <= room:
                self._last_stage = stage
                if not self._append(data):
                    return
                _listeners.notify(self._key)
                return
            kept: list[bytes] = []
            for index, line in enumerate(lines):
                data = f"{prefix}{self.mask(line)}\n".encode("utf-8")
                if len(data) > room:
                    self._drop(stage, prefix, lines[index:], len(data))
                    break
                kept.append(data)
                room -= len(data)
            self._last_stage = stage
            if not kept or not self._append(b"".join(kept)):
                return
        _listeners.notify(self._key)

    def _size(self) -> int:
        if self._file is None:
            return 0
        try:
            return os.fstat(self._file.fileno()).st_size
        except OSError:
            return 0

    def _append(self, data: bytes) -> bool:
        """Writes all of `data`, continuing a short write; on failure counts the rest. True when all of it is written."""
        if self._file is None:
            self._unwritten += len(data)
            return False
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        while view:
            try:
                written = self._file.write(view)
                if not written:
                    # No progress at all: the disk refuses more, as a full one does.
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                self._torn = self._torn or len(view) < len(data)
                self._unwritten += len(view)
                self._failed(exc)
                return False
            view = view[written:]
        self._torn = False
        return True

    def _failed(self, exc: OSError) -> None:
        if self._write_error is not None:
            return
        self._write_error = exc
        self._mark_note_pending()
        # Imported here: the build output pump (a process per build) writes logs without structlog's start-up cost.
        import structlog

        structlog.get_logger("agent.logs").warning(
            "writing a deployment log failed; its output is counted, not written", path=str(self.path), error=str(exc)
        )

    def _mark_note_pending(self) -> None:
        if not self._note_pending:
            self._note_pending = True
            _listeners.note_pending(self._key, 1)

    def _drop(self, stage: str, prefix: str, lines: list[str], first_bytes: int) -> None:
        # Counted unmasked: masking output that is thrown away would only cost time.
        overhead = len(prefix.encode("utf-8")) + 1
        self._mark_note_pending()
        self._dropped += first_bytes + sum(overhead + len(line.encode("utf-8")) for line in lines[1:])
        self._dropped_stage = stage

    def agent(self, stage: str, message: str) -> None:
        """A stage message of the agent itself (stream `agent`)."""
        self.write(stage, "agent", message)

    def close(self) -> None:
        """Closes the file, first noting how much output was dropped or lost, if any; closing twice is fine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                notes = []
                if self._dropped:
                    notes.append(
                        f"{utc_now()} {self._dropped_stage} agent | {self._dropped} bytes of output dropped: "
                        f"the log reached agent.max_log_bytes ({self.policy.max_bytes} bytes)\n"
                    )
                if self._write_error is not None:
                    notes.append(
                        f"{utc_now()} {self._last_stage} agent | {self._unwritten} bytes of output "
                        f"could not be written to the log: {self._write_error.strerror or self._write_error}\n"
                    )
                if notes:
                    self._append("".join(notes).encode("utf-8"))
            finally:
                if self._file is not None:
                    with contextlib.suppress(OSError):
                        self._file.close()
                if self._note_pending:
                    _listeners.note_pending(self._key, -1)
        _listeners.notify(self._key)

    def __enter__(self) -> "DeploymentLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- reading ------------------------------------------------------------------------------------


def parse_log_line(raw: str) -> tuple[float, str, str, str] | None:
    """A line as `write_lines` writes it, `STAMP STAGE STREAM | TEXT`, as (unix seconds, stage, stream, text)."""
    head, separator, text = raw.partition(" | ")
    fields = head.split(" ")
    if not separator or len(fields) != 3:
        return None
    try:
        stamp = parse_time(fields[0])
    except ValueError:
        return None
    return stamp.timestamp(), fields[1], fields[2], text


def replace_beside_log(path: Path, text: str) -> None:
    """Replaces a file kept beside a log (a build's cursor, its pump's record) in one step, readable by the agent alone.

    A kill leaves the old content or the new one, never half of one.
    """
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_FILE_MODE)
    with open(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


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
