"""Health checks of a new release, run from the agent (the image needs no curl or wget).

A release passes when a probe succeeds within its retries and it then stays up,
with no exit and no restart, for `stable_s`: a release that answers once and
then crash-loops fails instead of being reported done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp

from agent.errors import ReleaseExited, ReleaseUnhealthy
from agent.logs import DeploymentLog
from agent.models import HealthCheckSpec, utc_now
from agent.runtimes.base import ReleaseState

STAGE = "health"
STATE_POLL_S = 0.25
KEPT_ERRORS = 5
# Without a health check a release must at least still run after this long.
UNCHECKED_STABLE_S = 1.0


@dataclass(frozen=True)
class HealthTarget:
    """Where the agent reaches the release's checked port."""

    host: str
    port: int


StateProbe = Callable[[], Awaitable[ReleaseState]]


async def check_release(
    spec: HealthCheckSpec | None, target: HealthTarget | None, state: StateProbe, log: DeploymentLog
) -> dict[str, Any] | None:
    """Runs the check; returns the smoke_test (None without a check) or raises ReleaseUnhealthy.

    ReleaseExited (a ReleaseUnhealthy) when the release died or restarted meanwhile.
    """
    if spec is None or target is None:
        initial = await state()
        await _raise_if_dead(state, initial, log, None)
        await _sleep_alive(state, initial, UNCHECKED_STABLE_S, log, None)
        return None
    started = time.monotonic()
    url = _url_of(spec, target)
    errors: list[str] = []

    def smoke_test(passed: bool) -> dict[str, Any]:
        return {
            "passed": passed,
            "url": url,
            "errors": errors[-KEPT_ERRORS:],
            "duration_ms": int((time.monotonic() - started) * 1000),
            "tested_at": utc_now(),
        }

    initial = await state()
    log.agent(STAGE, f"checking {url} ({spec.type}, up to {spec.retries} attempts every {spec.interval_s:g}s)")
    if spec.start_period_s:
        await _sleep_alive(state, initial, spec.start_period_s, log, smoke_test)
    passed = False
    async with aiohttp.ClientSession() as session:
        for attempt in range(1, spec.retries + 1):
            await _raise_if_dead(state, initial, log, smoke_test)
            ok, detail = await _probe(session, spec, target, url)
            log.agent(STAGE, f"attempt {attempt}/{spec.retries}: {detail}")
            if ok:
                passed = True
                break
            errors.append(detail)
            if attempt < spec.retries:
                await _sleep_alive(state, initial, spec.interval_s, log, smoke_test)
    if not passed:
        message = f"health check of {url} failed {spec.retries} times; last: {errors[-1] if errors else 'no answer'}"
        raise ReleaseUnhealthy(message, smoke_test=smoke_test(False))
    if spec.stable_s:
        log.agent(STAGE, f"passed; the release must now stay up for {spec.stable_s:g}s")
        await _raise_if_dead(state, initial, log, smoke_test)
        await _sleep_alive(state, initial, spec.stable_s, log, smoke_test)
    result = smoke_test(True)
    log.agent(STAGE, f"healthy after {result['duration_ms']} ms")
    return result


def _url_of(spec: HealthCheckSpec, target: HealthTarget) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    if spec.type == "tcp":
        return f"tcp://{host}:{target.port}"
    return f"http://{host}:{target.port}{spec.path}"


async def _probe(
    session: aiohttp.ClientSession, spec: HealthCheckSpec, target: HealthTarget, url: str
) -> tuple[bool, str]:
    try:
        if spec.type == "tcp":
            _, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), spec.timeout_s)
            writer.close()
            await writer.wait_closed()
            return True, "connected"
        timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        async with session.get(url, allow_redirects=False, timeout=timeout) as response:
            if 200 <= response.status < 400:
                return True, f"HTTP {response.status}"
            return False, f"HTTP {response.status}"
    except asyncio.TimeoutError:
        return False, f"no answer within {spec.timeout_s:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300]


async def _raise_if_dead(
    state: StateProbe,
    initial: ReleaseState,
    log: DeploymentLog,
    smoke_test: Callable[[bool], dict[str, Any]] | None,
) -> None:
    current = await state()
    if current.running and current.restart_count == initial.restart_count:
        return
    if current.running:
        message = f"the release crashed and was restarted {current.restart_count - initial.restart_count} time(s)"
    else:
        message = f"the release exited with code {current.exit_code}"
    log.agent(STAGE, message)
    raise ReleaseExited(message, exit_code=current.exit_code, smoke_test=smoke_test(False) if smoke_test else None)


async def _sleep_alive(
    state: StateProbe,
    initial: ReleaseState,
    seconds: float,
    log: DeploymentLog,
    smoke_test: Callable[[bool], dict[str, Any]] | None,
) -> None:
    """Waits `seconds`, failing at once if the release dies meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(STATE_POLL_S, left))
        await _raise_if_dead(state, initial, log, smoke_test)

