"""Remote servers over SSH, end to end: a real sshd on loopback and one in a network namespace."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import docker
import psutil

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess
from tests.sshd import SshServer


def remote_agent(agent_factory, *servers: tuple[str, SshServer], **settings: Any) -> AgentProcess:
    return agent_factory(extra_toml="\n".join(server.toml(name) for name, server in servers), **settings)


def process_build(server: str, command: str, **build: Any) -> dict[str, Any]:
    return {"application": "remote", "server": server, "build": {"runtime": "process", "command": command, **build}}


def sshd_sessions(server: SshServer) -> list[psutil.Process]:
    """The sshd processes serving connections (children of the listening sshd)."""
    return psutil.Process(server.process.pid).children()


def test_remote_process_build_streams_output_and_reports_its_pid(agent_factory, sshd, source_dir: Path) -> None:
    """A process build on a remote server: source copied over SFTP, lines streamed, remote PID reported."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    command = "cat index.html; for i in 1 2 3; do echo line-$i; sleep 0.4; done; echo err-line >&2"
    created = agent.submit({**process_build("edge", command), "source": {"type": "path", "path": str(source_dir)}})
    building = agent.wait_for(created["id"], lambda d: d["status"] == "building" and d["pid"])
    remote = psutil.Process(building["pid"])  # the "remote" server is this machine
    assert remote.pid == building["pid"] and building["pid_started_at"]
    assert "line-3" not in agent.log(created["id"]), "the first lines arrive while the build runs"
    final = agent.wait_for(created["id"])
    assert final["status"] == "succeeded", agent.log(created["id"])
    log = agent.log(created["id"])
    assert "build stdout | <h1>hello from source</h1>" in log
    assert "build stdout | line-3" in log and "build stderr | err-line" in log
    assert final["pid"] is None and final["server"] == "edge"


def test_kill_ends_the_remote_process_and_its_children(agent_factory, sshd) -> None:
    """Kill of a remote build signals its process group over SSH; every process of it is gone."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    created = agent.submit(process_build("edge", "sleep 300 & sleep 300 & echo started; wait"))
    building = agent.wait_for(created["id"], lambda d: d["status"] == "building" and d["pid"])
    deadline = time.monotonic() + 10
    while "started" not in agent.log(created["id"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tree = [psutil.Process(building["pid"]), *psutil.Process(building["pid"]).children(recursive=True)]
    assert len(tree) >= 3
    assert agent.request("POST", f"/v1/deployments/{created['id']}/kill").status_code == 202
    assert agent.wait_for(created["id"], timeout=15)["status"] == "cancelled"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []


def test_unknown_host_and_key_mismatch_are_refused_before_anything_runs(agent_factory, sshd, tmp_path: Path) -> None:
    """A server missing from known_hosts, or with another key there, fails the deployment; nothing runs."""
    from tests.sshd import keygen

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    other_key = keygen(tmp_path / "other_host_key").split()[:2]
    mismatch = tmp_path / "known_hosts_mismatch"
    mismatch.write_text(f"[{sshd.host}]:{sshd.port} {other_key[0]} {other_key[1]}\n")
    extra = ""
    for name, known in (("unknown", empty), ("mismatch", mismatch)):
        extra += sshd.toml(name).replace(str(sshd.known_hosts), str(known))
    agent = agent_factory(extra_toml=extra)
    for name in ("unknown", "mismatch"):
        marker = tmp_path / f"ran-{name}"
        created = agent.submit(process_build(name, f"touch {marker}"))
        final = agent.wait_for(created["id"], timeout=30)
        assert final["status"] == "failed"
        assert final["error"]["type"] == "host_key_rejected", final["error"]
        assert "host key" in final["error"]["message"] and name in final["error"]["message"]
        assert not marker.exists()
    servers = {s["name"]: s for s in agent.request("GET", "/v1/servers").json()["data"]}
    assert servers["unknown"]["reachable"] is False and "host key" in servers["unknown"]["error"]


def test_a_dropped_connection_does_not_fail_the_build_and_the_next_one_reconnects(agent_factory, sshd) -> None:
    """The SSH connection dies mid-build: the build goes on on the server, its output follows once the agent is back."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    created = agent.submit(process_build("edge", "echo started; sleep 3; echo finished"))
    agent.wait_for(created["id"], lambda d: d["status"] == "building" and d["pid"])
    for session in sshd_sessions(sshd):
        session.send_signal(signal.SIGKILL)
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(created["id"]))
    log = agent.log(created["id"])
    assert log.count("build stdout | started") == 1 and log.count("build stdout | finished") == 1, log
    again = agent.wait_for(agent.submit(process_build("edge", "echo reconnected"))["id"], timeout=30)
    assert again["status"] == "succeeded", again
    assert "reconnected" in agent.log(again["id"])


