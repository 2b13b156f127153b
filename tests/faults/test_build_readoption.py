"""Builds outlive the agent: after SIGKILL and a restart, a build in a container is taken back.

Its log continues where it stopped (no line lost or repeated, one agent line marks the gap),
its timeout still counts from its real start, a build with a `run` gets its release, and a
build whose container vanished while the agent was away ends `failed` with `lost`.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any

import docker
import psutil

from tests.conftest import containers_of, log_entries
from tests.e2e.conftest import AgentProcess, build_request
from tests.e2e.test_releases import fetch, web_request
from tests.e2e.test_remote import group_of, process_build, remote_agent

NUMBERED = "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"
GAP_MARK = "following build container"


def kill_during_build(agent: AgentProcess, deployment_id: str, after_line: str | None = None) -> dict[str, Any]:
    """Waits until the build runs (and, if given, its log shows `after_line`), then SIGKILLs the agent."""
    running = agent.wait_for(deployment_id, lambda d: d["status"] == "building" and d["container_id"], timeout=30)
    deadline = time.monotonic() + 30
    while after_line is not None and after_line not in agent.log(deployment_id):
        assert time.monotonic() < deadline, agent.log(deployment_id)
        time.sleep(0.02)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    return running


def output_lines(agent: AgentProcess, deployment_id: str) -> list[str]:
    return [text for stage, stream, text in log_entries(agent.state_dir / "logs" / f"{deployment_id}.log")
            if stage == "build" and stream in ("stdout", "stderr")]


def gap_marks(agent: AgentProcess, deployment_id: str) -> list[str]:
    return [text for _, stream, text in log_entries(agent.state_dir / "logs" / f"{deployment_id}.log")
            if stream == "agent" and GAP_MARK in text]


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_build_killed_mid_output_continues_with_every_line_once(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """SIGKILL while a build prints numbered lines: after the restart it succeeds and the log holds 0..299 once, in order."""
    agent = agent_factory("readopt-lines")
    deployment = agent.submit(build_request("readopt-lines", command=NUMBERED))
    kill_during_build(agent, deployment["id"], after_line="line 60")
    time.sleep(0.5)  # the build writes on while the agent is away
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(deployment["id"])[-2000:])
    assert output_lines(agent, deployment["id"]) == [f"line {i}" for i in range(300)]
    assert len(gap_marks(agent, deployment["id"])) == 1, agent.log(deployment["id"])
    assert containers_of(docker_client, deployment["id"]) == []
    assert not (agent.state_dir / "logs" / f"{deployment['id']}.build-cursor").exists()


def test_the_log_keeps_growing_while_the_agent_is_down(agent_factory) -> None:
    """The build's output pump is no part of the agent: killed, the agent leaves it copying; nothing waits for the restart."""
    agent = agent_factory("readopt-pump")
    deployment = agent.submit(build_request("readopt-pump", command=NUMBERED))
    kill_during_build(agent, deployment["id"], after_line="line 30")
    log = agent.state_dir / "logs" / f"{deployment['id']}.log"
    before = log.stat().st_size
    time.sleep(1)
    assert log.stat().st_size > before, "nothing was copied while the agent was down"
    agent.start()
    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(deployment["id"])[-2000:])
    assert output_lines(agent, deployment["id"]) == [f"line {i}" for i in range(300)]
    assert not (agent.state_dir / "logs" / f"{deployment['id']}.build-pump").exists()


def test_a_build_killed_twice_and_finished_while_away_keeps_its_log_whole(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """Two SIGKILLs, the second time the build ends while the agent is away: every line once, one mark per gap."""
    agent = agent_factory("readopt-twice")
    deployment = agent.submit(build_request("readopt-twice", command=NUMBERED + "; echo to-stderr >&2"))
    kill_during_build(agent, deployment["id"], after_line="line 30")
    agent.start()
    kill_during_build(agent, deployment["id"], after_line="line 120")
    deadline = time.monotonic() + 30
    while any(c.status == "running" for c in containers_of(docker_client, deployment["id"])):
        assert time.monotonic() < deadline, "the build did not end while the agent was away"
        time.sleep(0.1)
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(deployment["id"])[-2000:])
    assert output_lines(agent, deployment["id"]) == [f"line {i}" for i in range(300)] + ["to-stderr"]
    assert len(gap_marks(agent, deployment["id"])) == 2, agent.log(deployment["id"])
    assert containers_of(docker_client, deployment["id"]) == []


