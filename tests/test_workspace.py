"""Preparing workspaces: directory copies, git clones at a ref, failures, cancellation."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import psutil
import pytest

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.models import SourceSpec
from agent.workspace import git_protocol_options, prepare_workspace, redact_url, remove_workspace


@pytest.fixture
def log(tmp_path: Path) -> Iterator[DeploymentLog]:
    with DeploymentLog(tmp_path / "deployment.log") as deployment_log:
        yield deployment_log


def git(cwd: Path, *args: str) -> str:
    """Runs git in `cwd` with a fixed identity and returns its stripped stdout."""
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    completed = subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return completed.stdout.strip()


def commit_file(repository: Path, content: str) -> str:
    (repository / "version.txt").write_text(content)
    git(repository, "add", "version.txt")
    git(repository, "commit", "-q", "-m", content)
    return git(repository, "rev-parse", "HEAD")


@pytest.fixture
def repository(tmp_path: Path) -> dict[str, str]:
    """A repository: v1 (tagged), v2 on branch `feature`, v3 on `main`; maps names to shas."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    shas = {"path": str(root), "v1": commit_file(root, "v1")}
    git(root, "tag", "release-1")
    git(root, "checkout", "-q", "-b", "feature")
    shas["v2"] = commit_file(root, "v2")
    git(root, "checkout", "-q", "main")
    shas["v3"] = commit_file(root, "v3")
    return shas


def log_entries(log: DeploymentLog) -> list[str]:
    return log.path.read_text().splitlines()


async def test_no_source_gives_an_empty_workspace(tmp_path: Path, log: DeploymentLog) -> None:
    """Without a source the workspace is created, parents too, and left empty."""
    dest = tmp_path / "workspaces" / "dep_1"
    await prepare_workspace(None, dest, log)
    assert dest.is_dir() and list(dest.iterdir()) == []


async def test_path_source_is_copied_with_nested_dirs_and_symlinks(tmp_path: Path, log: DeploymentLog) -> None:
    """A path source's nested files are copied and its symlinks stay symlinks."""
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "c.txt").write_text("deep")
    (source / "top.txt").write_text("top")
    (source / "link").symlink_to("a/b/c.txt")
    dest = tmp_path / "ws"
    await prepare_workspace(SourceSpec(type="path", path=str(source)), dest, log)
    assert (dest / "a" / "b" / "c.txt").read_text() == "deep"
    assert (dest / "top.txt").read_text() == "top"
    assert (dest / "link").is_symlink() and os.readlink(dest / "link") == "a/b/c.txt"
    assert any(f"source agent | copying {source} into the workspace" in line for line in log_entries(log))


async def test_missing_path_source_fails_clearly(tmp_path: Path, log: DeploymentLog) -> None:
    """A path that is not a directory is a RuntimeFailure naming it."""
    missing = tmp_path / "missing"
    with pytest.raises(RuntimeFailure, match=f"{missing} is not a directory"):
        await prepare_workspace(SourceSpec(type="path", path=str(missing)), tmp_path / "ws", log)


async def test_git_source_clones_the_default_branch(
    tmp_path: Path, log: DeploymentLog, repository: dict[str, str]
) -> None:
    """Without a ref the clone holds the default branch, and git's output is in the log."""
    dest = tmp_path / "ws"
    await prepare_workspace(SourceSpec(type="git", url=repository["path"]), dest, log)
    assert (dest / "version.txt").read_text() == "v3"
    assert git(dest, "rev-parse", "HEAD") == repository["v3"]
    assert any(" source stderr | Cloning into" in line for line in log_entries(log))


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("feature", "v2"), ("release-1", "v1"), ("main", "v3"), ("sha:v1", "v1"), ("short:v2", "v2")],
)
async def test_git_source_checks_out_a_branch_tag_or_commit(
    tmp_path: Path, log: DeploymentLog, repository: dict[str, str], ref: str, expected: str
) -> None:
    """A ref may name any branch (not only the default), a tag, or a full or short commit sha."""
    if ref.startswith("sha:"):
        ref = repository[ref[4:]]
    elif ref.startswith("short:"):
        ref = repository[ref[6:]][:10]
    dest = tmp_path / "ws"
    await prepare_workspace(SourceSpec(type="git", url=repository["path"], ref=ref), dest, log)
    assert (dest / "version.txt").read_text() == expected
    assert git(dest, "rev-parse", "HEAD") == repository[expected]


