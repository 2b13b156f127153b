"""The command line against the real daemon, as an operator uses it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.e2e.conftest import ADMIN_TOKEN, AgentProcess


def cli(agent_url: str, *args: str, token: str = ADMIN_TOKEN, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEPLOY_AGENT_URL": agent_url, "DEPLOY_AGENT_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def test_submit_follow_ls_show_logs_rm(agent: AgentProcess, source_dir: Path) -> None:
    """submit --follow prints the build's lines and exits 0; ls, show, logs and rm work on the result."""
    submitted = cli(
        agent.url, "submit", "--app", "clitest", "--image", "local/busybox", "--source-path", str(source_dir),
        "--command", "cat index.html; echo KEY=$KEY", "--env", "KEY=viacli", "--follow",
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "build stdout | <h1>hello from source</h1>" in submitted.stdout
    assert "build stdout | KEY=viacli" in submitted.stdout
    deployment_id = re.search(r"dep_[0-9a-z]+", submitted.stdout + submitted.stderr).group(0)

    listed = cli(agent.url, "ls", "--app", "clitest")
    assert listed.returncode == 0 and deployment_id in listed.stdout and "succeeded" in listed.stdout
    shown = cli(agent.url, "show", deployment_id, "--json")
    assert json.loads(shown.stdout)["status"] == "succeeded"
    logs = cli(agent.url, "logs", deployment_id, "--tail", "2")
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 2
    removed = cli(agent.url, "rm", deployment_id)
    assert removed.returncode == 0
    missing = cli(agent.url, "show", deployment_id)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_wait_exits_with_the_builds_code_143_when_killed_and_69_without_an_agent(agent: AgentProcess) -> None:
    """--wait exits with a failed build's own code (like `docker run`), 143 when the deployment is
    killed meanwhile, 69 when no agent answers; kill through the CLI cancels a running build."""
    failed = cli(agent.url, "submit", "--app", "clifail", "--image", "local/busybox", "--command", "exit 4", "--wait")
    assert failed.returncode == 4, failed.stderr
    assert "failed" in failed.stdout + failed.stderr
    env = {**os.environ, "DEPLOY_AGENT_URL": agent.url, "DEPLOY_AGENT_TOKEN": ADMIN_TOKEN}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "agent", "submit", "-q", "--wait", "--app", "clikill", "--image", "local/busybox",
         "--command", "sleep 60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert waiting.stdout is not None
    deployment_id = waiting.stdout.readline().strip()
    assert deployment_id.startswith("dep_")
    agent.wait_for(deployment_id, lambda d: d["status"] == "building" and d["container_id"])
    killed = cli(agent.url, "kill", deployment_id)
    assert killed.returncode == 0, killed.stderr
    # The long poll of --wait sees the change at once: well before its 20 s poll would end.
    assert waiting.wait(timeout=15) == 143
    assert agent.get(deployment_id)["status"] == "cancelled"
    unreachable = cli("http://127.0.0.1:9", "ls")
    assert unreachable.returncode == 69 and unreachable.stderr.startswith("error: cannot reach the agent")


def test_logs_follow_prints_lines_as_they_arrive(agent: AgentProcess) -> None:
    """`logs -f` shows a line while the build is still running, then ends when it is final."""
    created = agent.submit(
        {"application": "clifollow", "build": {"image": "local/busybox", "command": "echo first; sleep 2; echo second"}}
    )
    env = {**os.environ, "DEPLOY_AGENT_URL": agent.url, "DEPLOY_AGENT_TOKEN": ADMIN_TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "logs", "-f", created["id"]], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    first_seen = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "build stdout | first" in line:
            first_seen = agent.get(created["id"])["status"]
    assert process.wait(timeout=30) == 0
    assert first_seen == "building", "the first line should arrive while the build still runs"
    assert any("build stdout | second" in line for line in lines)


def test_unix_socket_listener(agent_factory, tmp_path: Path) -> None:
    """With listen = unix:/path the API and the CLI work over the socket."""
    agent = agent_factory("unixsock", start=False)
    socket_path = tmp_path / "api.sock"
    text = agent.config_path.read_text()
    agent.config_path.write_text(re.sub(r'listen = "[^"]+"', f'listen = "unix:{socket_path}"', text))
    output = open(agent.output_path, "ab")
    agent.process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(agent.config_path)], stdout=output, stderr=output
    )
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert time.monotonic() < deadline, agent.output()
        time.sleep(0.05)
    url = f"unix:{socket_path}"
    submitted = cli(url, "submit", "--app", "unixapp", "--image", "local/busybox", "--command", "echo via-socket", "--follow")
    assert submitted.returncode == 0, submitted.stderr
    assert "via-socket" in submitted.stdout
    # The daemon's own log lines are JSON, bound to the deployment they concern.
    agent.stop()
    events = [json.loads(line) for line in agent.output().splitlines() if line.startswith("{")]
    bound = [event for event in events if event.get("event") == "status changed"]
    assert bound and all(event["deployment_id"].startswith("dep_") for event in bound)
    assert ADMIN_TOKEN not in agent.output()


