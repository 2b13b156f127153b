"""`GET /v1/deployments/{id}/logs`: a log file streamed in chunks, optionally followed as it grows.

Files are read in worker threads, a chunk at a time, so neither a slow disk nor a
100 MiB log holds up the event loop or lands in memory at once.

Follow streams share one watcher per application (`LogFollowers`), so that an idle
stream costs a sleeping coroutine and nothing more: writers in this process wake the
streams of their file as they write; one slow poll stats every followed file (for
writers in other processes, such as a host-process release's supervisor), checks
whether its deployment is final, and ends streams whose client went away. All the
streams of one file share that stat and that status check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from agent.api.auth import READ_SCOPE, requires
from agent.api.context import CLOSING, STREAMING, TOKEN_NAME, engine_of
from agent.api.params import parse_log_query
from agent.errors import NotFound, TooManyFollowers
from agent.logs import READ_CHUNK_BYTES, dropped_note_pending, log_size, read_chunk, watch_growth

if TYPE_CHECKING:
    from agent.engine import Engine

# How often every followed file is stat'ed and every stream's client checked.
WATCH_POLL_S = 0.5
# How often a followed deployment's status is read when no writer here says something happened.
STATUS_POLL_S = 1.0
# The least time between two status reads of one deployment, however busy its writers.
STATUS_MIN_INTERVAL_S = 0.1
# The least time between two wake-ups of one file's streams: a busy writer wakes them in batches.
MIN_WAKE_INTERVAL_S = 0.05
# After the final status, how long a stream waits for a writer here to note the bytes it dropped.
DROPPED_NOTE_WAIT_S = 2.0
RETRY_AFTER_S = 5
_STREAM_HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@requires(READ_SCOPE)
async def get_logs(request: web.Request) -> web.StreamResponse:
    """The log so far (or its tail, or from an offset), optionally followed until the deployment is final."""
    options = parse_log_query(request.query)
    engine = engine_of(request)
    deployment_id = request.match_info["id"]
    path = Path((await engine.get(deployment_id)).log_path)
    if options.tail is not None:
        start, end = await asyncio.to_thread(tail_bounds, path, options.tail)
    else:
        end = await asyncio.to_thread(log_size, path)
        start = options.offset or 0
    if options.follow:
        followers = followers_of(request.app)
        try:
            follower = followers.join(request, deployment_id, path)
        except TooManyFollowers as exc:
            # Refused before the response starts, so the client gets the envelope.
            return web.json_response(exc.to_envelope(), status=exc.status, headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            # The headers go out before the first byte, so the offset to resume from is where we start.
            response = await _start(request, resume_offset=start, follow=True)
            try:
                await _follow(response, follower, start)
            except ConnectionResetError:
                pass  # the client went away
        finally:
            followers.leave(follower)
        return response
    response = await _start(request, resume_offset=end, follow=False)
    try:
        await _send_range(response, path, min(start, end), end)
    except ConnectionResetError:
        pass
    return response


async def _start(request: web.Request, *, resume_offset: int, follow: bool) -> web.StreamResponse:
    headers = {**_STREAM_HEADERS, "X-Log-Offset": str(resume_offset)}
    if follow:
        headers["X-Accel-Buffering"] = "no"  # a reverse proxy must pass lines on as they come
    response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    request[STREAMING] = True
    return response


async def _send_range(response: web.StreamResponse, path: Path, start: int, end: int) -> None:
    """Sends the file's bytes [start, end): exactly what X-Log-Offset promised, even if it grows meanwhile."""
    offset = start
    while offset < end:
        chunk = await asyncio.to_thread(read_chunk, path, offset, min(READ_CHUNK_BYTES, end - offset))
        if not chunk:
            return  # the file went away (deleted meanwhile)
        await response.write(chunk)
        offset += len(chunk)


