"""Docker's multiplexed stream (attach and logs of a container without a TTY), cut into frames.

Standard library only: the build output pump (a process of its own) reads it too.
"""

from __future__ import annotations

# A frame is an 8-byte header (stream, 3 zero bytes, big-endian length), then its payload.
FRAME_HEADER = 8
STREAM_NAMES = {1: "stdout", 2: "stderr"}


def whole_frames(buffer: bytes | bytearray) -> tuple[list[tuple[str, bytes]], int]:
    """The whole frames at the start of `buffer` as (stream, payload), and how many bytes they took."""
    frames: list[tuple[str, bytes]] = []
    position, end = 0, len(buffer)
    while end - position >= FRAME_HEADER:
        length = int.from_bytes(buffer[position + 4 : position + FRAME_HEADER], "big")
        start = position + FRAME_HEADER
        if end - start < length:
            break
        frames.append((STREAM_NAMES.get(buffer[position], "stderr"), bytes(buffer[start : start + length])))
        position = start + length
    return frames, position
