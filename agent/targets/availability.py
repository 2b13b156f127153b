"""Whether the Docker engine of a place answers, and builds that ride out its going away.

One `EngineGate` per place that has an engine (this host, each server). The scheduler asks
it before starting a deployment that needs Docker: while the engine is unreachable the
deployment stays queued and the gate pings it with backoff in the background; when it
answers again the gate calls back whoever waited (the scheduler wakes up), so no restart
of the agent is needed, whether the agent started without an engine or it went away later.

A build whose engine went away mid-way (`OutageAwareBuilder`) waits for the engine, then is
re-adopted if its container survived, or else ends `docker_unavailable` with the exit code
Docker reported, and its container removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Awaitable, Callable

import structlog

from agent.errors import AgentError, BuildTimedOut, DeploymentFailure, DockerUnavailable, Unavailable
from agent.logs import DeploymentLog
from agent.models import Deployment
from agent.runtimes.docker.gateway import EngineUnreachable
from agent.specs import LOCAL_SERVER
from agent.targets.base import Builder, BuildWatch, Built, ReattachingBuilder

logger = structlog.get_logger("agent.targets")

PING_TIMEOUT_S = 3.0
# An engine seen answering this recently is taken as up without asking it again.
FRESH_S = 1.0
FIRST_RETRY_S = 0.25
LONGEST_RETRY_S = 3.0
STAGE = "build"
# Docker stops its containers (SIGTERM, then SIGKILL) before it stops answering: a build that
# died of one of these is watched this long for its engine going away.
SIGNAL_EXIT_CODES = frozenset({137, 143})
OUTAGE_WINDOW_S = 3.0
WINDOW_POLL_S = 0.1

Ping = Callable[[], Awaitable[str]]
Reattach = Callable[[Deployment, DeploymentLog, "BuildWatch"], Awaitable["Built | None"]]


class EngineGate:
    """Whether one place's Docker engine answers; pings it with backoff while it does not."""

    def __init__(self, place: str, ping: Ping) -> None:
        self.place = place
        self._ping = ping
        self._up = asyncio.Event()
        self._checked_at = float("-inf")
        self.reason: str | None = None
        # How often it was seen going away: a build compares it before and after.
        self.outages = 0
        self._watcher: asyncio.Task[None] | None = None
        self._on_back: list[Callable[[], None]] = []
        # Deployments whose log already says they wait, during this outage.
        self._told: set[str] = set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def ping(self) -> str:
        """Asks the engine now; its version, or Unavailable with the reason alone (no prefix)."""
        try:
            version = await asyncio.wait_for(self._ping(), timeout=PING_TIMEOUT_S)
        except EngineUnreachable as exc:
            self._went_away(exc.reason)
            raise Unavailable(exc.reason) from exc
        except Unavailable as exc:
            self._went_away(exc.message)
            raise
        except asyncio.TimeoutError as exc:
            self._went_away(f"no answer within {PING_TIMEOUT_S:g}s")
            raise Unavailable(self.reason or "timed out") from exc
        self._came_back()
        return version

    async def check(self) -> bool:
        """Whether the engine answers now; any failure but an unreachable engine counts as answering.

        A server whose SSH login is refused is not an engine outage: its deployments run and
        fail with their own error.
        """
        with contextlib.suppress(AgentError):
            await self.ping()
        return self.is_up or self.reason is None

    async def ready(self, on_back: Callable[[], None]) -> bool:
        """True when the engine answers; otherwise False, and `on_back()` is called once it does."""
        if self.is_up and time.monotonic() - self._checked_at < FRESH_S:
            return True
        if self._watcher is None and await self.check():
            return True
        if on_back not in self._on_back:
            self._on_back.append(on_back)
        return False

    def first_to_tell(self, deployment_id: str) -> bool:
        """Whether `deployment_id` was not yet told it waits during this outage (it is now)."""
        if deployment_id in self._told:
            return False
        self._told.add(deployment_id)
        return True

    async def went_away_since(self, outages: int) -> bool:
        """Whether the engine is unreachable now, or was since `outages` was read."""
        await self.check()
        return self.outages != outages or self._watcher is not None

    async def went_away_within(self, outages: int, window_s: float) -> bool:
        """Like went_away_since, watching for up to `window_s` more (the engine may be on its way down)."""
        deadline = time.monotonic() + window_s
        while not await self.went_away_since(outages):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(WINDOW_POLL_S)
        return True

    async def wait_until_up(self, timeout_s: float) -> bool:
        """Waits at most `timeout_s` for the engine to answer again; whether it did."""
        if self._watcher is None and self.is_up:
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout=max(0.0, timeout_s))
        return self.is_up

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    def _went_away(self, reason: str) -> None:
        self._checked_at = time.monotonic()
        self.reason = reason
        self._up.clear()
        if self._watcher is None:
            self.outages += 1
            logger.warning("Docker engine unreachable; waiting for it", place=self.place, reason=reason)
            self._watcher = asyncio.create_task(self._watch(), name=f"docker-gate-{self.place}")

    def _came_back(self) -> None:
        self._checked_at = time.monotonic()
        was_down = self.reason is not None
        self.reason = None
        self._up.set()
        self._told.clear()
        callbacks, self._on_back = self._on_back, []
        if was_down:
            logger.info("Docker engine answers again", place=self.place)
        for callback in callbacks:
            callback()

    async def _watch(self) -> None:
        """Pings with backoff until the engine answers (which calls back the waiting)."""
        delay = FIRST_RETRY_S
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, LONGEST_RETRY_S)
                with contextlib.suppress(AgentError):
                    await self.ping()
                if self.is_up:
                    return
        finally:
            if asyncio.current_task() is self._watcher:
                self._watcher = None


