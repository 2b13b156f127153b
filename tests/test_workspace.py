"""Preparing workspaces: directory copies, git clones at a ref, failures, cancellation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import psutil
import pytest

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.models import SourceSpec
from agent.workspace import prepare_workspace, redact_url, remove_workspace


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
