"""A full state_dir: the deployment that hit it ends `failed` disk_full, intake answers 503, and all resumes with room.

The real daemon runs on a real 64 MiB tmpfs as its state_dir (mounting needs root, as on CI).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.e2e.conftest import AgentProcess, build_request
from tests.security.conftest import assert_error
from tests.tmpfs import fill, free_bytes, mounted_tmpfs

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
MIN_FREE_BYTES = 8 * MIB
# Leaves about 24 MiB of the 64 MiB for the agent: far above min_free_bytes, far below the output below.
FILLER_BYTES = 40 * MIB
# About 60 MB of output in 60,000 lines of 1,000 characters: more than the disk can take.
LOUD_BUILD = "line=$(head -c 1000 /dev/zero | tr '\\0' x); yes \"$line\" | head -n 60000; echo build done"


def write_filler(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(b"\0" * MIB)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for the agent's state_dir, 40 MiB of it taken by a filler file."""
    with mounted_tmpfs(tmp_path / "state", "64m") as directory:
        write_filler(directory / "filler", FILLER_BYTES)
        yield directory


@pytest.fixture
def small_agent(state_dir: Path, agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """The daemon on that tmpfs; stopped, and its containers removed, before the tmpfs is unmounted."""
    return agent_factory(state_dir.name, min_free_bytes=MIN_FREE_BYTES)


def test_a_full_disk_fails_the_deployment_that_hit_it_and_work_resumes_without_a_restart(
    small_agent: AgentProcess, state_dir: Path,
) -> None:
    """Full disk: disk_full failure (not stuck), 503 on POST and /healthz, queued work kept; room: all resumes."""
    agent, filler = small_agent, state_dir / "filler"
    pid = agent.process.pid if agent.process else None

    loud = agent.submit(build_request("disk-full-loud", LOUD_BUILD, timeout_s=120))
    doomed = agent.submit(build_request("disk-full-loud", "echo never runs"))
    waiting = agent.submit(build_request("disk-full-loud", "echo waited for room"))
    ended = agent.wait_for(loud["id"], timeout=120)
    assert ended["status"] == "failed", ended
    assert ended["error"]["type"] == "disk_full", ended
    assert free_bytes(state_dir) < MIN_FREE_BYTES

    refused = agent.request("POST", "/v1/deployments", json=build_request("disk-full-other", "true"))
    assert_error(refused, 503, "disk_full")
    assert int(refused.headers["Retry-After"]) >= 1
    health = agent.request("GET", "/healthz")
    assert health.status_code == 503 and "min_free_bytes" in health.json()["error"]["message"], health.text
    # Not stuck: the failed deployment is final for kill too (the status reaches the file once there is room).
    killed = agent.request("POST", f"/v1/deployments/{loud['id']}/kill")
    assert killed.status_code == 409 and killed.json()["error"]["code"] == "already_final", killed.text
    # The next one waits for room, still queued: one kill cancels it, at once.
    agent.wait_for(doomed["id"], lambda d: "stays queued" in agent.output() or d["status"] != "queued", timeout=30)
    began = time.monotonic()
    cancelled = agent.request("POST", f"/v1/deployments/{doomed['id']}/kill")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert time.monotonic() - began < 2
    # Accepted work is kept, not failed: it waits for room.
    time.sleep(2)
    assert agent.get(waiting["id"])["status"] == "queued"

    filler.unlink()
    deadline = time.monotonic() + 10
    while agent.request("GET", "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "/healthz did not recover after space was freed"
        time.sleep(0.1)
    assert agent.wait_for(waiting["id"], timeout=60)["status"] == "succeeded"
    fresh = agent.submit(build_request("disk-full-other", "echo room again"))
    assert agent.wait_for(fresh["id"], timeout=60)["status"] == "succeeded"
    assert "room again" in agent.log(fresh["id"])
    # The failed deployment's log says why, now that it could be written; and it can be deleted.
    log = agent.log(loud["id"])
    assert "could not be written to the log" in log, log[-2000:]
    assert agent.request("DELETE", f"/v1/deployments/{loud['id']}").status_code == 204
    assert agent.process is not None and agent.process.pid == pid, "the agent was restarted"

    # Full again, to the last byte, with a build running and one queued: SIGTERM still ends the agent in 10 s.
    running = agent.submit(build_request("disk-full-last", "echo running; sleep 60"))
    agent.wait_for(running["id"], lambda d: d["status"] == "building" and d["container_id"], timeout=60)
    agent.submit(build_request("disk-full-last", "echo never started"))
    fill(filler)
    started = time.monotonic()
    code = agent.stop(signal.SIGTERM, timeout=15)
    took = time.monotonic() - started
    assert code == 0 and took < 10, (code, took, agent.output()[-3000:])


def test_healthz_reports_statuses_that_wait_for_room_even_without_min_free_bytes(
    state_dir: Path, agent_factory: Callable[..., AgentProcess],
) -> None:
    """With min_free_bytes = 0 intake is never refused, but a store that cannot write is not healthy."""
    agent = agent_factory(state_dir.name, min_free_bytes=0)
    filler = state_dir / "filler"
    loud = agent.submit(build_request("disk-full-nomin", LOUD_BUILD, timeout_s=120))
    ended = agent.wait_for(loud["id"], timeout=120)
    assert ended["status"] == "failed" and ended["error"]["type"] == "disk_full", ended
    fill(filler)  # to the last byte: the store cannot write either
    probe = agent.request("POST", "/v1/deployments", json=build_request("disk-full-nomin-2", "true"))
    assert probe.status_code in (201, 503), probe.text
    if probe.status_code == 201:
        agent.wait_for(probe.json()["id"], timeout=30)  # its final status is kept in memory, unwritten
    health = agent.request("GET", "/healthz")
    assert health.status_code == 503 and "disk" in health.json()["error"]["message"], health.text
    filler.unlink()
    deadline = time.monotonic() + 15
    while agent.request("GET", "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "/healthz did not recover after space was freed"
        time.sleep(0.1)
