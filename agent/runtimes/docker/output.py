"""Following a release container's output into its deployment log, across Docker's restarts of it.

(A build's output is read back from its Docker log instead: agent.runtimes.docker.build_output.)

A release's follower reads its attach stream on the gateway's stream pool until the container
stops; when Docker restarts it (restart policy, or the engine coming back), the follower
attaches again. Setting `stopping` first tells the follower that the end is the agent's doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from docker.types.daemon import CancellableStream

from agent.errors import RuntimeFailure, Unavailable
from agent.logs import DeploymentLog, LineSplitter, LogPolicy
from agent.runtimes.base import RELEASE_STAGE
from agent.runtimes.docker.gateway import ContainerMissing, DockerGateway, explain, is_running, retrieve

# How long the output stream may lag behind the container's exit before it is closed.
OUTPUT_DRAIN_S = 5.0
# Polling for Docker's restart of a release that exited: first and longest interval.
RESTART_POLL_S = (0.1, 0.5)
# How long to keep waiting for a release to come back while the Docker engine cannot be reached.
ENGINE_OUTAGE_S = 120.0


def pump_output(
    stream: CancellableStream, log: DeploymentLog, stage: str, closing: threading.Event | None = None
) -> None:
    """Copies the container's demultiplexed output into the log, line by line, as it comes; runs in a pool thread.

    `closing` is set when the agent closes the stream on purpose: its end is then no breakage.
    """
    splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
    try:
        for stdout, stderr in stream:
            if stdout:
                log.write_lines(stage, "stdout", splitters["stdout"].feed(stdout))
            if stderr:
                log.write_lines(stage, "stderr", splitters["stderr"].feed(stderr))
    except Exception as exc:  # noqa: BLE001 - a broken stream loses output, not the build
        if closing is None or not closing.is_set():
            log.agent(stage, f"the output stream broke: {exc}")
    finally:
        for name, splitter in splitters.items():
            log.write_lines(stage, name, splitter.flush())


@dataclass
class _ReleaseOutput:
    """The follower copying one release container's output into its deployment's log."""

    container_id: str
    log: DeploymentLog  # the follower's own writer, closed when it ends
    stream: CancellableStream | None = None
    # Set before the agent stops the container or lets go of it: the end of the stream is expected.
    stopping: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


class ReleaseOutputs:
    """The followers of the release containers whose output this agent copies into logs, by container id."""

    def __init__(self, gateway: DockerGateway) -> None:
        self._gateway = gateway
        self._outputs: dict[str, _ReleaseOutput] = {}

    def follow(self, container_id: str, log_path: Path, stream: CancellableStream | None, policy: LogPolicy) -> None:
        """Starts copying the container's output into the log at `log_path`, in the background."""
        # The follower writes through its own writer: the engine may close its log of the
        # deployment long before the release ends.
        output = _ReleaseOutput(container_id, DeploymentLog(log_path, policy), stream)
        self._outputs[container_id] = output
        output.task = asyncio.ensure_future(self._copy_output(output))
        output.task.add_done_callback(functools.partial(self._forget, output))

    async def reattach(self, container_id: str | None, log_path: Path, policy: LogPolicy) -> None:
        """Follows a release's output from now on (after an agent restart); a no-op when followed, gone or stopped."""
        if container_id is None or container_id in self._outputs:
            return
        details = await self._gateway.inspect_or_none(container_id)
        if details is None:
            return
        state = details.get("State") or {}
        stream = None
        if is_running(state):
            try:
                stream = await self._gateway.attach(container_id)
            except RuntimeFailure:
                return  # stopped or removed meanwhile: nothing to follow
        elif not state.get("Restarting"):
            return
        # Restarting: the follower picks the output up once Docker has started it again.
        self.follow(container_id, log_path, stream, policy)

    def expect_end(self, container_id: str) -> None:
        """Tells the container's follower that its stream is about to end on purpose."""
        output = self._outputs.get(container_id)
        if output is not None:
            output.stopping.set()

    async def stop_following(self, container_id: str, drain: bool = False) -> None:
        """Ends the container's follower; with `drain`, first lets a stopped container's stream end by itself."""
        output = self._outputs.get(container_id)
        if output is None or output.task is None:
            return
        output.stopping.set()
        task = output.task
        done: set[asyncio.Task[None]] = set()
        if drain:
            done, _ = await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)
        if not done:
            await self._close_stream(output)
            done, _ = await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)

    async def stop_all(self) -> None:
        """Ends every follower; the releases go on running."""
        await asyncio.gather(*(self.stop_following(container_id) for container_id in list(self._outputs)))

    def _forget(self, output: _ReleaseOutput, task: asyncio.Future[None]) -> None:
        retrieve(task)
        output.log.close()
        if self._outputs.get(output.container_id) is output:
            del self._outputs[output.container_id]

    async def _copy_output(self, output: _ReleaseOutput) -> None:
        """Copies output until the container stops for good, picking it up again after Docker restarts it."""
        try:
            while True:
                if output.stream is not None:
                    # The attach stream ends when the container stops (or when it is closed).
                    await self._gateway.in_stream_thread(
                        functools.partial(pump_output, output.stream, output.log, RELEASE_STAGE, output.stopping)
                    )
                    await self._close_stream(output)
                restarts = await self._await_restart(output)
                if restarts is None:
                    return
                try:
                    output.stream = await self._gateway.attach(output.container_id)
                except ContainerMissing:
                    return
                except RuntimeFailure:
                    continue  # "restarting": it exited again before the attach; wait for the next start
                if output.stopping.is_set():
                    await self._close_stream(output)
                    return
                output.log.agent(
                    RELEASE_STAGE,
                    f"Docker restarted the release container (restart {restarts}); following its output again",
                )
        except Exception as exc:  # noqa: BLE001 - a broken follower loses output, never the release
            if not output.stopping.is_set():
                output.log.agent(RELEASE_STAGE, f"stopped following the release output: {explain(exc)}")
        finally:
            with contextlib.suppress(Exception):
                await self._close_stream(output)

    async def _await_restart(self, output: _ReleaseOutput) -> int | None:
        """Waits for Docker to run the container again; its restart count, or None when it will not."""
        delay, longest = RESTART_POLL_S
        stopped_seen = 0
        outage_since: float | None = None
        while not output.stopping.is_set():
            try:
                details = await self._gateway.inspect_or_none(output.container_id)
            except Unavailable:
                # The engine itself restarting: it restarts the release (unless-stopped) once it is back.
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > ENGINE_OUTAGE_S:
                    raise
            else:
                if details is None:
                    return None
                outage_since = None
                state = details.get("State") or {}
                if is_running(state):
                    return int(details.get("RestartCount") or 0)
                if not state.get("Restarting"):
                    # Stopped and not to be restarted (docker stop); a few looks rule out a passing state.
                    stopped_seen += 1
                    if stopped_seen >= 3:
                        return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
        return None

    async def _close_stream(self, output: _ReleaseOutput) -> None:
        stream, output.stream = output.stream, None
        await self._gateway.close_stream(stream)
