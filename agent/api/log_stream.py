"""`GET /v1/deployments/{id}/logs`: a log file streamed in chunks, optionally followed as it grows.

Files are read in worker threads, a chunk at a time, so neither a slow disk nor a
100 MiB log holds up the event loop or lands in memory at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from agent.api.auth import READ_SCOPE, requires
from agent.api.context import CLOSING, STREAMING, engine_of
from agent.api.params import parse_log_query
from agent.errors import NotFound
from agent.logs import READ_CHUNK_BYTES, log_size, read_chunk

FOLLOW_POLL_S = 0.1
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
        # The headers go out before the first byte, so the offset to resume from is where we start.
        response = await _start(request, resume_offset=start, follow=True)
        try:
            await _follow(request, response, deployment_id, path, start)
        except ConnectionResetError:
            pass  # the client went away
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


async def _follow(
    request: web.Request, response: web.StreamResponse, deployment_id: str, path: Path, offset: int
) -> None:
    """Sends new bytes as they are appended until the deployment is final (or deleted, or the server stops)."""
    engine = engine_of(request)
    closing = request.app[CLOSING]
    final = False
    while not closing.is_set() and not _client_gone(request):
        chunk = await asyncio.to_thread(read_chunk, path, offset, READ_CHUNK_BYTES)
        if chunk:
            await response.write(chunk)
            offset += len(chunk)
            continue
        if final:
            return  # caught up after the deployment ended: everything is sent
        try:
            final = (await engine.get(deployment_id)).is_final
        except NotFound:
            return  # deleted while we followed
        if not final:
            await asyncio.sleep(FOLLOW_POLL_S)
        # When final, loop once more: the last lines may have landed since the read above.


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