async def test_unknown_ref_fails_clearly(tmp_path: Path, log: DeploymentLog, repository: dict[str, str]) -> None:
    """A ref that names nothing in the repository is a RuntimeFailure naming the ref."""
    source = SourceSpec(type="git", url=repository["path"], ref="no-such-branch")
    with pytest.raises(RuntimeFailure, match="'no-such-branch' is not a branch, tag or commit"):
        await prepare_workspace(source, tmp_path / "ws", log)


async def test_bad_git_url_fails_with_gits_reason(tmp_path: Path, log: DeploymentLog) -> None:
    """A clone that fails is a RuntimeFailure with the exit code and git's last error line."""
    url = str(tmp_path / "not-a-repository")
    with pytest.raises(RuntimeFailure) as failure:
        await prepare_workspace(SourceSpec(type="git", url=url), tmp_path / "ws", log)
    message = failure.value.message
    assert message.startswith(f"git clone of {url} failed with exit code 128: ")
    assert "does not exist" in message


async def test_credentials_in_a_git_url_stay_out_of_messages(tmp_path: Path, log: DeploymentLog) -> None:
    """A password in the URL appears neither in the error nor in the log."""
    url = "https://user:s3cret-token@127.0.0.1:1/repo.git"
    with pytest.raises(RuntimeFailure) as failure:
        await prepare_workspace(SourceSpec(type="git", url=url), tmp_path / "ws", log)
    assert "s3cret-token" not in failure.value.message
    assert "s3cret-token" not in log.path.read_text()
    assert redact_url(url) == "https://***@127.0.0.1:1/repo.git"


@pytest.fixture
async def silent_git_server() -> AsyncIterator[int]:
    """A TCP server that accepts git connections and never answers; yields its port."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


def git_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("git") and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_cancelling_a_clone_kills_git(tmp_path: Path, log: DeploymentLog, silent_git_server: int) -> None:
    """Cancelling a hanging clone kills git and its helpers before the cancellation completes."""
    url = f"git://127.0.0.1:{silent_git_server}/repo.git"
    task = asyncio.create_task(prepare_workspace(SourceSpec(type="git", url=url), tmp_path / "ws", log))
    deadline = time.monotonic() + 10
    while not git_children():
        assert not task.done(), task
        assert time.monotonic() < deadline, "git never started"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert git_children() == []


async def test_remove_workspace_deletes_it_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    """remove_workspace deletes the tree, and a second call on the missing tree is fine."""
    dest = tmp_path / "ws"
    (dest / "nested").mkdir(parents=True)
    (dest / "nested" / "file").write_text("x")
    await remove_workspace(dest)
    assert not dest.exists()
    await remove_workspace(dest)


# --- what a path source may hold ---------------------------------------------------------


@pytest.fixture
def hostile_source(tmp_path: Path) -> Path:
    """A source with a FIFO, a /dev/zero node, a unix socket, a symlink to /etc and ordinary files."""
    source = tmp_path / "hostile"
    (source / "sub").mkdir(parents=True)
    (source / "app.sh").write_text("#!/bin/sh\n")
    (source / "app.sh").chmod(0o755)
    (source / "sub" / "data.txt").write_text("data")
    (source / "sub" / "data.txt").chmod(0o644)
    os.mkfifo(source / "pipe")
    os.mknod(source / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: reads never end
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(source / "sub" / "sock"))
    listener.close()
    (source / "etc").symlink_to("/etc")
    (source / "shadow").symlink_to("/etc/shadow")
    return source


async def test_special_files_are_skipped_and_links_copied_as_links(
    tmp_path: Path, log: DeploymentLog, hostile_source: Path
) -> None:
    """Devices, FIFOs and sockets are skipped (one agent line counts them); links stay links, never followed."""
    dest = tmp_path / "ws"
    await asyncio.wait_for(
        prepare_workspace(SourceSpec(type="path", path=str(hostile_source)), dest, log), timeout=10
    )
    assert sorted(p.name for p in dest.iterdir()) == ["app.sh", "etc", "shadow", "sub"]
    assert [p.name for p in (dest / "sub").iterdir()] == ["data.txt"]
    assert (dest / "etc").is_symlink() and os.readlink(dest / "etc") == "/etc"
    assert (dest / "shadow").is_symlink() and os.readlink(dest / "shadow") == "/etc/shadow"
    skipped = [line for line in log_entries(log) if "| skipped" in line]
    assert len(skipped) == 1 and "skipped 3 device file(s), FIFO(s) or socket(s)" in skipped[0]


async def test_copies_are_private_to_the_agents_user(tmp_path: Path, log: DeploymentLog, hostile_source: Path) -> None:
    """Copied files are 0600 (0700 when the owner could execute) and directories 0700."""
    dest = tmp_path / "ws"
    await prepare_workspace(SourceSpec(type="path", path=str(hostile_source)), dest, log)
    assert stat.S_IMODE((dest / "app.sh").stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "sub" / "data.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o700
    assert (dest / "sub" / "data.txt").stat().st_mtime == (hostile_source / "sub" / "data.txt").stat().st_mtime


async def test_a_source_inside_the_state_dir_is_refused_at_copy_time(tmp_path: Path, log: DeploymentLog) -> None:
    """Behind the policy, the copy itself refuses a source that resolves into the state dir."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    link = tmp_path / "innocent"
    link.symlink_to(state / "logs")
    with pytest.raises(RuntimeFailure, match="overlaps the agent's state directory"):
        await prepare_workspace(SourceSpec(type="path", path=str(link)), tmp_path / "ws", log, state_dir=state)


