"""Prepares a deployment's workspace from its source: a copied directory or a git clone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import urllib.parse
from pathlib import Path

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog, LineSplitter
from agent.models import SourceSpec

STAGE = "source"
READ_CHUNK_BYTES = 64 * 1024


async def prepare_workspace(source: SourceSpec | None, dest: Path, log: DeploymentLog) -> None:
    """Creates `dest` and fills it from `source`; raises RuntimeFailure when that fails."""
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    if source is None:
        return
    if source.type == "path" and source.path:
        await _copy_directory(Path(source.path), dest, log)
    elif source.type == "git" and source.url:
        await _clone_repository(source.url, source.ref, dest, log)
    else:
        raise RuntimeFailure(f"cannot prepare a workspace from source {source!r}")


async def remove_workspace(dest: Path) -> None:
    """Deletes a workspace and everything in it; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(shutil.rmtree, dest)


# --- path sources --------------------------------------------------------------------------


async def _copy_directory(source: Path, dest: Path, log: DeploymentLog) -> None:
    log.agent(STAGE, f"copying {source} into the workspace")
    if not await asyncio.to_thread(source.is_dir):
        raise RuntimeFailure(f"source path {source} is not a directory on the agent's host")
    try:
        await asyncio.to_thread(shutil.copytree, source, dest, symlinks=True, dirs_exist_ok=True)
    except shutil.Error as exc:
        failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        if failures:
            first_source, _, why = failures[0]
            detail = f"{len(failures)} file(s) could not be copied, first {first_source}: {why}"
        else:
            detail = str(exc)
        raise RuntimeFailure(f"copying {source} into the workspace failed: {detail}") from exc
    except OSError as exc:
        raise RuntimeFailure(f"copying {source} into the workspace failed: {exc}") from exc
    log.agent(STAGE, f"copied {source} into the workspace")


# --- git sources ---------------------------------------------------------------------------


async def _clone_repository(url: str, ref: str | None, dest: Path, log: DeploymentLog) -> None:
    shown = redact_url(url)
    log.agent(STAGE, f"cloning {shown} into the workspace")
    await _run_git(["clone", "--", url, str(dest)], log, f"git clone of {shown}")
    if ref is None:
        return
    commit = await _resolve_ref(dest, ref)
    if commit is None:
        raise RuntimeFailure(f"ref {ref!r} is not a branch, tag or commit of {shown}")
    await _run_git(["-C", str(dest), "checkout", "--detach", commit, "--"], log, f"git checkout of {ref}")
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
    # Never wait for a password on a terminal nobody watches.
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0"}


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
