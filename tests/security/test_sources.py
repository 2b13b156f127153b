"""Sources: host paths only from source_roots, never the agent's own state or config; special files skipped."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import ADMIN_TOKEN, WRITE_TOKEN, AgentProcess
from tests.security.conftest import assert_error

FIELD = "source.path"


def path_request(path: str | Path, command: str = "ls -la /workspace") -> dict[str, Any]:
    return {
        "application": "src",
        "source": {"type": "path", "path": str(path)},
        "build": {"image": "local/busybox", "command": command},
    }


def git_request(url: str) -> dict[str, Any]:
    return {
        "application": "src",
        "source": {"type": "git", "url": url},
        "build": {"image": "local/busybox", "command": "ls -la /workspace"},
    }


def make_repo(directory: Path) -> Path:
    """A git repository with one commit holding index.html."""
    directory.mkdir(parents=True)
    (directory / "index.html").write_text("from git\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(["git", "-C", str(directory), *args], check=True, env=env)
    return directory


@contextlib.contextmanager
def outside_roots() -> Iterator[Path]:
    """A directory outside the test's tmp dir, the agent's only source root."""
    directory = Path(tempfile.mkdtemp(prefix="deploy-agent-outside-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def assert_no_deployments(agent: AgentProcess) -> None:
    assert agent.request("GET", "/v1/deployments").json()["data"] == []


@pytest.mark.parametrize("token", [WRITE_TOKEN, ADMIN_TOKEN], ids=["write", "admin"])
def test_etc_is_refused(agent: AgentProcess, token: str) -> None:
    """`source.path = /etc` (outside source_roots) is 403 naming source.path, for any token."""
    assert_error(agent.request("POST", "/v1/deployments", json=path_request("/etc"), token=token), 403, "forbidden", FIELD)
    assert_no_deployments(agent)


def test_the_state_dir_is_refused_even_under_a_source_root(agent: AgentProcess) -> None:
    """state_dir and any path inside it are 403 although source_roots holds their parent."""
    for path in (agent.state_dir, agent.state_dir / "logs", agent.state_dir / "workspaces"):
        assert path.is_dir(), path
        assert_error(agent.request("POST", "/v1/deployments", json=path_request(path)), 403, "forbidden", FIELD)
    assert_no_deployments(agent)


def test_the_config_directory_is_refused_even_under_a_source_root(agent: AgentProcess) -> None:
    """The directory of the agent's config file (tokens in plain text) is 403 although it is under a root."""
    response = agent.request("POST", "/v1/deployments", json=path_request(agent.config_path.parent))
    assert_error(response, 403, "forbidden", FIELD)
    assert_no_deployments(agent)


def test_symlinks_and_dot_dots_are_resolved_before_the_root_check(agent: AgentProcess, tmp_path: Path) -> None:
    """A link inside a root to /etc or to the state dir, and `..` out of a root, are 403 (realpath)."""
    (tmp_path / "etc-link").symlink_to("/etc")
    (tmp_path / "state-link").symlink_to(agent.state_dir)
    (tmp_path / "inner").mkdir()
    for path in (tmp_path / "etc-link", tmp_path / "state-link", f"{tmp_path}/inner/../../../../etc"):
        assert_error(agent.request("POST", "/v1/deployments", json=path_request(path)), 403, "forbidden", FIELD)
    assert_no_deployments(agent)


def test_a_path_outside_every_root_is_refused(agent: AgentProcess) -> None:
    """Any directory outside source_roots is 403, however harmless."""
    with outside_roots() as outside:
        (outside / "index.html").write_text("outside\n")
        assert_error(agent.request("POST", "/v1/deployments", json=path_request(outside)), 403, "forbidden", FIELD)
    assert_error(agent.request("POST", "/v1/deployments", json=path_request("/usr")), 403, "forbidden", FIELD)
    assert_no_deployments(agent)


def test_local_git_urls_are_held_to_the_same_rule(agent: AgentProcess) -> None:
    """A git url that is a local path or file: URL outside the roots, or into the state dir, is 403."""
    with outside_roots() as outside:
        repo = make_repo(outside / "repo")
        for url in (str(repo), f"file://{repo}", "file:///etc", "/etc", f"file://{agent.state_dir}"):
            response = agent.request("POST", "/v1/deployments", json=git_request(url))
            body = assert_error(response, 403, "forbidden")
            assert "source" in body["error"]["message"], body
    assert_no_deployments(agent)