def test_schedules_from_the_command_line(agent: AgentProcess) -> None:
    """schedules add/ls/show/edit/pause/resume/trigger/runs/rm, as tables and as JSON."""
    added = cli(agent.url, "schedules", "add", "--app", "clijobs", "--every", "3600", "--image", "local/busybox",
                "--command", "echo from the schedule", "--max-retries", "1", "--timeout", "60", "--json")
    assert added.returncode == 0, added.stderr
    schedule = json.loads(added.stdout)
    sid = schedule["id"]
    assert schedule["config"]["max_retries"] == 1 and schedule["config"]["timeout_s"] == 60
    listed = cli(agent.url, "schedules", "ls")
    assert listed.returncode == 0 and sid in listed.stdout and "every 3600s" in listed.stdout
    assert listed.stdout.splitlines()[0].split()[:4] == ["ID", "NAME", "APPLICATION", "SCHEDULE"]
    edited = cli(agent.url, "schedules", "edit", sid, "--cron", "30 4 * * *", "--timezone", "Asia/Shanghai")
    assert edited.returncode == 0 and "next: " in edited.stdout, edited.stderr
    shown = json.loads(cli(agent.url, "schedules", "show", sid, "--json").stdout)
    assert shown["schedule"] == {"type": "cron", "expression": "30 4 * * *", "timezone": "Asia/Shanghai"}
    assert shown["upcoming_runs_at"][0].endswith("T20:30:00.000Z")  # 04:30 in Shanghai

    paused = cli(agent.url, "schedules", "pause", sid)
    assert paused.returncode == 0 and f"{sid} paused" in paused.stdout
    triggered = cli(agent.url, "schedules", "trigger", sid)
    assert triggered.returncode == 0, triggered.stderr
    run_id = re.search(r"dep_[0-9a-z]+", triggered.stdout).group(0)
    assert agent.wait_for(run_id)["status"] == "succeeded"
    runs = cli(agent.url, "schedules", "runs", sid)
    assert runs.returncode == 0 and run_id in runs.stdout and "manual" in runs.stdout
    resumed = cli(agent.url, "schedules", "resume", sid)
    assert resumed.returncode == 0 and f"{sid} active" in resumed.stdout
    assert cli(agent.url, "schedules", "rm", sid).returncode == 0
    archived = cli(agent.url, "schedules", "ls", "--status", "archived")
    assert sid in archived.stdout and "archived" in archived.stdout
    refused = cli(agent.url, "schedules", "pause", sid)
    assert refused.returncode == 1 and "archived" in refused.stderr and "Traceback" not in refused.stderr
    bad = cli(agent.url, "schedules", "add", "--app", "x", "--cron", "not cron", "--image", "local/busybox",
              "--command", "true")
    assert bad.returncode == 1 and "schedule.expression" in bad.stderr
    usage = cli(agent.url, "schedules")
    assert usage.returncode == 2 and "ls, show, add" in usage.stderr