def test_a_readopted_build_times_out_at_its_original_deadline(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """timeout_s counts from the container's real start: after a restart it fails `timeout` near the first deadline."""
    agent = agent_factory("readopt-timeout")
    deployment = agent.submit(build_request("readopt-timeout", command="echo started; sleep 60", timeout_s=6))
    kill_during_build(agent, deployment["id"], after_line="started")
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=40)
    assert final["status"] == "failed" and final["error"]["type"] == "timeout", final
    ran = seconds(final["finished_at"]) - seconds(final["started_at"])
    # The deadline, plus the kill grace (2 s) and some slack; a fresh 6 s after the restart would be later.
    assert 6 <= ran < 6 + 2 + 3, (ran, agent.log(deployment["id"]))
    assert containers_of(docker_client, deployment["id"]) == []


def test_a_build_whose_container_vanished_while_away_is_lost(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """The build container removed while the agent is down: after the restart `failed` with `lost`, said in its log."""
    agent = agent_factory("readopt-lost")
    deployment = agent.submit(build_request("readopt-lost", command="echo started; sleep 60"))
    kill_during_build(agent, deployment["id"], after_line="started")
    for container in containers_of(docker_client, deployment["id"]):
        container.remove(force=True)
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=30)
    assert final["status"] == "failed" and final["error"]["type"] == "lost", final
    assert "vanished" in agent.log(deployment["id"])
    assert containers_of(docker_client, deployment["id"]) == []


def test_a_readopted_build_with_a_run_gets_its_release(
    agent_factory, docker_client: docker.DockerClient
) -> None:
    """A build with a `run`, SIGKILLed mid-build: after the restart its image is committed and its release serves."""
    agent = agent_factory("readopt-run")
    body = web_request("v7", application="readopt-run")
    body["build"]["command"] = "echo building; sleep 2; echo v7 > /workspace/index.html; echo built"
    deployment = agent.submit(body)
    kill_during_build(agent, deployment["id"], after_line="building")
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(deployment["id"])[-2000:])
    assert fetch(final["url"]) == "v7"
    assert output_lines(agent, deployment["id"]) == ["building", "built"]
    roles = {c.labels.get("deploy-agent.role") for c in containers_of(docker_client, deployment["id"])}
    assert roles == {"release"}, roles


def test_a_readopted_build_counts_against_its_applications_queue(agent_factory) -> None:
    """A re-adopted build blocks the later deployment of its application until it ends."""
    agent = agent_factory("readopt-queue")
    first = agent.submit(build_request("readopt-queue", command="echo started; sleep 3; echo first-done"))
    kill_during_build(agent, first["id"], after_line="started")
    agent.start()
    second = agent.submit(build_request("readopt-queue", command="echo second"))

    done_second = agent.wait_for(second["id"], timeout=60)
    done_first = agent.get(first["id"])
    assert done_first["status"] == done_second["status"] == "succeeded", (done_first, done_second)
    assert seconds(done_second["started_at"]) >= seconds(done_first["finished_at"])


def test_long_lines_are_split_alike_before_and_after_the_gap(agent_factory) -> None:
    """Lines longer than the log's 64 KiB split, on stdout and stderr: after a SIGKILL each piece is there once."""
    agent = agent_factory("readopt-long")
    command = (
        "i=0; while [ $i -lt 30 ]; do head -c 150000 /dev/zero | tr '\\0' a; echo \" $i\"; "
        "echo err $i >&2; i=$((i+1)); sleep 0.05; done"
    )
    deployment = agent.submit(build_request("readopt-long", command=command))
    kill_during_build(agent, deployment["id"], after_line="err 8")
    time.sleep(0.3)
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", final
    pieces = []
    for i in range(30):
        line = "a" * 150000 + f" {i}"
        pieces.append(("stdout", [line[start:start + 65536] for start in range(0, len(line), 65536)]))
        pieces.append(("stderr", [f"err {i}"]))
    entries = [(stream, text) for stage, stream, text in log_entries(agent.state_dir / "logs" / f"{deployment['id']}.log")
               if stage == "build" and stream in ("stdout", "stderr")]
    for name in ("stdout", "stderr"):
        expected = [piece for stream, group in pieces if stream == name for piece in group]
        got = [text for stream, text in entries if stream == name]
        assert len(got) == len(expected) and got == expected, (name, len(got), len(expected))
    assert len(gap_marks(agent, deployment["id"])) == 1


