"""Health checks against real local servers; release state comes from a scripted probe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from agent.errors import ReleaseUnhealthy
from agent.health import HealthTarget, check_release
from agent.logs import DeploymentLog
from agent.models import HealthCheckSpec
from agent.runtimes.base import ReleaseState


@pytest.fixture
def log(tmp_path: Path):
    with DeploymentLog(tmp_path / "dep.log") as log:
        yield log


async def serve(statuses: list[int]) -> tuple[web.AppRunner, int]:
    """An HTTP server answering with the given statuses in turn (the last one repeats)."""
    answers = iter(statuses)
    last = [statuses[-1]]

    async def handler(request: web.Request) -> web.Response:
        status = next(answers, last[0])
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def alive() -> ReleaseState:
    return ReleaseState(running=True, restart_count=0, pid=1)


async def always_alive() -> ReleaseState:
    return alive()


def fast(**overrides) -> HealthCheckSpec:
    return HealthCheckSpec(**{"interval_s": 0.05, "timeout_s": 1, "retries": 5, "stable_s": 0, **overrides})


async def test_http_passes_after_failures_and_logs_each_attempt(log: DeploymentLog) -> None:
    """503, 503, then 200: passes on the third attempt; each attempt is a log line."""
    runner, port = await serve([503, 503, 200])
    try:
        smoke = await check_release(fast(), HealthTarget("127.0.0.1", port), always_alive, log)
    finally:
        await runner.cleanup()
    assert smoke is not None and smoke["passed"] is True
    assert smoke["url"] == f"http://127.0.0.1:{port}/"
    assert smoke["errors"] == ["HTTP 503", "HTTP 503"]
    assert isinstance(smoke["duration_ms"], int) and smoke["tested_at"].endswith("Z")
    text = log.path.read_text()
    assert "attempt 1/5: HTTP 503" in text and "attempt 3/5: HTTP 200" in text


async def test_redirect_counts_as_healthy_and_404_does_not(log: DeploymentLog) -> None:
    """3xx is healthy (not followed); 4xx until the retries run out fails with the last errors."""
    runner, port = await serve([302])
    try:
        assert (await check_release(fast(), HealthTarget("127.0.0.1", port), always_alive, log))["passed"]
    finally:
        await runner.cleanup()
    runner, port = await serve([404])
    try:
        with pytest.raises(ReleaseUnhealthy) as caught:
            await check_release(fast(retries=3), HealthTarget("127.0.0.1", port), always_alive, log)
    finally:
        await runner.cleanup()
    assert caught.value.smoke_test["passed"] is False
    assert caught.value.smoke_test["errors"] == ["HTTP 404"] * 3
    assert not caught.value.died


async def test_tcp_check_connects(log: DeploymentLog) -> None:
    """A tcp check passes on a listening port and fails on a closed one."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        smoke = await check_release(fast(type="tcp"), HealthTarget("127.0.0.1", port), always_alive, log)
        assert smoke["passed"] and smoke["url"] == f"tcp://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(ReleaseUnhealthy):
        await check_release(fast(type="tcp", retries=2), HealthTarget("127.0.0.1", port), always_alive, log)


async def test_a_release_that_exits_during_the_check_fails_at_once(log: DeploymentLog) -> None:
    """Exit before any pass: fails on the next look with the exit code, long before the retries end."""
    calls = 0

    async def dies() -> ReleaseState:
        nonlocal calls
        calls += 1
        return alive() if calls < 2 else ReleaseState(running=False, exit_code=3)

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(ReleaseUnhealthy) as caught:
        await check_release(fast(retries=1000, interval_s=0.05), HealthTarget("127.0.0.1", 9), dies, log)
    assert loop.time() - began < 2
    assert caught.value.died and caught.value.exit_code == 3
    assert "exited with code 3" in caught.value.message


async def test_pass_then_restart_fails_within_stable_s(log: DeploymentLog) -> None:
    """Healthy once, then restarted by its supervisor: fails during the stable window."""
    runner, port = await serve([200])
    calls = 0

    async def flaps() -> ReleaseState:
        nonlocal calls
        calls += 1
        return alive() if calls < 4 else ReleaseState(running=True, restart_count=1, pid=2)

    try:
        with pytest.raises(ReleaseUnhealthy) as caught:
            await check_release(fast(stable_s=5), HealthTarget("127.0.0.1", port), flaps, log)
    finally:
        await runner.cleanup()
    assert caught.value.died and "restarted 1 time" in caught.value.message
    assert "must now stay up for 5s" in log.path.read_text()


async def test_no_health_check_only_needs_the_release_to_stay_up(log: DeploymentLog) -> None:
    """Without a check: None when it keeps running, ReleaseUnhealthy when it exits."""
    assert await check_release(None, None, always_alive, log) is None

    async def exited() -> ReleaseState:
        return ReleaseState(running=False, exit_code=1)

    with pytest.raises(ReleaseUnhealthy):
        await check_release(None, None, exited, log)