async def test_a_source_containing_the_state_dir_is_refused_at_copy_time(tmp_path: Path, log: DeploymentLog) -> None:
    """A parent of the state dir is refused before anything is copied into the workspace under it."""
    state = tmp_path / "state"
    dest = state / "workspaces" / "dep_1"
    with pytest.raises(RuntimeFailure, match="overlaps the agent's state directory"):
        await prepare_workspace(SourceSpec(type="path", path=str(tmp_path)), dest, log, state_dir=state)
    assert list(dest.iterdir()) == []


async def test_a_source_that_holds_the_workspace_is_refused(tmp_path: Path, log: DeploymentLog) -> None:
    """Without a state dir too, copying a directory into itself is refused instead of recursing."""
    with pytest.raises(RuntimeFailure, match="contains the workspace itself"):
        await prepare_workspace(SourceSpec(type="path", path=str(tmp_path)), tmp_path / "a" / "ws", log)


# --- git protocols -------------------------------------------------------------------------


def test_git_protocol_options_allow_file_only_for_local_urls() -> None:
    """ext is always off; file is on for a local path or file: URL and off for network URLs."""
    for url, file_policy in (("/srv/repo", "always"), ("file:///srv/repo", "always"), ("https://h/r.git", "never")):
        options = git_protocol_options(url)
        assert "protocol.ext.allow=never" in options
        assert f"protocol.file.allow={file_policy}" in options
        assert "submodule.recurse=false" in options


async def test_ext_urls_never_run_their_command(tmp_path: Path, log: DeploymentLog) -> None:
    """An ext:: URL (which would run a shell command) fails the clone and runs nothing."""
    marker = tmp_path / "pwned"
    url = f"ext::sh -c touch% {marker}"
    with pytest.raises(RuntimeFailure, match="git clone of .* failed"):
        await prepare_workspace(SourceSpec(type="git", url=url), tmp_path / "ws", log)
    assert not marker.exists()


async def test_file_urls_clone_without_hardlinking_the_repository(
    tmp_path: Path, log: DeploymentLog, repository: dict[str, str]
) -> None:
    """A local path or file:// repository clones through git's transport: no object file is shared."""
    for index, url in enumerate((repository["path"], f"file://{repository['path']}")):
        dest = tmp_path / f"ws{index}"
        await prepare_workspace(SourceSpec(type="git", url=url), dest, log)
        assert (dest / "version.txt").read_text() == "v3"
        source_inodes = {p.stat().st_ino for p in Path(repository["path"], ".git", "objects").rglob("*") if p.is_file()}
        clone_inodes = {p.stat().st_ino for p in (dest / ".git" / "objects").rglob("*") if p.is_file()}
        assert not source_inodes & clone_inodes


async def test_a_local_repository_in_the_state_dir_is_refused(tmp_path: Path, log: DeploymentLog) -> None:
    """The clone itself refuses a local repository inside the state dir, behind the policy."""
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(RuntimeFailure, match="overlaps the agent's state directory"):
        await prepare_workspace(SourceSpec(type="git", url=f"file://{state}"), tmp_path / "ws", log, state_dir=state)