def test_a_readopted_build_can_be_killed(agent_factory, docker_client: docker.DockerClient) -> None:
    """A build taken back after SIGKILL is stopped by a kill like any other: `cancelled`, its container gone."""
    agent = agent_factory("readopt-kill")
    deployment = agent.submit(build_request("readopt-kill", command="echo started; sleep 60"))
    kill_during_build(agent, deployment["id"], after_line="started")
    agent.start()
    agent.wait_for(deployment["id"], lambda d: d["status"] == "building" and GAP_MARK in agent.log(d["id"]))
    assert agent.request("POST", f"/v1/deployments/{deployment['id']}/kill").status_code in (200, 202)

    final = agent.wait_for(deployment["id"], timeout=30)
    assert final["status"] == "cancelled", final
    assert containers_of(docker_client, deployment["id"]) == []


def test_a_build_detached_by_sigterm_before_it_started_runs_after_the_restart(agent_factory) -> None:
    """SIGTERM the moment a build is `building` (its container may not exist yet): after the restart it succeeds."""
    agent = agent_factory("readopt-early")
    deployment = agent.submit(build_request("readopt-early", command="echo early-one; sleep 1; echo early-two"))
    agent.wait_for(deployment["id"], lambda d: d["status"] == "building")
    assert agent.stop(signal.SIGTERM) == 0
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded", (final, agent.log(deployment["id"]))
    assert output_lines(agent, deployment["id"]) == ["early-one", "early-two"]


def test_a_remote_process_build_is_taken_back_after_sigkill(agent_factory, sshd) -> None:
    """A process build on a server outlives the agent: after SIGKILL its log goes on with no line lost or repeated."""
    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {**process_build("edge", NUMBERED + "; echo done"), "application": "readopt-remote"}
    deployment = agent.submit(body)
    building = agent.wait_for(deployment["id"], lambda d: d["status"] == "building" and d["pid"], timeout=30)
    deadline = time.monotonic() + 30
    while "line 50" not in agent.log(deployment["id"]):
        assert time.monotonic() < deadline, agent.log(deployment["id"])
        time.sleep(0.02)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    group = group_of(building["pid"])
    assert group, "the remote build should have outlived the agent"
    agent.start()

    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "succeeded" and final["exit_code"] == 0, (final, agent.log(deployment["id"]))
    # stdout only: the server's login environment may write its own noise to stderr (pyenv rehash, say).
    stdout = [text for stage, stream, text in log_entries(agent.state_dir / "logs" / f"{deployment['id']}.log")
              if stage == "build" and stream == "stdout"]
    assert stdout == [f"line {i}" for i in range(300)] + ["done"]
    assert agent.log(deployment["id"]).count("following the build again") == 1
    assert psutil.wait_procs(group, timeout=10)[1] == [], "the remote build's processes were left running"


def test_a_remote_process_build_that_ended_while_the_agent_was_away_reports_its_exit(agent_factory, sshd) -> None:
    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {**process_build("edge", "echo one; sleep 1; echo two; exit 5"), "application": "readopt-remote-exit"}
    deployment = agent.submit(body)
    agent.wait_for(deployment["id"], lambda d: d["status"] == "building" and d["pid"], timeout=30)
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(2.5)  # it ends meanwhile
    agent.start()
    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "failed" and final["error"]["type"] == "build_failed" and final["exit_code"] == 5, final
    assert output_lines(agent, deployment["id"]) == ["one", "two"]


def test_a_remote_process_build_that_vanished_while_the_agent_was_away_is_lost(agent_factory, sshd) -> None:
    agent = remote_agent(agent_factory, ("edge", sshd))
    body = {**process_build("edge", "echo started; sleep 60"), "application": "readopt-remote-lost"}
    deployment = agent.submit(body)
    building = agent.wait_for(deployment["id"], lambda d: d["status"] == "building" and d["pid"], timeout=30)
    group = group_of(building["pid"])
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    for process in group:
        process.kill()  # the supervisor too: no exit code is left
    psutil.wait_procs(group, timeout=10)
    agent.start()
    final = agent.wait_for(deployment["id"], timeout=60)
    assert final["status"] == "failed" and final["error"]["type"] == "lost", final
