"""Disk space: how much is free, and which errors mean the disk is full (SQLITE_FULL, ENOSPC)."""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
from pathlib import Path

from agent.errors import DiskFull

# An I/O error of SQLite with less than this free is the disk being full (an fsync or a WAL index that could not grow).
NEARLY_FULL_BYTES = 1024**2


def free_bytes(directory: Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system of `directory`; None when it cannot be read."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free
    return None


def is_sqlite_disk_full(exc: sqlite3.Error, directory: Path) -> bool:
    """Whether SQLite failed for lack of space on the file system of `directory` (the database's)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    primary = code & 0xFF
    if primary == sqlite3.SQLITE_FULL:
        return True
    free = free_bytes(directory)
    return primary == sqlite3.SQLITE_IOERR and free is not None and free < NEARLY_FULL_BYTES


def disk_full_of(exc: sqlite3.Error | OSError, directory: Path) -> DiskFull | None:
    """The DiskFull a store error in `directory` means, or None when it is not about space."""
    if isinstance(exc, sqlite3.Error):
        full = is_sqlite_disk_full(exc, directory)
    else:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        return None
    return DiskFull(
        f"the disk of the store is full ({exc}); free some space in the state directory: "
        "the agent goes on as soon as there is room",
        details={"free_bytes": free_bytes(directory)},
    )


def log_write_failure(error: OSError) -> DiskFull:
    """A deployment whose log could not be written: it goes no further (no release into service, no success)."""
    return DiskFull(
        f"the deployment's log could not be written ({error.strerror or error}); "
        "free some space in the state directory and deploy again"
    )