def test_a_local_git_repository_under_a_root_still_deploys(agent: AgentProcess, tmp_path: Path) -> None:
    """The rule refuses what is outside the roots only: a repository under a root clones and builds."""
    repo = make_repo(tmp_path / "repo")
    for url in (str(repo), f"file://{repo}"):
        final = agent.wait_for(agent.submit(git_request(url))["id"], timeout=60)
        assert final["status"] == "succeeded", (final, agent.log(final["id"]))
        assert "index.html" in agent.log(final["id"])


def test_git_ext_transport_never_runs_a_command(agent: AgentProcess, tmp_path: Path) -> None:
    """An `ext::` git url is refused or fails; the command it names never runs on the host."""
    marker = tmp_path / "ext-ran"
    response = agent.request("POST", "/v1/deployments", json=git_request(f"ext::sh -c touch% {marker}"))
    if response.status_code == 201:
        final = agent.wait_for(response.json()["id"], timeout=60)
        assert final["status"] == "failed", final
    else:
        assert_error(response, response.status_code)
        assert response.status_code in (403, 422), response.text
    assert not marker.exists(), "git ran the ext:: command on the agent's host"


def test_a_source_that_contains_the_state_dir_never_copies_it(agent: AgentProcess, tmp_path: Path) -> None:
    """A source holding the state and config dirs: refused (403), or copied without them, quickly."""
    command = "find /workspace -name 'agent.db*' -o -name '*.toml' -o -name 'dep_*.log' | sed 's/^/FOUND /'; echo listed"
    response = agent.request("POST", "/v1/deployments", json=path_request(tmp_path, command))
    if response.status_code != 201:
        assert_error(response, 403, "forbidden", FIELD)
        return
    final = agent.wait_for(response.json()["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    log = agent.log(final["id"])
    assert "build stdout | listed" in log
    assert "FOUND" not in log, log
    assert ADMIN_TOKEN not in log


def test_symlinks_are_copied_as_links_never_followed(agent: AgentProcess, source_dir: Path, tmp_path: Path) -> None:
    """Links to /etc/shadow and to a file outside the source arrive as links; no target content is read."""
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("outside-marker-5d1e0c\n")
    (source_dir / "shadow").symlink_to("/etc/shadow")
    (source_dir / "escape").symlink_to("../outside-secret.txt")
    (source_dir / "absolute").symlink_to(outside)
    command = (
        "for f in shadow escape absolute; do test -L /workspace/$f && echo LINK $f $(readlink /workspace/$f); "
        "cat /workspace/$f; done; echo done"
    )
    final = agent.wait_for(agent.submit(path_request(source_dir, command))["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(final["id"]))
    log = agent.log(final["id"])
    assert "LINK shadow /etc/shadow" in log, log
    assert "LINK escape ../outside-secret.txt" in log, log
    assert f"LINK absolute {outside}" in log, log
    assert "outside-marker-5d1e0c" not in log
    # local/busybox has no /etc/shadow, so any line of one in the log is the host's.
    for line in Path("/etc/shadow").read_text().splitlines():
        if line.strip():
            assert line not in log, f"host /etc/shadow line in the build log: {line.split(':')[0]}"


def test_fifos_devices_and_sockets_in_a_source_are_skipped(agent: AgentProcess, source_dir: Path) -> None:
    """A FIFO, a /dev/zero node and a socket in the source: the build runs at once and sees none of them."""
    os.mkfifo(source_dir / "fifo")
    os.mknod(source_dir / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    listener = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(source_dir)  # a relative name: unix socket paths are limited to ~107 bytes
    try:
        listener.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        command = "for f in fifo zero sock; do test -e /workspace/$f -o -L /workspace/$f && echo HAS $f; done; cat /workspace/index.html"
        began = time.monotonic()
        final = agent.wait_for(agent.submit(path_request(source_dir, command))["id"], timeout=30)
        assert final["status"] == "succeeded", (final, agent.log(final["id"]))
        assert time.monotonic() - began < 30
        log = agent.log(final["id"])
        assert "build stdout | <h1>hello from source</h1>" in log, log
        assert "HAS" not in log, log
    finally:
        listener.close()
