"""The docker SDK behind one object: the client, the thread pools it runs on, labels, container housekeeping.

The SDK blocks, so every call to it runs on the gateway's own thread pool, sized for the
builds that may stream at once; release output streams, which last as long as their
releases, have a pool of their own, and the client's connection pool is as large as both.
The event loop never waits on Docker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
from typing import Any, Callable, Mapping, TypeVar

import docker
import docker.errors
import requests
import structlog
from docker.types.daemon import CancellableStream

from agent.config import DockerSettings
from agent.errors import RuntimeFailure, Unavailable
from agent.runtimes.docker.hardening import hardening_options

logger = structlog.get_logger("agent.docker")

DEPLOYMENT_LABEL = "deploy-agent.deployment"
# How long a removal someone else began is waited for (a container's removal takes milliseconds).
REMOVAL_WAIT_S = 30.0
APPLICATION_LABEL = "deploy-agent.application"
ROLE_LABEL = "deploy-agent.role"
# Which agent made a container, so that agents (or test runs) sharing one engine never clean up each other's.
INSTANCE_LABEL = "deploy-agent.instance"
BUILD_ROLE = "build"
# Committed images get their own role: containers inherit image labels, and a release
# started from the image must never look like a build container to the startup cleanup.
IMAGE_ROLE = "image"
RELEASE_ROLE = "release"
# The stopped container copy_workspace_out reads an image's /workspace from.
COPY_ROLE = "copy"
# The never-started container a build's result is committed from (see build.py); swept with builds.
SNAPSHOT_ROLE = "snapshot"
# Threads one build may hold at once: its output stream, its wait, and a short call.
THREADS_PER_BUILD = 3
# Release output streams at once (one thread each, created on demand): a stream left
# waiting for a thread stops reading, and an unread attach stream can block the release.
MAX_RELEASE_STREAMS = 256

T = TypeVar("T")


class ContainerMissing(RuntimeFailure):
    """Docker answered 404: the container (or image) is not there, e.g. removed by stop_deployment."""


class EngineUnreachable(Unavailable, RuntimeFailure):
    """The engine did not answer at all (stopped, restarting, socket gone): 503 to a request.

    A RuntimeFailure too, so that cleanup which tolerates a failed Docker call (removing a
    finished build's container) tolerates this one and lets the build's own result through.
    `reason` is why, without the "Docker engine unreachable" its message starts with.
    """

    def __init__(self, action: str | None, reason: str) -> None:
        prefix = f"{action} failed: " if action else ""
        super().__init__(f"{prefix}Docker engine unreachable: {reason}")
        self.reason = reason


class DockerGateway:
    """The docker client of one engine and the thread pools its blocking calls run on."""

    def __init__(
        self,
        settings: DockerSettings,
        max_streams: int,
        instance: str | None = None,
        max_release_streams: int = MAX_RELEASE_STREAMS,
    ) -> None:
        self.settings = settings
        # Containers are this gateway's when their instance label equals this (absent when None).
        self.instance = instance
        pool_size = THREADS_PER_BUILD * max(1, max_streams) + 4
        stream_pool_size = max(1, max_release_streams)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="docker")
        self._stream_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=stream_pool_size, thread_name_prefix="docker-release"
        )
        # Every thread may hold a connection at once: a followed stream keeps its own for as long as it lasts.
        self._max_connections = pool_size + stream_pool_size
        # Created on first use, in a pool thread: the SDK asks the engine for its API version
        # while constructing the client, which blocks and fails when the engine is down.
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()

    async def ping(self) -> str:
        """The Docker engine's version; raises Unavailable when it cannot be reached."""
        try:
            version = await self.in_thread(lambda: self._docker().version())
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the engine is not usable
            raise EngineUnreachable(None, explain(exc)) from exc
        return str(version.get("Version", "unknown"))

    async def call(self, action: str, function: Callable[[docker.DockerClient], T]) -> T:
        """Runs `function(client)` on the pool, turning docker's exceptions into RuntimeFailure."""
        try:
            return await self.in_thread(lambda: function(self._docker()))
        except docker.errors.NotFound as exc:
            raise ContainerMissing(f"{action}: {explain(exc)}") from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure(f"{action} failed: {explain(exc)}") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise EngineUnreachable(action, explain(exc)) from exc

    async def in_thread(self, function: Callable[[], T]) -> T:
        """Runs a short blocking call on the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function)

    async def in_stream_thread(self, function: Callable[[], T]) -> T:
        """Runs a release output stream on its own pool, apart from the short calls."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._stream_executor, function)

    def start_background(self, function: Callable[[], None]) -> asyncio.Future[None]:
        """Runs `function` on the pool without waiting; the future's exception counts as seen."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, function)
        future.add_done_callback(retrieve)
        return future

    # --- containers ------------------------------------------------------------------------

    async def create_cancel_safe(self, action: str, create: Callable[[docker.DockerClient], str]) -> str:
        """Runs a container create; when cancelled meanwhile, removes what it made."""
        creating = asyncio.ensure_future(self.call(action, create))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The create call goes on in its thread: remove what it makes so nothing is left behind.
            with contextlib.suppress(Exception):
                await self.remove_container(await creating)
            raise

    async def inspect(self, container_id: str, action: str | None = None) -> dict[str, Any]:
        """The container's details as Docker reports them."""
        return await self.call(
            action or f"inspecting container {container_id[:12]}",
            lambda client: client.api.inspect_container(container_id),
        )

    async def inspect_or_none(self, container_id: str | None) -> dict[str, Any] | None:
        """The container's details, or None when it is gone (or was never made)."""
        if container_id is None:
            return None
        try:
            return await self.inspect(container_id)
        except ContainerMissing:
            return None

    async def attach(self, container_id: str, action: str | None = None) -> CancellableStream:
        """A stream of the container's demultiplexed output from now on."""
        return await self.call(
            action or f"attaching to container {container_id[:12]}",
            lambda client: client.api.attach(container_id, stream=True, logs=False, demux=True),
        )

    async def start(self, container_id: str, action: str) -> None:
        await self.call(action, lambda client: client.api.start(container_id))

    async def list_containers(self, role: str, *labels: str) -> list[dict[str, Any]]:
        """This gateway's containers of `role`, running or not, that carry every given label."""
        wanted = [f"{ROLE_LABEL}={role}", *labels]
        if self.instance is not None:
            wanted.append(f"{INSTANCE_LABEL}={self.instance}")
        containers = await self.call(
            f"listing {role} containers", lambda client: client.api.containers(all=True, filters={"label": wanted})
        )
        # Docker cannot filter on a label's absence: drop other instances' containers here.
        # Release and copy containers say "no instance" with an empty label (see labels).
        return [
            entry for entry in containers if ((entry.get("Labels") or {}).get(INSTANCE_LABEL) or None) == self.instance
        ]

    def labels(self, role: str, deployment_id: str | None = None, application: str | None = None) -> dict[str, str]:
        """Labels of a release, snapshot or copy container.

        The instance label is always set, empty for no instance: containers inherit the labels
        of their image, and a build result image carries those of the container it came from.
        """
        labels = {ROLE_LABEL: role, INSTANCE_LABEL: self.instance or ""}
        if deployment_id is not None:
            labels[DEPLOYMENT_LABEL] = deployment_id
        if application is not None:
            labels[APPLICATION_LABEL] = application
        return labels

    async def stop_and_remove(self, container_id: str, grace_s: float) -> None:
        await self.stop_container(container_id, grace_s)
        await self.remove_container(container_id)

    async def stop_container(self, container_id: str, grace_s: float) -> None:
        """SIGTERM to the container's init, SIGKILL after the grace period; gone already is fine."""
        # The engine's API takes whole seconds only.
        seconds = max(0, math.ceil(grace_s))
        with contextlib.suppress(ContainerMissing):
            await self.call(
                f"stopping container {container_id[:12]}",
                lambda client: client.api.stop(container_id, timeout=seconds),
            )

    async def remove_container(self, container_id: str) -> None:
        """Force-removes a container; returns once it is gone (removed already, or by someone else meanwhile).

        Being removed by someone else (a kill's stop beside the build's own cleanup) is waited
        for: a caller goes on to report "nothing left", which must be true when it does.
        """
        try:
            await self.call(
                f"removing container {container_id[:12]}",
                lambda client: client.api.remove_container(container_id, force=True),
            )
        except ContainerMissing:
            return
        except RuntimeFailure as exc:
            if "already in progress" not in exc.message:
                raise
            await self._wait_until_gone(container_id)

    async def _wait_until_gone(self, container_id: str) -> None:
        deadline = asyncio.get_running_loop().time() + REMOVAL_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            try:
                await self.call(f"inspecting container {container_id[:12]}",
                                lambda client: client.api.inspect_container(container_id))
            except ContainerMissing:
                return
            await asyncio.sleep(0.05)
        logger.warning("a container is still being removed", container_id=container_id[:12])

    async def close_stream(self, stream: CancellableStream | None) -> None:
        """Closes a followed stream, which unblocks the thread reading it; a broken one is fine."""
        if stream is not None:
            await self.in_thread(lambda: _close_quietly(stream))

    async def close(self) -> None:
        """Closes the client and the thread pools, without waiting for threads blocked on streams."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self.in_thread(self._client.close)
        # No waiting: a thread still blocked on a stream must not hang the daemon's shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stream_executor.shutdown(wait=False, cancel_futures=True)

    def _docker(self) -> docker.DockerClient:
        """The client, created on first use; only ever called from a pool thread."""
        with self._client_lock:
            if self._client is None:
                if self.settings.url:
                    self._client = docker.DockerClient(base_url=self.settings.url, max_pool_size=self._max_connections)
                else:
                    self._client = docker.from_env(max_pool_size=self._max_connections)
            return self._client


def create_idle_container(client: docker.DockerClient, image: str, labels: dict[str, str], name: str | None = None) -> str:
    """Creates a hardened container of `image` that is never started, only read from or written to."""
    api = client.api
    created = api.create_container(
        image=image,
        # Never started: any command does, and an image without one still gets a container.
        command=["true"],
        entrypoint=[],
        labels=labels,
        name=name,
        host_config=api.create_host_config(**hardening_options()),
    )
    return str(created["Id"])


def command_line(command: tuple[str, ...] | str) -> list[str]:
    """The argv a container runs: a string through /bin/sh -c, a tuple as given."""
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def is_running(state: Mapping[str, Any]) -> bool:
    """Whether a container's State says it runs now."""
    # While Docker waits to restart a crashed container it reports Running and Restarting both.
    return bool(state.get("Running")) and not state.get("Restarting")


def explain(exc: BaseException) -> str:
    """What went wrong, in Docker's words when Docker said it."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    if isinstance(exc, RuntimeFailure):
        return exc.message
    return str(exc) or type(exc).__name__


def retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a background future's exception as seen; its owner decides whether it matters."""
    if not future.cancelled():
        future.exception()


def _close_quietly(stream: CancellableStream) -> None:
    with contextlib.suppress(Exception):
        stream.close()
