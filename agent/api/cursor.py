"""The opaque cursor of `GET /v1/deployments`: `c` + the hex sequence number to continue below."""

from __future__ import annotations

import re

from agent.models import MAX_SQLITE_INTEGER

_CURSOR = re.compile(r"c[0-9a-f]{1,16}")


def encode_cursor(seq: int | None) -> str | None:
    """The cursor of the page after `seq`; None when there is no next page."""
    return None if seq is None else f"c{seq:x}"


def decode_cursor(text: str) -> int:
    """Raises ValueError for anything that is not a cursor this agent handed out."""
    # At most 16 hex digits, and below 2**63: the sequence is compared with a SQLite integer.
    if not _CURSOR.fullmatch(text):
        raise ValueError("not a cursor")
    seq = int(text[1:], 16)
    if seq > MAX_SQLITE_INTEGER:
        raise ValueError("not a cursor")
    return seq
