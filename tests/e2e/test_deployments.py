"""End to end: the real daemon, real Docker builds, seen through the HTTP API."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import docker
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import AgentProcess, build_request


def test_build_succeeds_and_its_lines_are_in_the_log(agent: AgentProcess, source_dir: Path) -> None:
    """A build runs in a container with the source at /workspace; every line lands in the log."""
    body = {
        "application": "web",
        "source": {"type": "path", "path": str(source_dir)},
        "build": {
            "image": "local/busybox",
            "command": ["sh", "-c", "cat /workspace/index.html; pwd; echo to-stderr >&2; echo KEY=$KEY"],
            "env": {"KEY": "value-1"},
        },
        "metadata": {"commit": "abc123"},
    }
    created = agent.submit(body)
    assert created["status"] == "queued"
    assert created["id"].startswith("dep_")
    assert created["metadata"] == {"commit": "abc123"}
    final = agent.wait_for(created["id"])
    assert final["status"] == "succeeded", final
    assert final["exit_code"] == 0
    assert final["pid"] is None
    assert final["started_at"] and final["finished_at"]
    assert final["error"] is None
    log = agent.log(created["id"])
    assert "build stdout | <h1>hello from source</h1>" in log
    assert "build stdout | /workspace" in log
    assert "build stderr | to-stderr" in log
    assert "build stdout | KEY=value-1" in log
    assert " build agent | " in log
    assert Path(final["log_path"]).read_text() == log


def test_failing_build_reports_exit_code_and_error(agent: AgentProcess) -> None:
    """A build that exits 3 fails with exit_code 3 and an error saying so."""
    created = agent.submit(build_request(command="echo about to fail; exit 3"))
    final = agent.wait_for(created["id"])
    assert final["status"] == "failed"
    assert final["exit_code"] == 3
    assert final["error"]["type"] == "build_failed"
    assert "3" in final["error"]["message"]
    assert "about to fail" in agent.log(created["id"])


def test_build_timeout_kills_the_build(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """A build over its timeout_s is killed and fails with a timeout error; no container is left."""
    started = time.monotonic()
    created = agent.submit(build_request(command="echo start; sleep 60", timeout_s=1))
    final = agent.wait_for(created["id"], timeout=30)
    assert final["status"] == "failed"
    assert final["error"]["type"] == "timeout"
    assert "timed out" in final["error"]["message"]
    assert time.monotonic() - started < 20
    assert containers_of(docker_client, created["id"]) == []


def test_one_application_runs_in_order_and_others_in_parallel(agent: AgentProcess) -> None:
    """Deployments of one app never overlap and keep submit order; different apps overlap."""
    marker = "date +%s.%N; sleep 1; date +%s.%N"
    first = agent.submit(build_request("alpha", command=marker))
    second = agent.submit(build_request("alpha", command=marker))
    other = agent.submit(build_request("beta", command=marker))
    results = {d["id"]: agent.wait_for(d["id"]) for d in (first, second, other)}
    assert all(r["status"] == "succeeded" for r in results.values()), results
    a1, a2, b = (results[d["id"]] for d in (first, second, other))
    # Same application: the second starts only after the first finished.
    assert a2["started_at"] >= a1["finished_at"]
    # Different applications: beta ran while alpha's first deployment was running.
    assert b["started_at"] < a1["finished_at"]


def test_kill_of_a_queued_deployment_cancels_it_without_running(agent: AgentProcess) -> None:
    """A queued deployment that is killed becomes cancelled and never runs."""
    blocker = agent.submit(build_request("gamma", command="sleep 3"))
    queued = agent.submit(build_request("gamma", command="echo should-never-run"))
    agent.wait_for(blocker["id"], lambda d: d["status"] == "building")
    response = agent.request("POST", f"/v1/deployments/{queued['id']}/kill")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    agent.wait_for(blocker["id"])
    final = agent.get(queued["id"])
    assert final["status"] == "cancelled"
    assert final["started_at"] is None
    assert "should-never-run" not in agent.log(queued["id"]) if Path(final["log_path"]).exists() else True
    again = agent.request("POST", f"/v1/deployments/{queued['id']}/kill")
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "conflict"


def test_kill_of_a_running_build_stops_it_within_five_seconds(
    agent: AgentProcess, docker_client: docker.DockerClient
) -> None:
    """Kill during building: container stopped and removed within 5 s, status cancelled."""
    created = agent.submit(build_request(command="while true; do echo tick; sleep 0.2; done"))
    building = agent.wait_for(created["id"], lambda d: d["status"] == "building" and d["container_id"])
    assert building["pid"] is not None
    assert containers_of(docker_client, created["id"])
    started = time.monotonic()
    response = agent.request("POST", f"/v1/deployments/{created['id']}/kill")
    assert response.status_code == 202
    final = agent.wait_for(created["id"], timeout=5)
    assert time.monotonic() - started < 5
    assert final["status"] == "cancelled"
    assert final["pid"] is None
    assert containers_of(docker_client, created["id"]) == []


def test_follow_streams_lines_until_the_deployment_is_final(agent: AgentProcess) -> None:
    """`?follow=true` delivers lines while the build runs and closes when it is final."""
    created = agent.submit(build_request(command="for i in 1 2 3 4 5; do echo line-$i; sleep 0.3; done"))
    arrivals: list[tuple[float, str]] = []
    with agent.request("GET", f"/v1/deployments/{created['id']}/logs", params={"follow": "true"}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        for line in r.iter_lines():
            arrivals.append((time.monotonic(), line.decode()))
    final = agent.get(created["id"])
    assert final["status"] == "succeeded"
    texts = [text for _, text in arrivals]
    numbered = [t for t in texts if "build stdout | line-" in t]
    assert len(numbered) == 5
    first_at = next(at for at, text in arrivals if "line-1" in text)
    last_at = next(at for at, text in arrivals if "line-5" in text)
    assert last_at - first_at > 0.8, "lines should arrive as they are written, not all at the end"
    assert any("deployment succeeded" in t for t in texts)


def test_logs_tail_and_offset(agent: AgentProcess) -> None:
    """`tail=N` gives the last N lines; `offset` resumes where X-Log-Offset said."""
    created = agent.submit(build_request(command="for i in $(seq 1 20); do echo n$i; done"))
    agent.wait_for(created["id"])
    full = agent.request("GET", f"/v1/deployments/{created['id']}/logs")
    size = int(full.headers["X-Log-Offset"])
    assert size == len(full.content)
    tail = agent.request("GET", f"/v1/deployments/{created['id']}/logs", params={"tail": "3"})
    assert tail.text.splitlines() == full.text.splitlines()[-3:]
    middle = full.text.index("n10\n")
    part = agent.request("GET", f"/v1/deployments/{created['id']}/logs", params={"offset": str(middle)})
    assert part.content == full.content[middle:]
    assert int(part.headers["X-Log-Offset"]) == size
    bad = agent.request("GET", f"/v1/deployments/{created['id']}/logs", params={"tail": "x"})
    assert bad.status_code == 400


def test_delete_removes_record_and_log(agent: AgentProcess) -> None:
    """DELETE removes the record and its log file; a second DELETE is 404."""
    created = agent.submit(build_request())
    final = agent.wait_for(created["id"])
    assert Path(final["log_path"]).exists()
    response = agent.request("DELETE", f"/v1/deployments/{created['id']}")
    assert response.status_code == 204
    assert not Path(final["log_path"]).exists()
    assert agent.request("GET", f"/v1/deployments/{created['id']}").status_code == 404
    again = agent.request("DELETE", f"/v1/deployments/{created['id']}")
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "not_found"


def test_delete_is_refused_while_in_progress(agent: AgentProcess) -> None:
    """DELETE of a building deployment is 409 and leaves it running."""
    created = agent.submit(build_request(command="sleep 5"))
    agent.wait_for(created["id"], lambda d: d["status"] == "building")
    response = agent.request("DELETE", f"/v1/deployments/{created['id']}")
    assert response.status_code == 409
    assert agent.get(created["id"])["status"] == "building"
    agent.request("POST", f"/v1/deployments/{created['id']}/kill")
    agent.wait_for(created["id"])


def test_idempotency_key_returns_the_same_deployment(agent: AgentProcess) -> None:
    """The same Idempotency-Key and body give 200 and the same deployment; another body 409."""
    body = build_request("idem")
    headers = {"Idempotency-Key": "request-42"}
    first = agent.request("POST", "/v1/deployments", json=body, headers=headers)
    second = agent.request("POST", "/v1/deployments", json=body, headers=headers)
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    other = agent.request("POST", "/v1/deployments", json=build_request("idem", command="echo other"), headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "conflict"
    listed = agent.request("GET", "/v1/deployments", params={"application": "idem"}).json()["data"]
    assert [d["id"] for d in listed] == [first.json()["id"]]


def test_pagination_and_filters(agent: AgentProcess) -> None:
    """Cursor pages are newest first with no gaps; every filter narrows the list."""
    ids = [agent.submit(build_request(f"page{i % 2}", command="true"))["id"] for i in range(7)]
    for deployment_id in ids:
        agent.wait_for(deployment_id)
    failing = agent.submit(build_request("page0", command="exit 1"))["id"]
    agent.wait_for(failing)
    ids.append(failing)

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = agent.request("GET", "/v1/deployments", params=params).json()
        assert len(page["data"]) <= 3
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))

    def listed(**params: str) -> list[str]:
        response = agent.request("GET", "/v1/deployments", params=params)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["data"]]

    assert set(listed(application="page1")) == set(ids[1:7:2])
    assert listed(status="failed") == [failing]
    assert set(listed(server="local")) == set(ids)
    assert listed(server="elsewhere") == []
    failed_at = agent.get(failing)["updated_at"]
    assert listed(updated_since=failed_at) == [failing]
    assert set(listed(updated_since="2000-01-01T00:00:00Z")) == set(ids)
    assert listed(updated_since="2999-01-01T00:00:00+02:00") == []
    for bad in ({"limit": "0"}, {"limit": "501"}, {"status": "nope"}, {"updated_since": "yesterday"}, {"cursor": "zzz"}):
        response = agent.request("GET", "/v1/deployments", params=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "bad_request"


def test_auth_no_token_bad_token_missing_scope(agent: AgentProcess) -> None:
    """No token and unknown tokens get 401; a token without the scope gets 403."""
    from tests.e2e.conftest import READ_TOKEN, WRITE_TOKEN

    assert agent.request("GET", "/v1/deployments", token=None).status_code == 401
    assert agent.request("GET", "/v1/deployments", token="not-a-real-token-at-all").status_code == 401
    assert agent.request("GET", "/v1/deployments", token=READ_TOKEN).status_code == 200
    refused = agent.request("POST", "/v1/deployments", json=build_request(), token=READ_TOKEN)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "forbidden"
    assert agent.request("GET", "/v1/deployments", token=WRITE_TOKEN).status_code == 403
    assert agent.request("GET", "/metrics", token=None).status_code == 401
    assert agent.request("GET", "/healthz", token=None).status_code == 200


def test_every_error_status_has_the_envelope(agent_factory) -> None:
    """400, 401, 403, 404, 405, 409, 413, 422, 429 all answer with the contract's envelope."""
    from tests.e2e.conftest import READ_TOKEN

    agent = agent_factory(max_queued=1, max_concurrent=1)
    blocker = agent.submit(build_request("blk", command="sleep 30"))
    agent.wait_for(blocker["id"], lambda d: d["status"] == "building")
    agent.submit(build_request("blk2"))  # the one queued slot
    cases = {
        400: agent.request("POST", "/v1/deployments", data=b"{not json", headers={"Content-Type": "application/json"}),
        401: agent.request("GET", "/v1/deployments", token=None),
        403: agent.request("POST", "/v1/deployments", json=build_request(), token=READ_TOKEN),
        404: agent.request("GET", "/v1/deployments/dep_missing"),
        405: agent.request("PUT", "/v1/deployments"),
        409: agent.request("DELETE", f"/v1/deployments/{blocker['id']}"),
        413: agent.request("POST", "/v1/deployments", data=b"x" * (1024 * 1024 + 10)),
        422: agent.request("POST", "/v1/deployments", json={"application": "Bad Name!", "build": {"image": 3}}),
        429: agent.request("POST", "/v1/deployments", json=build_request("more")),
    }
    for status, response in cases.items():
        assert response.status_code == status, (status, response.text)
        envelope = response.json()
        assert envelope["success"] is False
        assert envelope["status"] == status
        assert set(envelope["error"]) == {"type", "message", "code", "details"}
        assert envelope["error"]["message"]
    fields = {d["field"] for d in cases[422].json()["error"]["details"]}
    assert {"application", "build.image", "build.command"} <= fields
    unknown_path = agent.request("GET", "/nowhere")
    assert unknown_path.status_code == 404 and unknown_path.json()["status"] == 404
    agent.request("POST", f"/v1/deployments/{blocker['id']}/kill")