async def _follow(response: web.StreamResponse, follower: "_Follower", offset: int) -> None:
    """Sends new bytes as they are appended until the deployment is final (or deleted, or the server stops)."""
    followed = follower.followed
    loop = asyncio.get_running_loop()
    note_deadline: float | None = None
    while True:
        # Cleared before reading: a wake-up during the read is then not lost.
        follower.woken.clear()
        if follower.gone():
            return
        if followed.error is not None:
            raise followed.error
        final = followed.final
        chunk = await asyncio.to_thread(read_chunk, followed.path, offset, READ_CHUNK_BYTES)
        if chunk:
            await response.write(chunk)
            offset += len(chunk)
            continue
        if final:
            # Final before that read: everything written before the final status is sent. A writer
            # here that dropped output notes it when it closes, just after the final status.
            if not dropped_note_pending(followed.path):
                return
            if note_deadline is None:
                note_deadline = loop.time() + DROPPED_NOTE_WAIT_S
            if loop.time() >= note_deadline:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(note_deadline):
                    await follower.woken.wait()
            continue
        await follower.woken.wait()


# --- the shared watcher ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Follower:
    """One follow stream: its request, the file it follows, and the event that wakes it."""

    request: web.Request
    token: str
    followed: "_FollowedLog"
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    def gone(self) -> bool:
        """The server is shutting down or the client went away."""
        return self.followed.closing.is_set() or _client_gone(self.request)


class _FollowedLog:
    """A followed log file: one stat, one status check and one writer subscription for all its streams."""

    def __init__(self, engine: "Engine", closing: asyncio.Event, deployment_id: str, path: Path) -> None:
        self.engine = engine
        self.closing = closing
        self.deployment_id = deployment_id
        self.path = path
        self.followers: set[_Follower] = set()
        self.size: int | None = None
        self.final = False  # the deployment reached a final status, or is gone
        self.error: BaseException | None = None  # reading the status failed: the streams end with it
        self._loop = asyncio.get_running_loop()
        self._wake_pending = False
        self._last_wake = 0.0
        self.last_status_read = 0.0
        self._status_timer: asyncio.TimerHandle | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._read_again = False
        self._stop_watching = watch_growth(path, self._on_write)

    def wake(self) -> None:
        for follower in self.followers:
            follower.woken.set()

    def want_status(self) -> None:
        """Reads the deployment's status soon, at most every STATUS_MIN_INTERVAL_S."""
        if self.final:
            return
        if self._status_task is not None:
            self._read_again = True  # the read under way may predate what happened
            return
        if self._status_timer is None:
            delay = max(0.0, self.last_status_read + STATUS_MIN_INTERVAL_S - self._loop.time())
            self._status_timer = self._loop.call_later(delay, self._start_status_read)

    def close(self) -> None:
        self._stop_watching()
        if self._status_timer is not None:
            self._status_timer.cancel()
        if self._status_task is not None:
            self._status_task.cancel()

    def _on_write(self) -> None:
        # In the writer's thread. One wake-up is pending at a time: it covers every write before it.
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to wake
            self._loop.call_soon_threadsafe(self._wake_soon)

    def _wake_soon(self) -> None:
        delay = self._last_wake + MIN_WAKE_INTERVAL_S - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._wake_for_writer)
        else:
            self._wake_for_writer()

    def _wake_for_writer(self) -> None:
        # Cleared before the wake-up, so that a write after this point asks for the next one.
        self._wake_pending = False
        self._last_wake = self._loop.time()
        self.wake()
        # The engine writes its last line, then sets the final status, then closes its writer.
        self.want_status()

    def _start_status_read(self) -> None:
        self._status_timer = None
        self._status_task = asyncio.ensure_future(self._read_status())

    async def _read_status(self) -> None:
        try:
            while True:
                self._read_again = False
                self.last_status_read = self._loop.time()
                try:
                    self.final = (await self.engine.get(self.deployment_id)).is_final
                except NotFound:
                    self.final = True  # deleted while followed
                except Exception as exc:  # noqa: BLE001 - the streams report it; the watcher goes on
                    self.error = exc
                    self.final = True
                if self.final:
                    self.wake()
                    return
                if not self._read_again:
                    return
                await asyncio.sleep(STATUS_MIN_INTERVAL_S)
        finally:
            self._status_task = None


