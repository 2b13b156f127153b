"""Remote kills over a real sshd: the start-time check, and the whole group."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import psutil
import pytest

from agent.logs import DeploymentLog
from agent.runtimes.remote import RemoteBuildJob, RemoteProcessRuntime


@pytest.fixture
async def runtime(sshd):
    connection = await asyncssh.connect(
        sshd.host, port=sshd.port, username=sshd.user, client_keys=[str(sshd.identity_file)],
        known_hosts=str(sshd.known_hosts),
    )

    async def connect() -> asyncssh.SSHClientConnection:
        return connection

    yield RemoteProcessRuntime("edge", connect, kill_grace_s=1)
    connection.close()
    await connection.wait_closed()


def start_ticks(pid: int) -> float:
    return float(Path(f"/proc/{pid}/stat").read_text().split()[21])


async def test_a_pid_whose_start_time_differs_is_never_signalled(runtime: RemoteProcessRuntime) -> None:
    """kill_group refuses a PID whose /proc start time is not the one recorded (PID reuse)."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        assert await runtime.kill_group(bystander.pid, start_ticks(bystander.pid) + 1, 0.5) is False
        assert bystander.poll() is None, "a process the agent did not start was signalled"
        assert await runtime.kill_group(bystander.pid, start_ticks(bystander.pid), 0.5) is True
        assert bystander.wait(timeout=5) != 0
    finally:
        if bystander.poll() is None:
            bystander.kill()
            bystander.wait()


async def test_remote_build_reports_pid_group_and_exit_code(runtime: RemoteProcessRuntime, tmp_path: Path) -> None:
    """The reported PID leads its own process group; env values arrive intact; the exit code comes back."""
    seen: list[tuple[int, float]] = []

    async def on_start(pid: int, started_at: float) -> None:
        seen.append((pid, started_at))
        assert psutil.Process(pid).create_time() > 0
        assert __import__("os").getpgid(pid) == pid

    job = RemoteBuildJob(
        deployment_id="dep_test", command='echo "$GREETING"; exit 4', env={"GREETING": "it's a \"quoted\" value"},
        timeout_s=30, remote_dir=str(tmp_path / "remote"),
    )
    with DeploymentLog(tmp_path / "build.log") as log:
        exit_code, timed_out = await runtime.run_build(job, log, on_start)
    assert (exit_code, timed_out) == (4, False)
    assert seen and seen[0][1] > 0
    assert "build stdout | it's a \"quoted\" value" in (tmp_path / "build.log").read_text()


async def test_a_release_start_cancelled_at_any_moment_leaves_nothing_running(
    runtime: RemoteProcessRuntime, tmp_path: Path
) -> None:
    """A kill while a remote release starts (the task cancelled, at random moments): its process never survives."""
    import asyncio
    import random

    from agent.runtimes.base import ReleaseSpec

    marker = f"deploy-agent-start-cancel-{random.randrange(10**9)}"
    (tmp_path / "work").mkdir()
    for attempt in range(12):
        spec = ReleaseSpec(
            deployment_id=f"dep_cancel{attempt}", application="cancel", runtime="process",
            command=f"sleep 300; echo {marker}", env={},
            log_path=tmp_path / f"{attempt}.log", workdir=tmp_path / "work",
        )
        task = asyncio.ensure_future(runtime.start_release(spec, DeploymentLog(tmp_path / f"{attempt}.agent.log")))
        await asyncio.sleep(random.uniform(0, 0.15))
        task.cancel()
        try:
            handle = await task
        except asyncio.CancelledError:
            continue
        # It started before the cancel landed: the caller has its handle and removes it (as the undo does).
        await runtime.remove_release(handle, 0)
    await asyncio.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and marker in " ".join(p.info["cmdline"])]
    assert left == [], f"{len(left)} release process(es) outlived a cancelled start"