def test_servers_endpoint_and_cli_check(agent_factory, sshd) -> None:
    """GET /v1/servers reports reachability, latency and Docker version; the CLI checks one."""
    import os
    import subprocess
    import sys

    from tests.e2e.conftest import ADMIN_TOKEN

    agent = remote_agent(agent_factory, ("edge", sshd))
    servers = agent.request("GET", "/v1/servers").json()["data"]
    assert [s["name"] for s in servers] == ["edge"]
    assert servers[0]["reachable"] is True and servers[0]["latency_ms"] >= 0
    assert servers[0]["docker_version"]
    env = {**os.environ, "DEPLOY_AGENT_URL": agent.url, "DEPLOY_AGENT_TOKEN": ADMIN_TOKEN}
    checked = subprocess.run(
        [sys.executable, "-m", "agent", "servers", "check", "edge"], env=env, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    assert "reachable" in checked.stdout
    assert agent.request("GET", "/v1/servers/nope").status_code == 404


def test_remote_container_build_and_release_through_the_forwarded_docker_socket(
    agent_factory, sshd, docker_client: docker.DockerClient
) -> None:
    """Build and release in the server's Docker engine, health-checked through the SSH connection, promoted,
    then rolled back."""
    from tests.e2e.test_releases import web_request

    agent = remote_agent(agent_factory, ("edge", sshd))
    first = agent.wait_for(agent.submit({**web_request("r1", application="rweb"), "server": "edge"})["id"], timeout=90)
    assert first["status"] == "succeeded", agent.log(first["id"])
    assert "health agent | attempt" in agent.log(first["id"])
    second = agent.wait_for(agent.submit({**web_request("r2", application="rweb"), "server": "edge"})["id"], timeout=90)
    assert second["status"] == "succeeded", agent.log(second["id"])
    # The "remote" engine is this host's, reached through sshd: the release answers here too.
    with urllib.request.urlopen(second["url"], timeout=5) as response:
        assert response.read().decode().strip() == "r2"
    assert containers_of(docker_client, first["id"]) == []
    container = docker_client.containers.get(second["container_id"])
    assert container.labels["deploy-agent.application"] == "rweb"
    # Rollback in the server's engine: the first release's committed image serves again.
    rollback = agent.request("POST", f"/v1/deployments/{first['id']}/rollback")
    assert rollback.status_code == 201, rollback.text
    rolled = agent.wait_for(rollback.json()["id"], timeout=90)
    assert rolled["status"] == "succeeded" and rolled["server"] == "edge", agent.log(rolled["id"])
    assert fetch(rolled["url"]) == "r1"


def test_a_server_with_its_own_address(agent_factory, sshd_remote) -> None:
    """A server in a network namespace at its own address runs a remote process release, checked from the agent."""
    agent = remote_agent(agent_factory, ("far", sshd_remote))
    body = {
        "application": "farweb",
        "server": "far",
        "build": {"runtime": "process", "command": "echo far > index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": {"type": "http", "interval_s": 0.2, "retries": 25, "stable_s": 0.5},
    }
    final = agent.wait_for(agent.submit(body)["id"], timeout=60)
    assert final["status"] == "succeeded", agent.log(final["id"])
    assert final["url"].startswith(f"http://{sshd_remote.host}:")
    with urllib.request.urlopen(final["url"], timeout=5) as response:
        assert response.read().decode().strip() == "far"
    assert agent.request("POST", "/v1/applications/farweb/stop").status_code == 202


def remote_web(version: str, application: str = "rapp") -> dict[str, Any]:
    """A remote process release: busybox httpd serving a page that says `version`, with a heartbeat."""
    return {
        "application": application,
        "server": "edge",
        "build": {"runtime": "process", "command": f"echo {version} > index.html"},
        "run": {
            "runtime": "process",
            "command": f"while :; do echo beat-{version}; sleep 0.2; done & exec busybox httpd -f -p $PORT -h .",
        },
        "health_check": {"type": "http", "interval_s": 0.2, "retries": 25, "stable_s": 0.5},
    }


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode().strip()


def group_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _pgid(p.pid) == pid]


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_remote_release_keeps_serving_across_an_agent_restart(agent_factory, sshd) -> None:
    """SIGKILL of the agent: the remote release keeps running; the restarted agent follows its output
    again and still owns it (the next deployment replaces it and no process of it is left); a remote
    release that was being checked is stopped and removed with its directories."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    first = agent.wait_for(agent.submit(remote_web("v1"))["id"], timeout=60)
    assert first["status"] == "succeeded", agent.log(first["id"])
    checking = agent.submit({
        **remote_web("c1", application="rcheck"),
        "run": {"runtime": "process", "command": "sleep 300 & echo waiting; wait"},
        "health_check": {"type": "tcp", "start_period_s": 60, "interval_s": 0.5, "retries": 100},
    })
    half = agent.wait_for(checking["id"], lambda d: d["status"] == "deploying" and d["pid"], timeout=30)
    half_group = group_of(half["pid"])
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    log_file = agent.state_dir / "logs" / f"{first['id']}.log"
    beats_while_down = log_file.read_text().count("beat-v1")
    time.sleep(1.0)
    assert fetch(first["url"]) == "v1"
    agent.start()
    deadline = time.monotonic() + 15
    while log_file.read_text().count("beat-v1") < beats_while_down + 10:
        assert time.monotonic() < deadline, "the restarted agent does not follow the release's output"
        time.sleep(0.1)
    app = agent.request("GET", "/v1/applications/rapp").json()
    assert app["state"] == "running" and app["pid"] == first["pid"]
    interrupted = agent.get(checking["id"])
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "agent_restarted"
    assert psutil.wait_procs(half_group, timeout=10)[1] == [], "the half-checked remote release was left running"
    for kind in ("releases", "run"):
        assert not (Path.home() / ".deploy-agent" / kind / checking["id"]).exists()
    old_group = group_of(first["pid"])
    assert len(old_group) >= 2

    second = agent.wait_for(agent.submit(remote_web("v2"))["id"], timeout=60)
    assert second["status"] == "succeeded", agent.log(second["id"])
    assert fetch(second["url"]) == "v2"
    gone, alive = psutil.wait_procs(old_group, timeout=10)
    assert alive == [], "the previous release was left running after the restart"


def test_rollback_and_retention_on_a_remote_server(agent_factory, sshd) -> None:
    """Three remote releases with retention 2: the oldest directory is pruned on the server (rollback
    to it is refused with 409), and rollback to the previous one serves it again in its own directory."""
    agent = remote_agent(agent_factory, ("edge", sshd), releases={"retention": 2})
    finals = []
    for version in ("v1", "v2", "v3"):
        final = agent.wait_for(agent.submit(remote_web(version))["id"], timeout=60)
        assert final["status"] == "succeeded", agent.log(final["id"])
        finals.append(final)
    remote_releases = Path.home() / ".deploy-agent" / "releases"
    assert not (remote_releases / finals[0]["id"]).exists(), "retention did not prune the remote directory"
    assert (remote_releases / finals[1]["id"]).is_dir() and (remote_releases / finals[2]["id"]).is_dir()

    refused = agent.request("POST", f"/v1/deployments/{finals[0]['id']}/rollback")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "release_pruned", refused.text

    rollback = agent.request("POST", f"/v1/deployments/{finals[1]['id']}/rollback")
    assert rollback.status_code in (200, 201, 202), rollback.text
    rolled = agent.wait_for(rollback.json()["id"], timeout=60)
    assert rolled["status"] == "succeeded", agent.log(rolled["id"])
    assert rolled["server"] == "edge" and fetch(rolled["url"]) == "v2"
    app = agent.request("GET", "/v1/applications/rapp").json()
    assert app["current_deployment_id"] == rolled["id"] and app["state"] == "running"
    assert (remote_releases / finals[1]["id"]).is_dir()


def test_a_remote_container_build_clones_its_git_source_on_the_server(
    agent_factory, sshd, docker_client: docker.DockerClient
) -> None:
    """A git source of a remote container build is cloned by the server: its URL is a path relative to
    the server login's home, which does not exist from the agent's working directory."""
    import shutil
    import subprocess
    import uuid

    from tests.e2e.test_releases import FAST_CHECK

    relative = Path(f".deploy-agent-test-repos/repo-{uuid.uuid4().hex[:8]}")
    repository = Path.home() / relative
    repository.mkdir(parents=True)
    try:
        git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
        (repository / "index.html").write_text("from-git\n")
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
        agent = remote_agent(agent_factory, ("edge", sshd))
        assert not (Path.cwd() / relative).exists()
        body = {
            "application": "gitweb",
            "server": "edge",
            "source": {"type": "git", "url": str(relative), "ref": "main"},
            "build": {"image": "local/busybox", "command": "test -d /workspace/.git && cat /workspace/index.html"},
            "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080},
            "health_check": FAST_CHECK,
        }
        final = agent.wait_for(agent.submit(body)["id"], timeout=90)
        log = agent.log(final["id"])
        assert final["status"] == "succeeded", log
        assert "on server edge" in log and "build stdout | from-git" in log
        assert fetch(final["url"]) == "from-git"
        assert not (Path.home() / ".deploy-agent" / "workspaces" / final["id"]).exists(), "the clone was left behind"
        assert not list((agent.state_dir / "workspaces").iterdir())
    finally:
        shutil.rmtree(repository.parent, ignore_errors=True)


def test_a_remote_release_that_dies_fails_with_its_exit_code_and_last_output(agent_factory, sshd) -> None:
    """A remote process release exiting during its health check: failed at once, with its code and last words."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {
        **remote_web("v1", application="dying"),
        "run": {"runtime": "process", "command": "echo dying-words; sleep 0.3; exit 7"},
    }
    final = agent.wait_for(agent.submit(body)["id"], timeout=60)
    assert final["status"] == "failed", agent.log(final["id"])
    assert final["error"]["type"] == "release_exited" and final["exit_code"] == 7, final
    assert "dying-words" in final["error"]["message"]


