"""Prepares a deployment's workspace from its source: a copied directory or a git clone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog, LineSplitter
from agent.models import SourceSpec
from agent.policy import local_git_path

STAGE = "source"
READ_CHUNK_BYTES = 64 * 1024
COPY_CHUNK_BYTES = 1024 * 1024


async def prepare_workspace(
    source: SourceSpec | None, dest: Path, log: DeploymentLog, *, state_dir: Path | None = None
) -> None:
    """Creates `dest` and fills it from `source`; raises RuntimeFailure when that fails.

    `state_dir` is the agent's own directory: a source inside it (or containing it) is refused
    here too, behind the policy check at submit and start.
    """
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    if source is None:
        return
    if source.type == "path" and source.path:
        await _copy_directory(Path(source.path), dest, log, state_dir)
    elif source.type == "git" and source.url:
        await _clone_repository(source.url, source.ref, dest, log, state_dir)
    else:
        raise RuntimeFailure(f"cannot prepare a workspace from source {source!r}")


async def remove_workspace(dest: Path) -> None:
    """Deletes a workspace and everything in it; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(shutil.rmtree, dest)


def refuse_own_paths(source: Path, dest: Path, state_dir: Path | None) -> Path:
    """The realpath of `source`; raises RuntimeFailure when it overlaps the state dir or holds `dest`."""
    real = Path(os.path.realpath(source))
    if state_dir is not None:
        state = Path(os.path.realpath(state_dir))
        if _is_within(real, state) or _is_within(state, real):
            raise RuntimeFailure(
                f"source {source} resolves to {real}, which overlaps the agent's state directory {state}; "
                "refusing to read it"
            )
    if _is_within(Path(os.path.realpath(dest)), real):
        raise RuntimeFailure(f"source {source} resolves to {real}, which contains the workspace itself")
    return real


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


# --- path sources --------------------------------------------------------------------------


@dataclass
class _CopyReport:
    """What a directory copy left out."""

    skipped: list[str] = field(default_factory=list)  # devices, FIFOs and sockets, relative paths
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


async def _copy_directory(source: Path, dest: Path, log: DeploymentLog, state_dir: Path | None) -> None:
    log.agent(STAGE, f"copying {source} into the workspace")
    real = refuse_own_paths(source, dest, state_dir)
    if not await asyncio.to_thread(real.is_dir):
        raise RuntimeFailure(f"source path {source} is not a directory on the agent's host")
    try:
        report = await asyncio.to_thread(copy_tree, real, dest)
    except OSError as exc:
        raise RuntimeFailure(f"copying {source} into the workspace failed: {exc}") from exc
    if report.failures:
        first, why = report.failures[0]
        raise RuntimeFailure(
            f"copying {source} into the workspace failed: {len(report.failures)} file(s) could not be copied, "
            f"first {first}: {why}"
        )
    if report.skipped:
        log.agent(
            STAGE,
            f"skipped {len(report.skipped)} device file(s), FIFO(s) or socket(s) of the source, "
            f"first {report.skipped[0]}: only regular files, directories and symlinks are copied",
        )
    log.agent(STAGE, f"copied {source} into the workspace")


def copy_tree(source: Path, dest: Path) -> _CopyReport:
    """Copies regular files, directories and symlinks (as links) from `source` into `dest`.

    Nothing is followed: a symlink is recreated as the same link wherever it points, and any
    other kind of file (a device, FIFO or socket, whose read may never end) is skipped.
    Copies are readable by the agent's user alone, keeping only the owner's execute bit.
    """
    report = _CopyReport()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    # (source dir, dest dir, relative name); directory times are set once their content is in.
    pending: list[tuple[Path, Path, str]] = [(source, dest, "")]
    finished: list[tuple[Path, os.stat_result]] = []
    while pending:
        directory, target, relative = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            report.failures.append((relative or ".", exc.strerror or str(exc)))
            continue
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            destination = target / entry.name
            try:
                status = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(status.st_mode):
                    os.symlink(os.readlink(entry.path), destination)
                elif stat.S_ISDIR(status.st_mode):
                    _make_directory(destination)
                    pending.append((Path(entry.path), destination, name))
                    finished.append((destination, status))
                elif stat.S_ISREG(status.st_mode):
                    if not _copy_file(Path(entry.path), destination):
                        report.skipped.append(name)
                else:
                    report.skipped.append(name)
            except OSError as exc:
                report.failures.append((name, exc.strerror or str(exc)))
    for directory, status in reversed(finished):
        with contextlib.suppress(OSError):
            os.utime(directory, ns=(status.st_atime_ns, status.st_mtime_ns))
    return report