class LogFollowers:
    """The follow streams of one application: their caps, and one watcher for all their files."""

    def __init__(self) -> None:
        self._logs: dict[str, _FollowedLog] = {}  # by deployment id
        self._per_token: Counter[str] = Counter()
        self._count = 0
        self._watcher: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """How many follow streams are open."""
        return self._count

    def join(self, request: web.Request, deployment_id: str, path: Path) -> _Follower:
        """Admits one more stream of `deployment_id`'s log, or raises TooManyFollowers."""
        engine = engine_of(request)
        settings = engine.config.agent
        token = request.get(TOKEN_NAME) or ""
        if self._count >= settings.max_log_followers:
            raise TooManyFollowers(
                f"{self._count} log streams are open already (agent.max_log_followers = "
                f"{settings.max_log_followers}); try again later"
            )
        if self._per_token[token] >= settings.max_log_followers_per_token:
            raise TooManyFollowers(
                f"token {token} has {self._per_token[token]} log streams open already "
                f"(agent.max_log_followers_per_token = {settings.max_log_followers_per_token}); try again later"
            )
        followed = self._logs.get(deployment_id)
        if followed is None:
            followed = self._logs[deployment_id] = _FollowedLog(engine, request.app[CLOSING], deployment_id, path)
            followed.want_status()
        follower = _Follower(request, token, followed)
        followed.followers.add(follower)
        self._count += 1
        self._per_token[token] += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch(request.app[CLOSING]))
        return follower

    def leave(self, follower: _Follower) -> None:
        """Ends one stream's membership; the last stream of a file stops its watch, the last of all the poll."""
        followed = follower.followed
        followed.followers.discard(follower)
        self._count -= 1
        self._per_token[follower.token] -= 1
        if self._per_token[follower.token] <= 0:
            del self._per_token[follower.token]
        if not followed.followers and self._logs.get(followed.deployment_id) is followed:
            del self._logs[followed.deployment_id]
            followed.close()
        if not self._logs and self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self, closing: asyncio.Event) -> None:
        """Every WATCH_POLL_S: stats every followed file, reads due statuses, wakes streams that must end."""
        loop = asyncio.get_running_loop()
        while self._logs:
            if closing.is_set():
                await asyncio.sleep(WATCH_POLL_S)  # streams still writing their last bytes
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_POLL_S):
                        await closing.wait()
            logs = list(self._logs.values())
            sizes = await asyncio.to_thread(_sizes, [followed.path for followed in logs])
            now = loop.time()
            for followed, size in zip(logs, sizes):
                if size != followed.size:
                    followed.size = size
                    followed.wake()
                if now - followed.last_status_read >= STATUS_POLL_S:
                    followed.want_status()
                for follower in followed.followers:
                    if follower.gone():
                        follower.woken.set()


_followers: weakref.WeakKeyDictionary[web.Application, LogFollowers] = weakref.WeakKeyDictionary()


def followers_of(app: web.Application) -> LogFollowers:
    """The follow streams of `app`, created with its first one."""
    followers = _followers.get(app)
    if followers is None:
        followers = _followers[app] = LogFollowers()
    return followers


def _sizes(paths: list[Path]) -> list[int | None]:
    sizes: list[int | None] = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(None)
    return sizes


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def tail_bounds(path: Path, lines: int) -> tuple[int, int]:
    """Where the last `lines` lines of the file begin, and where the file ends.

    Scans backwards a block at a time keeping only counts, so memory stays flat however
    many lines are asked for; a final newline ends the last line rather than starting a
    new one (the same rule as agent.logs.read_tail).
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return 0, 0
    with handle:
        end = handle.seek(0, os.SEEK_END)
        if lines <= 0 or end == 0:
            return end, end
        handle.seek(end - 1)
        position = end - 1 if handle.read(1) == b"\n" else end
        wanted = lines
        while position > 0:
            size = min(READ_CHUNK_BYTES, position)
            position -= size
            handle.seek(position)
            block = handle.read(size)
            found = block.count(b"\n")
            if found < wanted:
                wanted -= found
                continue
            index = len(block)
            for _ in range(wanted):
                index = block.rindex(b"\n", 0, index)
            return position + index + 1, end
        return 0, end