def test_unreachable_docker_gives_503(agent_factory) -> None:
    """With the Docker engine unreachable the agent reports 503 on /healthz with the reason."""
    agent = agent_factory(start=False)
    text = agent.config_path.read_text().replace("[docker]", '[docker]\nurl = "unix:///nonexistent/docker.sock"')
    agent.config_path.write_text(text)
    agent.process = None
    import subprocess, sys, requests  # noqa: E401

    output = open(agent.output_path, "ab")
    agent.process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(agent.config_path)], stdout=output, stderr=output
    )
    deadline = time.monotonic() + 30
    response = None
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{agent.url}/healthz", timeout=5)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    assert response is not None, agent.output()
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable"
    assert "Docker" in response.json()["error"]["message"]


def test_metrics_expose_status_counts_and_build_durations(agent: AgentProcess) -> None:
    """/metrics is Prometheus text with deployments by status, queue depth and build durations."""
    agent.wait_for(agent.submit(build_request())["id"])
    response = agent.request("GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    assert 'deploy_agent_deployments{status="succeeded"} 1.0' in text
    assert "deploy_agent_queue_depth 0.0" in text
    assert "deploy_agent_build_duration_seconds_count" in text


@pytest.mark.alone
def test_api_answers_within_100ms_while_four_builds_stream(agent: AgentProcess) -> None:
    """Four builds streaming output flat out: 99% of API requests answer within 100 ms, none beyond 500 ms.

    The builds saturate both cores of the test machine; a single request can lose a CPU
    time slice to them (dockerd, busy writing their logs, shares the root CPU group with the
    agent), so the bound is on the 99th percentile; the cap on the worst catches a blocked loop.
    Their output goes through Docker's json-file log (so that a restarted agent loses none
    of it), read from the file itself: dockerd's work per line stays one encode.
    """
    noisy = "i=0; while [ $i -lt 400000 ]; do echo line $i of noisy output; i=$((i+1)); done"
    ids = [agent.submit(build_request(f"noisy{i}", command=noisy, timeout_s=120))["id"] for i in range(4)]
    for deployment_id in ids:
        agent.wait_for(deployment_id, lambda d: d["status"] != "queued")
    latencies: list[float] = []
    deadline = time.monotonic() + 4
    with agent.session() as poller:
        while time.monotonic() < deadline:
            for path in ("/v1/deployments?limit=10", f"/v1/deployments/{ids[0]}"):
                began = time.monotonic()
                response = poller.get(f"{agent.url}{path}", timeout=5)
                latencies.append(time.monotonic() - began)
                assert response.status_code == 200
            time.sleep(0.02)
    streaming = [agent.get(i)["status"] for i in ids]
    assert streaming.count("building") >= 3, f"builds ended before the measurement was over: {streaming}"
    assert len(latencies) > 100
    latencies.sort()
    slowest = f"slowest requests: {[round(x * 1000) for x in latencies[-5:]]} ms of {len(latencies)}"
    assert latencies[len(latencies) * 99 // 100] < 0.1, slowest
    assert latencies[-1] < 0.5, slowest
    for deployment_id in ids:
        agent.request("POST", f"/v1/deployments/{deployment_id}/kill")
    for deployment_id in ids:
        agent.wait_for(deployment_id)