def tell_waiting(deployment: Deployment, log: DeploymentLog, gate: EngineGate) -> None:
    """The one log line of a queued deployment that waits for its engine."""
    where = "this host" if gate.place == LOCAL_SERVER else f"server {gate.place}"
    log.agent(
        "queue",
        f"waiting for the Docker engine of {where} (unreachable: {gate.reason}); "
        "the deployment starts once it answers again",
    )


class OutageAwareBuilder:
    """A container builder whose engine may go away mid-build: waits, re-adopts or fails `docker_unavailable`."""

    def __init__(self, inner: Builder, gate: EngineGate, reattach: Reattach) -> None:
        self._inner = inner
        self._gate = gate
        self._reattach = reattach

    @property
    def inner(self) -> Builder:
        """The builder proper (for tests and diagnostics: which one it is)."""
        return self._inner

    async def build(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built:
        return await self._riding_out(self._inner.build, deployment, log, watch)

    async def reattach(self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch) -> Built | None:
        """After a restart: the inner builder takes the build back; an outage meanwhile is ridden out as in `build`."""
        inner = self._inner
        if not isinstance(inner, ReattachingBuilder):
            return None
        return await self._riding_out(inner.reattach, deployment, log, watch)

    async def _riding_out(
        self, work: Callable[[Deployment, DeploymentLog, BuildWatch], Awaitable[Any]], deployment: Deployment,
        log: DeploymentLog, watch: BuildWatch,
    ) -> Any:
        outages = self._gate.outages
        started = time.monotonic()
        try:
            return await work(deployment, log, watch)
        except BuildTimedOut:
            raise
        except DeploymentFailure as exc:
            # The build's own failure, unless the engine's shutdown killed it.
            if exc.exit_code not in SIGNAL_EXIT_CODES or not await self._gate.went_away_within(outages, OUTAGE_WINDOW_S):
                raise
            failure: AgentError = exc
        except AgentError as exc:
            if not await self._gate.went_away_since(outages):
                raise
            failure = exc
        build = deployment.spec.build
        budget = (build.timeout_s if build is not None else 0) - (time.monotonic() - started)
        return await self._after_outage(deployment, log, watch, failure, budget)

    async def _after_outage(
        self, deployment: Deployment, log: DeploymentLog, watch: BuildWatch, failure: AgentError, budget: float
    ) -> Built:
        # An exit code means Docker saw the container end (it stops them when it stops, unless live-restore).
        exit_code = getattr(failure, "exit_code", None)
        log.agent(STAGE, f"the Docker engine went away during the build ({failure.message}); waiting for it")
        if not await self._gate.wait_until_up(budget):
            raise DockerUnavailable(
                f"the Docker engine went away during the build and did not answer again within its timeout "
                f"({self._gate.reason})",
                exit_code=exit_code,
            )
        if exit_code is None:
            built = await self._reattach(deployment, log, watch)
            if built is not None:
                return built
        removed = await self._inner.stop_work(deployment)
        ended = f"exited with code {exit_code}" if exit_code is not None else "is gone"
        message = f"the Docker engine went away during the build; its container {ended}"
        log.agent(STAGE, f"{message} ({removed} container(s) removed)")
        raise DockerUnavailable(message, exit_code=exit_code)

    async def finish(self, deployment: Deployment, *, kept: bool) -> None:
        await self._inner.finish(deployment, kept=kept)

    async def stop_work(self, deployment: Deployment) -> int:
        return await self._inner.stop_work(deployment)
