"""A 100 MiB build log is written and served with bounded agent memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from tests.e2e.conftest import AgentProcess, build_request

MIB = 1024 * 1024


def test_100_mib_log_with_bounded_memory(agent_factory: Callable[..., AgentProcess]) -> None:
    """The agent's RSS stays bounded while it writes and then serves a log of over 100 MiB."""
    agent = agent_factory(max_log_bytes=200 * MIB)  # above the default cap of 100 MiB
    assert agent.process is not None
    process = psutil.Process(agent.process.pid)
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        line = "x" * 100
        command = f"yes {line} | head -c {100 * MIB}"
        created = agent.submit(build_request("biglog", command=command, timeout_s=300))
        final = agent.wait_for(created["id"], timeout=300)
        assert final["status"] == "succeeded", final
        size = Path(final["log_path"]).stat().st_size
        assert size > 100 * MIB
        received = 0
        with agent.request("GET", f"/v1/deployments/{created['id']}/logs", stream=True, timeout=120) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(chunk_size=MIB):
                received += len(chunk)
        assert received == size
    finally:
        stop.set()
        sampler.join()
    growth = peak[0] - baseline
    assert growth < 64 * MIB, f"agent memory grew by {growth / MIB:.1f} MiB for a {size / MIB:.0f} MiB log"
