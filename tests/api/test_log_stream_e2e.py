"""Logs against the real daemon and Docker: secrets masked, the size cap, follower caps, after restarts too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from tests.e2e.conftest import READ_TOKEN, AgentProcess, agent_factory, build_request  # noqa: F401 - fixture

MIB = 1024 * 1024
SECRET = "s3cr3t-Passw0rd-for-the-log"
NOTE = "bytes of output dropped: the log reached agent.max_log_bytes"


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_5_mib_build_under_a_1_mib_cap_succeeds_with_its_secrets_masked(
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
) -> None:
    """The build succeeds; its log holds at most 1 MiB plus the one dropped-bytes line, and no env value."""
    agent = agent_factory(max_log_bytes=MIB)
    command = f'echo "password=$PASSWORD"; yes {"x" * 99} | head -c {5 * MIB}; echo "again $PASSWORD"'
    final = agent.wait_for(
        agent.submit(build_request("capped", command=command, env={"PASSWORD": SECRET}))["id"], timeout=120
    )
    assert final["status"] == "succeeded", final
    log = agent.log(final["id"])
    lines = log.splitlines()
    assert NOTE in lines[-1] and f"({MIB} bytes)" in lines[-1]
    assert len(log.encode()) - len(lines[-1]) - 1 <= MIB
    assert sum(NOTE in line for line in lines) == 1
    assert "build stdout | password=***" in log
    assert SECRET not in log
    assert SECRET not in Path(final["log_path"]).read_text()


@pytest.mark.parametrize("runtime", ["container", "process"])
def test_release_output_is_masked_before_and_after_an_agent_restart(
    agent_factory: Callable[..., AgentProcess], runtime: str  # noqa: F811
) -> None:
    """A release printing its run.env value shows ***, and still does once a restarted agent follows it again."""
    agent = agent_factory("state")
    run: dict[str, Any] = {"command": 'while true; do echo "token=$TOKEN"; sleep 0.2; done', "env": {"TOKEN": SECRET}}
    if runtime == "process":
        run["runtime"] = "process"
    body = {"application": f"masked-{runtime}", "run": run}
    if runtime == "container":
        run["image"] = "local/busybox"
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-2000:])
    path = Path(final["log_path"])
    wait_until(lambda: "release stdout | token=***" in path.read_text(), "masked release output")
    agent.stop()
    size_at_stop = path.stat().st_size
    restarted = agent_factory("state")
    try:
        # Past the restart the lines keep coming, through the new agent's follower (or the supervisor).
        wait_until(lambda: path.read_bytes()[size_at_stop:].count(b"token=***") >= 3, "output after the restart")
        assert SECRET not in path.read_text()
        assert SECRET not in restarted.log(final["id"])
    finally:
        restarted.request("POST", f"/v1/applications/masked-{runtime}/stop")


def test_follow_streams_beyond_the_caps_get_429_with_retry_after(
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
) -> None:
    """With max_log_followers_per_token = 2, a token's third follow is refused; closing one frees its place."""
    agent = agent_factory(max_log_followers=3, max_log_followers_per_token=2)
    created = agent.submit(build_request("slow", command="echo started; sleep 60"))
    url = f"{agent.url}/v1/deployments/{created['id']}/logs"
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    streams = [requests.get(url, params={"follow": "true"}, headers=headers, stream=True, timeout=10) for _ in range(2)]
    try:
        assert [stream.status_code for stream in streams] == [200, 200]
        refused = requests.get(url, params={"follow": "true"}, headers=headers, timeout=10)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["type"] == "too_many_followers"
        streams.pop().close()

        def admitted() -> requests.Response | None:
            response = requests.get(url, params={"follow": "true"}, headers=headers, stream=True, timeout=10)
            if response.status_code == 200:
                return response
            response.close()
            return None

        streams.append(wait_until(admitted, "the closed stream's place to be free", timeout_s=10))
    finally:
        for stream in streams:
            stream.close()
        agent.request("POST", f"/v1/deployments/{created['id']}/kill")