def test_a_container_build_on_a_server_serves_as_a_process_release_from_its_built_workspace(agent_factory, sshd) -> None:
    """Built in the server's Docker, released as a host process there: the release runs in the built workspace."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {
        "application": "mixed",
        "server": "edge",
        "build": {"image": "local/busybox", "command": "echo built-in-a-container > /workspace/index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": {"type": "http", "interval_s": 0.2, "retries": 25, "stable_s": 0.5},
    }
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == "succeeded", agent.log(final["id"])
    assert fetch(final["url"]) == "built-in-a-container"
    assert "copying the built workspace out of" in agent.log(final["id"])
    assert agent.request("POST", "/v1/applications/mixed/stop").status_code == 202


def test_a_remote_release_started_but_never_recorded_is_stopped_after_a_restart(agent_factory, sshd) -> None:
    """A crash between starting a remote release and recording its pid: the restart still finds and stops it."""
    import sqlite3

    agent = remote_agent(agent_factory, ("edge", sshd))
    checking = agent.submit({
        **remote_web("u1", application="unrecorded"),
        "run": {"runtime": "process", "command": "sleep 300 & echo waiting; wait"},
        "health_check": {"type": "tcp", "start_period_s": 60, "interval_s": 0.5, "retries": 100},
    })
    half = agent.wait_for(checking["id"], lambda d: d["status"] == "deploying" and d["pid"], timeout=30)
    group = group_of(half["pid"])
    assert group
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    # What a crash a moment earlier leaves: the release runs, its row knows nothing of it.
    with sqlite3.connect(agent.state_dir / "agent.db") as db:
        db.execute("UPDATE deployments SET release = NULL, pid = NULL, pid_started_at = NULL, url = NULL WHERE id = ?",
                   (checking["id"],))
    agent.start()
    interrupted = agent.wait_for(checking["id"], timeout=30)
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "agent_restarted", interrupted
    assert psutil.wait_procs(group, timeout=10)[1] == [], "the unrecorded remote release was left running"


def test_a_remote_release_container_never_recorded_is_removed_after_a_restart(
    agent_factory, sshd, docker_client: docker.DockerClient
) -> None:
    """The same crash with a container release in the server's engine: its container goes after the restart."""
    import sqlite3

    from tests.e2e.test_releases import web_request

    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {**web_request("u2", application="unrecorded-c", health={"start_period_s": 60}), "server": "edge"}
    checking = agent.submit(body)
    # Its release container started and recorded (at `deploying` the id may still be the build's).
    agent.wait_for(checking["id"], lambda d: d["stage"] == "health" and d["container_id"], timeout=90)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    with sqlite3.connect(agent.state_dir / "agent.db") as db:
        db.execute("UPDATE deployments SET release = NULL, container_id = NULL, pid = NULL, url = NULL WHERE id = ?",
                   (checking["id"],))
    assert containers_of(docker_client, checking["id"])
    agent.start()
    interrupted = agent.wait_for(checking["id"], timeout=30)
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "agent_restarted", interrupted
    assert containers_of(docker_client, checking["id"]) == []
