"""Nothing a host-process release starts escapes its end: a setsid'd double-fork child dies with it.

The real daemon runs each such release in a cgroup of its own (where the host has cgroup v2):
kill, stop and replacement end the escaped child too, and leave no cgroup behind.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
import requests

from agent.runtimes.cgroups import ReleaseCgroups, agent_label, discover_base, v2_mount
from tests.e2e.conftest import AgentProcess
from tests.runtimes.test_cgroups import DOUBLE_FORK, gone
from tests.security.conftest import wait_until
from tests.security.test_host_processes import FAST_CHECK, PROCESS_TOKEN, PROCESS_TOKEN_TOML

pytestmark = pytest.mark.skipif(
    discover_base() is None, reason="needs a writable cgroup v2 hierarchy (root, or a delegated cgroup)"
)
DEADLINE_S = 20.0


def cgroup_of(pid: int) -> Path:
    """The cgroup2 directory of a process, as the kernel reports it in /proc/<pid>/cgroup."""
    mount = v2_mount()
    assert mount is not None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].strip().lstrip("/")
    raise AssertionError(f"process {pid} has no cgroup2 line")


class Escapes:
    """Host-process releases whose command double-forks a setsid'd child; all of them killed at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.source = root / "escape-src"
        self.source.mkdir()
        (self.source / "index.html").write_text("ok\n")
        (self.source / "fork.py").write_text(DOUBLE_FORK)
        self.pid_files: list[Path] = []

    def request(self, application: str, **health: Any) -> tuple[dict[str, Any], Path]:
        """A release that leaves an escaped child (its pid in the returned file) and then serves with httpd."""
        pid_file = self.root / f"escaped-{len(self.pid_files)}.pid"
        self.pid_files.append(pid_file)
        command = f'"{sys.executable}" fork.py {pid_file}; exec busybox httpd -f -p $PORT -h .'
        body = {
            "application": application,
            "source": {"type": "path", "path": str(self.source)},
            "run": {"runtime": "process", "command": command},
            "health_check": {**FAST_CHECK, **health},
        }
        return body, pid_file

    def escaped_pid(self, pid_file: Path) -> int:
        text = wait_until(lambda: pid_file.exists() and pid_file.read_text(), DEADLINE_S, f"{pid_file.name} written")
        return int(text)

    def kill_leftovers(self) -> None:
        for pid_file in self.pid_files:
            try:
                process = psutil.Process(int(pid_file.read_text()))
                if str(pid_file) in process.cmdline():
                    process.send_signal(signal.SIGKILL)
            except (OSError, ValueError, psutil.Error):
                continue


@pytest.fixture
def escapes(tmp_path: Path) -> Iterator[Escapes]:
    releases = Escapes(tmp_path)
    yield releases
    releases.kill_leftovers()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    """A daemon that allows host processes, with a processes:write token; its cgroups are removed at the end."""
    daemon = agent_factory(extra_toml=PROCESS_TOKEN_TOML)
    yield daemon
    base = discover_base()
    assert base is not None
    cgroups = ReleaseCgroups(base / agent_label(daemon.state_dir / "run"))
    for deployment_id in cgroups.deployment_ids():
        cgroups.of(deployment_id).destroy(DEADLINE_S)
    cgroups.tidy()


def start_escaping(agent: AgentProcess, escapes: Escapes, application: str, **health: Any) -> tuple[dict[str, Any], int, Path]:
    """Submits an escaping release and returns the deployment, its escaped child's pid and its cgroup."""
    body, pid_file = escapes.request(application, **health)
    created = agent.submit(body, token=PROCESS_TOKEN)
    escaped = escapes.escaped_pid(pid_file)
    cgroup = cgroup_of(escaped)
    # The child left the release's session and group, but not its cgroup.
    assert cgroup.name == created["id"], cgroup
    assert (cgroup / "cgroup.procs").exists()
    return created, escaped, cgroup


def assert_all_gone(escaped: int, cgroup: Path) -> None:
    wait_until(lambda: gone(escaped), DEADLINE_S, f"the escaped child {escaped} to be killed")
    wait_until(lambda: not cgroup.exists(), DEADLINE_S, f"cgroup {cgroup} to be removed")


def test_healthz_tells_token_holders_the_isolation_in_force(agent: AgentProcess) -> None:
    """/healthz with any valid token says "process_isolation": "cgroup"; without a token only the status."""
    response = agent.request("GET", "/healthz", token=PROCESS_TOKEN)
    assert response.status_code == 200 and response.json()["process_isolation"] == "cgroup", response.text
    anonymous = requests.get(f"{agent.url}/healthz", timeout=10)
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}


def test_kill_during_deploying_ends_the_escaped_child(agent: AgentProcess, escapes: Escapes) -> None:
    """Killing the deployment while its release is checked ends the setsid'd grandchild and removes the cgroup."""
    created, escaped, cgroup = start_escaping(agent, escapes, "escape-kill", start_period_s=30, path="/missing")
    agent.wait_for(created["id"], lambda d: d["status"] == "deploying" and d["pid"])
    assert agent.request("POST", f"/v1/deployments/{created['id']}/kill").status_code == 202
    assert agent.wait_for(created["id"], timeout=DEADLINE_S)["status"] == "cancelled"
    assert_all_gone(escaped, cgroup)


def test_stop_ends_the_escaped_child_even_when_its_supervisor_died(agent: AgentProcess, escapes: Escapes) -> None:
    """With the supervisor SIGKILLed (no subreaper holds the child any more), stopping the application still ends it."""
    created, escaped, cgroup = start_escaping(agent, escapes, "escape-stop")
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    supervisor = psutil.Process(final["pid"]).ppid()
    psutil.Process(supervisor).kill()
    wait_until(lambda: gone(supervisor), DEADLINE_S, "the supervisor to die")
    assert psutil.Process(escaped).ppid() != supervisor

    stopped = agent.request("POST", "/v1/applications/escape-stop/stop", token=PROCESS_TOKEN)
    assert stopped.status_code == 202, stopped.text
    assert_all_gone(escaped, cgroup)
    assert gone(final["pid"])


def test_a_replacement_ends_the_escaped_child_of_the_old_release(agent: AgentProcess, escapes: Escapes) -> None:
    """Deploying a new release stops the old one with everything in its cgroup; the new one keeps its own."""
    first, first_escaped, first_cgroup = start_escaping(agent, escapes, "escape-replace")
    assert agent.wait_for(first["id"], timeout=60)["status"] == "succeeded"
    second, second_escaped, second_cgroup = start_escaping(agent, escapes, "escape-replace")
    assert agent.wait_for(second["id"], timeout=60)["status"] == "succeeded"

    assert_all_gone(first_escaped, first_cgroup)
    assert not gone(second_escaped) and second_cgroup.exists()
    assert agent.request("POST", "/v1/applications/escape-replace/stop", token=PROCESS_TOKEN).status_code == 202
    assert_all_gone(second_escaped, second_cgroup)


def test_a_restarted_agent_kills_by_the_recorded_cgroup(agent: AgentProcess, escapes: Escapes) -> None:
    """After the agent is SIGKILLed and started again, stopping the release still ends its escaped child."""
    created, escaped, cgroup = start_escaping(agent, escapes, "escape-restart")
    final = agent.wait_for(created["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    agent.stop(signal.SIGKILL)
    agent.start()
    assert not gone(escaped) and cgroup.exists()  # re-adopted, not swept

    stopped = agent.request("POST", "/v1/applications/escape-restart/stop", token=PROCESS_TOKEN)
    assert stopped.status_code == 202, stopped.text
    assert_all_gone(escaped, cgroup)
