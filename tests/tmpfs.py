"""A small real tmpfs to fill up, for the tests of a full disk (mounting needs root, as on CI)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

CHUNKS = (1024 * 1024, 4096, 1)


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str = "8m") -> Iterator[Path]:
    """Mounts a tmpfs of `size` on `directory` (created), and always unmounts it (lazily if still busy)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(path: Path) -> int:
    """Writes zeros to `path` until the file system refuses more (ENOSPC); returns the bytes written."""
    written = 0
    with open(path, "ab", buffering=0) as handle:
        for size in CHUNKS:
            block = b"\0" * size
            try:
                while count := handle.write(block):
                    written += count
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


def free_bytes(directory: Path) -> int:
    usage = os.statvfs(directory)
    return usage.f_bavail * usage.f_frsize