def _make_directory(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise


def _copy_file(source: Path, destination: Path) -> bool:
    """Copies one regular file's content, mode (owner bits) and times; False if it is no longer regular."""
    # O_NONBLOCK: a file swapped for a FIFO after the scan must not block the open forever.
    reader = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(reader)
        if not stat.S_ISREG(status.st_mode):
            return False
        mode = 0o600 | (status.st_mode & 0o100)
        writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            with open(reader, "rb", closefd=False) as src, open(writer, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)
            os.fchmod(writer, mode)
            os.utime(writer, ns=(status.st_atime_ns, status.st_mtime_ns))
        finally:
            os.close(writer)
    finally:
        os.close(reader)
    return True


# --- git sources ---------------------------------------------------------------------------


def git_protocol_options(url: str) -> list[str]:
    """git `-c` options that allow only network protocols, plus `file` when `url` is a local path.

    `ext::` runs any command and is never allowed; local repositories only when the URL is one
    (the policy has held its path to the source roots). Submodules are never followed.
    """
    file_policy = "always" if local_git_path(url) is not None else "never"
    return [
        "-c", "protocol.ext.allow=never",
        "-c", "protocol.fd.allow=never",
        "-c", f"protocol.file.allow={file_policy}",
        "-c", "submodule.recurse=false",
    ]


async def _clone_repository(
    url: str, ref: str | None, dest: Path, log: DeploymentLog, state_dir: Path | None
) -> None:
    shown = redact_url(url)
    local = local_git_path(url)
    options = git_protocol_options(url)
    clone = ["clone"]
    if local is not None:
        refuse_own_paths(Path(local), dest, state_dir)
        # Copy objects through git's transport: a --local clone hardlinks or copies the
        # repository's files as they are, following symlinks in its objects directory.
        clone.append("--no-local")
    log.agent(STAGE, f"cloning {shown} into the workspace")
    await _run_git([*options, *clone, "--", url, str(dest)], log, f"git clone of {shown}")
    if ref is None:
        return
    commit = await _resolve_ref(dest, ref)
    if commit is None:
        raise RuntimeFailure(f"ref {ref!r} is not a branch, tag or commit of {shown}")
    await _run_git(
        [*options, "-C", str(dest), "checkout", "--detach", commit, "--"], log, f"git checkout of {ref}"
    )
    log.agent(STAGE, f"checked out {ref} at {commit[:12]}")


async def _resolve_ref(repository: Path, ref: str) -> str | None:
    """The commit a branch, tag or sha names; branches first, as `git clone --branch` does."""
    # A fresh clone has only the default branch locally: other branches are origin/<name>.
    for candidate in (f"refs/remotes/origin/{ref}", ref):
        code, output = await _git_output(
            ["-C", str(repository), "rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}"]
        )
        if code == 0 and output:
            return output
    return None


def _git_environment() -> dict[str, str]:
    # Never wait for a password on a terminal nobody watches. GIT_PROTOCOL_FROM_USER=0 denies
    # every protocol whose policy is "user" (remote helpers, and any git does not know as safe).
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_PROTOCOL_FROM_USER": "0"}


async def _start_git(args: list[str]) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            "git",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_git_environment(),
            # Its own process group, so that a kill reaches git's helpers (remote-https, index-pack) too.
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure("git is not installed on the agent's host") from exc


async def _run_git(args: list[str], log: DeploymentLog, action: str) -> None:
    """Runs git, streaming its output into the log; raises RuntimeFailure when it fails."""
    process = await _start_git(args)
    assert process.stdout is not None and process.stderr is not None
    try:
        _, last_error = await asyncio.gather(
            _stream_lines(process.stdout, "stdout", log), _stream_lines(process.stderr, "stderr", log)
        )
        exit_code = await process.wait()
    except BaseException:
        await _kill(process)
        raise
    if exit_code != 0:
        reason = last_error or "no error output"
        raise RuntimeFailure(f"{action} failed with exit code {exit_code}: {reason}", exit_code=exit_code)


async def _git_output(args: list[str]) -> tuple[int, str]:
    """Runs a quick git query and returns its exit code and stripped stdout."""
    process = await _start_git(args)
    try:
        stdout, _ = await process.communicate()
    except BaseException:
        await _kill(process)
        raise
    return process.returncode or 0, stdout.decode("utf-8", errors="replace").strip()


async def _stream_lines(reader: asyncio.StreamReader, stream: str, log: DeploymentLog) -> str | None:
    """Writes a pipe's lines to the log as they come; returns the last non-empty line."""
    splitter = LineSplitter()
    last: str | None = None
    while True:
        chunk = await reader.read(READ_CHUNK_BYTES)
        lines = splitter.feed(chunk) if chunk else splitter.flush()
        log.write_lines(STAGE, stream, lines)
        last = next((line.strip() for line in reversed(lines) if line.strip()), last)
        if not chunk:
            return last


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kills git and its helpers, then reaps it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


def redact_url(url: str) -> str:
    """The URL without any password or token it carries, for logs and error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))
