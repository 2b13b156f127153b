"""Host processes: a deployments:write token gets no shell on the host; the allowed path still works."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from tests.e2e.conftest import ADMIN_TOKEN, WRITE_TOKEN, AgentProcess
from tests.security.conftest import assert_error, wait_until

PROCESS_TOKEN = "process-token-0123456789abcdef"
PROCESS_TOKEN_TOML = f"""
[[auth.tokens]]
name = "processes"
token = "{PROCESS_TOKEN}"
scopes = ["deployments:write", "deployments:read", "processes:write"]
"""
ROOT_SHELL = {"application": "shell", "run": {"runtime": "process", "command": "id"}}
FAST_CHECK = {"type": "http", "path": "/", "interval_s": 0.2, "timeout_s": 1, "retries": 25, "stable_s": 0.5}
FLAG = "security.allow_host_processes"


def edge_server_toml(tmp_path: Path) -> str:
    """A [servers.edge] entry; refusals happen at submit, so nothing ever connects to it."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    return f'\n[servers.edge]\nhost = "127.0.0.1"\nport = 1\nuser = "root"\nknown_hosts = "{known_hosts}"\n'


def no_deployments(agent: AgentProcess) -> bool:
    return agent.request("GET", "/v1/deployments").json()["data"] == []


def test_write_token_cannot_run_a_host_process_even_when_the_config_allows_them(agent: AgentProcess) -> None:
    """allow_host_processes = true, token without processes:write: `run.runtime = process` is 403."""
    response = agent.request("POST", "/v1/deployments", json=ROOT_SHELL, token=WRITE_TOKEN)
    assert_error(response, 403, "forbidden", naming=FLAG)
    assert no_deployments(agent)


