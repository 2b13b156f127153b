"""ProvenLiveness: a process proven once by its start time, then watched through a pidfd."""

from __future__ import annotations

import subprocess
import time

import psutil

from agent.runtimes.process_tree import ProvenLiveness


def started_sleeper() -> tuple[subprocess.Popen[bytes], float]:
    process = subprocess.Popen(["sleep", "60"])
    return process, psutil.Process(process.pid).create_time()


def test_a_running_process_runs_until_it_ends_even_as_a_zombie() -> None:
    process, started = started_sleeper()
    try:
        liveness = ProvenLiveness(process.pid, started)
        assert liveness.running()
        assert liveness.running()  # now through its pidfd
        process.kill()
        deadline = time.monotonic() + 5
        while liveness.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Not reaped yet: a zombie has ended all the same.
        assert psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
        assert not liveness.running()
    finally:
        process.kill()
        process.wait()
    assert not liveness.running()


def test_another_start_time_is_another_process() -> None:
    process, started = started_sleeper()
    try:
        assert not ProvenLiveness(process.pid, started - 5).running()
    finally:
        process.kill()
        process.wait()


def test_a_pid_that_is_gone_is_not_running() -> None:
    process, started = started_sleeper()
    process.kill()
    process.wait()
    liveness = ProvenLiveness(process.pid, started)
    assert not liveness.running()
    liveness.close()