def test_no_token_runs_a_host_process_when_the_config_does_not_allow_them(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """allow_host_processes = false: even admin and a processes:write token get 403."""
    agent = agent_factory(security={"source_roots": [str(tmp_path)]}, extra_toml=PROCESS_TOKEN_TOML)
    for token in (ADMIN_TOKEN, PROCESS_TOKEN, WRITE_TOKEN):
        response = agent.request("POST", "/v1/deployments", json=ROOT_SHELL, token=token)
        assert_error(response, 403, "forbidden", naming=FLAG)
    assert no_deployments(agent)


def test_the_default_config_allows_no_host_processes(agent_factory: Callable[..., AgentProcess]) -> None:
    """Without a [security] table host processes are off: admin gets 403."""
    agent = agent_factory(start=False)
    # Drop the fixture's [security] table (the last one it writes) to get the built-in defaults.
    agent.config_path.write_text(agent.config_path.read_text().partition("[security]")[0])
    agent.start()
    response = agent.request("POST", "/v1/deployments", json=ROOT_SHELL)
    assert_error(response, 403, "forbidden", naming=FLAG)


@pytest.mark.parametrize("part", ["build", "run"])
def test_process_runtime_on_a_server_needs_the_scope_and_the_flag(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path, part: str
) -> None:
    """`build.runtime`/`run.runtime = process` on a remote server: 403 without processes:write or the flag."""
    body: dict[str, Any] = {"application": "shell", "server": "edge"}
    if part == "build":
        body["build"] = {"runtime": "process", "command": "id"}
    else:
        body["run"] = {"runtime": "process", "command": "id"}
    allowed = agent_factory("allowed", extra_toml=edge_server_toml(tmp_path))
    assert_error(allowed.request("POST", "/v1/deployments", json=body, token=WRITE_TOKEN), 403, "forbidden", naming=FLAG)
    denied = agent_factory(
        "denied", security={"source_roots": [str(tmp_path)]}, extra_toml=edge_server_toml(tmp_path)
    )
    assert_error(denied.request("POST", "/v1/deployments", json=body), 403, "forbidden", naming=FLAG)
    assert no_deployments(allowed) and no_deployments(denied)


def test_allowed_host_process_release_runs_end_to_end(agent_factory: Callable[..., AgentProcess]) -> None:
    """Flag on and a processes:write token: a host-process release passes its check, runs, and stops."""
    agent = agent_factory(extra_toml=PROCESS_TOKEN_TOML)
    body = {
        "application": "proc",
        "build": {"image": "local/busybox", "command": "echo from-process > /workspace/index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": FAST_CHECK,
    }
    created = agent.submit(body, token=PROCESS_TOKEN)
    final = agent.wait_for(created["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    process = psutil.Process(final["pid"])
    assert "httpd" in " ".join(process.cmdline())
    with urllib.request.urlopen(final["url"], timeout=5) as response:
        assert response.read().decode().strip() == "from-process"
    stopped = agent.request("POST", "/v1/applications/proc/stop", token=PROCESS_TOKEN)
    assert stopped.status_code == 202, stopped.text
    wait_until(lambda: not process.is_running(), 15, f"process {final['pid']} still runs after stop")


def test_a_changed_config_stops_a_queued_host_process(agent_factory: Callable[..., AgentProcess]) -> None:
    """Accepted while allowed, then the flag is turned off (agent restarted): the deployment fails when it starts."""
    agent = agent_factory(extra_toml=PROCESS_TOKEN_TOML)
    blocker = agent.submit({"application": "proc", "build": {"image": "local/busybox", "command": "sleep 60"}})
    agent.wait_for(blocker["id"], lambda d: d["status"] == "building")
    queued = agent.submit(
        {"application": "proc", "run": {"runtime": "process", "command": "echo ran-on-the-host; sleep 30"}},
        token=PROCESS_TOKEN,
    )
    # The policy is checked again when a deployment starts, with the config in force then.
    assert agent.stop() == 0
    text = agent.config_path.read_text().replace("allow_host_processes = true", "allow_host_processes = false")
    assert "allow_host_processes = false" in text
    agent.config_path.write_text(text)
    agent.start()
    agent.request("POST", f"/v1/deployments/{blocker['id']}/kill")
    final = agent.wait_for(queued["id"], timeout=30)
    assert final["status"] == "failed", final
    assert FLAG in final["error"]["message"], final
    assert final["pid"] is None and final["url"] is None
    assert "ran-on-the-host" not in agent.log(queued["id"])


def test_starting_a_host_process_application_again_needs_the_policy(agent_factory: Callable[..., AgentProcess]) -> None:
    """A stopped host-process application: `start` and `rollback` are 403 for a write token, and for all once the flag is off."""
    agent = agent_factory(extra_toml=PROCESS_TOKEN_TOML)
    body = {
        "application": "proc",
        "build": {"image": "local/busybox", "command": "echo p > /workspace/index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": FAST_CHECK,
    }
    final = agent.wait_for(agent.submit(body, token=PROCESS_TOKEN)["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    assert agent.request("POST", "/v1/applications/proc/stop", token=WRITE_TOKEN).status_code == 202
    assert_error(agent.request("POST", "/v1/applications/proc/start", token=WRITE_TOKEN), 403, "forbidden", naming=FLAG)
    assert_error(agent.request("POST", f"/v1/deployments/{final['id']}/rollback", token=WRITE_TOKEN), 403, "forbidden", naming=FLAG)
    assert agent.stop() == 0
    agent.config_path.write_text(
        agent.config_path.read_text().replace("allow_host_processes = true", "allow_host_processes = false")
    )
    agent.start()
    for token in (PROCESS_TOKEN, ADMIN_TOKEN):
        assert_error(agent.request("POST", "/v1/applications/proc/start", token=token), 403, "forbidden", naming=FLAG)
        assert_error(agent.request("POST", f"/v1/deployments/{final['id']}/rollback", token=token), 403, "forbidden", naming=FLAG)
    assert agent.request("GET", "/v1/applications/proc").json()["state"] == "stopped"
