"""Builds in Docker containers: create, copy the workspace in, start, stream, wait, stop, commit, remove.

The docker SDK blocks, so every call to it runs on this runtime's own thread pool,
sized for the builds that may stream at once; the event loop never waits on Docker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, Mapping, TypeVar

import docker
import docker.errors
import requests
from docker.types.daemon import CancellableStream
from docker.utils import parse_repository_tag

from agent.config import DockerSettings
from agent.errors import RuntimeFailure, Unavailable
from agent.logs import DeploymentLog, LineSplitter

DEPLOYMENT_LABEL = "deploy-agent.deployment"
APPLICATION_LABEL = "deploy-agent.application"
ROLE_LABEL = "deploy-agent.role"
# Which agent made a container, so that agents (or test runs) sharing one engine never clean up each other's.
INSTANCE_LABEL = "deploy-agent.instance"
BUILD_ROLE = "build"
# Committed images get their own role: containers inherit image labels, and a release
# started from the image must never look like a build container to the startup cleanup.
IMAGE_ROLE = "image"
WORKSPACE = "/workspace"
STAGE = "build"
# How long the output stream may lag behind the container's exit before it is closed.
OUTPUT_DRAIN_S = 5.0
# Exit code reported when the container vanished before its exit code could be read (as SIGKILL).
UNKNOWN_EXIT_CODE = 137
# Threads one build may hold at once: its output stream, its wait, and a short call.
THREADS_PER_BUILD = 3

T = TypeVar("T")


@dataclass(frozen=True)
class BuildJob:
    """One build to run: the command, its image and environment, and the workspace to copy in."""

    deployment_id: str
    application: str
    image: str
    command: tuple[str, ...] | str
    env: Mapping[str, str]
    timeout_s: float
    workspace: Path
    commit_image: str | None = None


@dataclass(frozen=True)
class BuildResult:
    """How a build ended; `image` is the committed reference when one was asked for and made."""

    exit_code: int
    timed_out: bool
    image: str | None


class _ContainerMissing(RuntimeFailure):
    """Docker answered 404: the container (or image) is not there, e.g. removed by stop_deployment."""


@dataclass
class _BuildSession:
    """The moving parts of one running build, so that cleanup can reach every one of them."""

    container_id: str
    stream: CancellableStream | None = None
    pump: asyncio.Future[None] | None = None
    waiting: asyncio.Future[dict[str, Any]] | None = None


class ContainerRuntime:
    """Runs build containers through the docker SDK on a dedicated thread pool."""

    def __init__(
        self, settings: DockerSettings, max_streams: int, kill_grace_s: float = 10.0, instance: str | None = None
    ) -> None:
        self._settings = settings
        self._kill_grace_s = kill_grace_s
        # Containers are this runtime's when their instance label equals this (absent when None).
        self._instance = instance
        self._pool_size = THREADS_PER_BUILD * max(1, max_streams) + 4
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._pool_size, thread_name_prefix="docker"
        )
        # Created on first use, in a pool thread: the SDK asks the engine for its API version
        # while constructing the client, which blocks and fails when the engine is down.
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._closed = False

    # --- public interface ------------------------------------------------------------------

    async def ping(self) -> str:
        """The Docker engine's version; raises Unavailable when it cannot be reached."""
        try:
            version = await self._in_thread(lambda: self._docker().version())
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the engine is not usable
            raise Unavailable(f"Docker engine unreachable: {_explain(exc)}") from exc
        return str(version.get("Version", "unknown"))

    async def run_build(
        self, job: BuildJob, log: DeploymentLog, on_start: Callable[[str, int], Awaitable[None]]
    ) -> BuildResult:
        """Runs the build command in a fresh container and always removes the container after."""
        await self._ensure_image(job.image, log)
        container_id = await self._create_container(job)
        session = _BuildSession(container_id)
        try:
            return await self._run_container(session, job, log, on_start)
        except _ContainerMissing as exc:
            log.agent(STAGE, f"the build container was removed while the build ran ({exc.message})")
            exit_code = _exit_code_of(session.waiting)
            return BuildResult(exit_code=exit_code, timed_out=False, image=None)
        finally:
            # Shielded: a second cancellation must not leave the container behind.
            await asyncio.shield(self._discard_session(session))

    async def stop_deployment(self, deployment_id: str, grace_s: float) -> int:
        """Stops (SIGTERM, SIGKILL after `grace_s`) and removes the deployment's build containers."""
        containers = await self._list_build_containers(f"{DEPLOYMENT_LABEL}={deployment_id}")
        await asyncio.gather(*(self._stop_and_remove(entry["Id"], grace_s) for entry in containers))
        return len(containers)

    async def remove_build_containers(self, keep: Callable[[str], bool]) -> list[str]:
        """Removes build containers whose deployment `keep` rejects; returns those deployment ids."""
        containers = await self._list_build_containers()
        removed: list[str] = []
        for entry in containers:
            deployment_id = (entry.get("Labels") or {}).get(DEPLOYMENT_LABEL)
            if not deployment_id or keep(deployment_id):
                continue
            await self._remove_container(entry["Id"])
            removed.append(deployment_id)
        return removed

    async def image_exists(self, reference: str) -> bool:
        """Whether the image is present on this host."""
        try:
            await self._call(f"inspecting image {reference}", lambda: self._docker().api.inspect_image(reference))
        except _ContainerMissing:
            return False
        return True

    async def close(self) -> None:
        """Closes the docker client and the thread pool."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._in_thread(self._client.close)
        # No waiting: a thread still blocked on a stream must not hang the daemon's shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the steps of a build --------------------------------------------------------------

    async def _ensure_image(self, image: str, log: DeploymentLog) -> None:
        if await self.image_exists(image):
            return
        log.agent(STAGE, f"image {image} is not present on this host; pulling it")
        repository, tag = parse_repository_tag(image)
        try:
            await self._call(f"pulling image {image}", lambda: self._docker().images.pull(repository, tag=tag))
        except RuntimeFailure as exc:
            raise RuntimeFailure(
                f"image {image} is not present on this host and could not be pulled: {exc.message}"
            ) from exc

    async def _create_container(self, job: BuildJob) -> str:
        creating = asyncio.ensure_future(
            self._call("creating the build container", functools.partial(self._create_in_thread, job))
        )
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The create call goes on in its thread: remove what it makes so nothing is left behind.
            with contextlib.suppress(Exception):
                await self._remove_container(await creating)
            raise

    def _create_in_thread(self, job: BuildJob) -> str:
        api = self._docker().api
        settings = self._settings
        host_config = api.create_host_config(
            init=True,  # docker-init forwards SIGTERM to the command and reaps zombies
            privileged=False,
            mem_limit=settings.build_memory_bytes,
            nano_cpus=int(settings.build_cpus * 1e9) if settings.build_cpus else None,
            pids_limit=settings.build_pids,
            # Half the default CPU weight: a busy build never starves the agent serving the API.
            cpu_shares=512,
            # The agent streams output itself; Docker keeping a second copy costs CPU and disk.
            log_config={"Type": "none", "Config": {}},
        )
        labels = _build_labels(job)
        if self._instance is not None:
            labels[INSTANCE_LABEL] = self._instance
        created = api.create_container(
            image=job.image,
            command=_command_of(job.command),
            # The command runs exactly as given, never as arguments to an image's entrypoint.
            entrypoint=[],
            environment=dict(job.env),
            working_dir=WORKSPACE,
            labels=labels,
            name=f"deploy-agent-build-{job.deployment_id}",
            host_config=host_config,
        )
        return str(created["Id"])

    async def _run_container(
        self,
        session: _BuildSession,
        job: BuildJob,
        log: DeploymentLog,
        on_start: Callable[[str, int], Awaitable[None]],
    ) -> BuildResult:
        container_id = session.container_id
        await self._copy_workspace(container_id, job.workspace)
        # Attached before the start, so that not one line of early output is missed.
        session.stream = await self._call(
            "attaching to the build container",
            lambda: self._docker().api.attach(container_id, stream=True, logs=False, demux=True),
        )
        session.pump = self._background(functools.partial(_pump_output, session.stream, log))
        log.agent(STAGE, f"starting build container {container_id[:12]} from {job.image}")
        await self._call("starting the build container", lambda: self._docker().api.start(container_id))
        details = await self._call(
            "inspecting the build container", lambda: self._docker().api.inspect_container(container_id)
        )
        await on_start(container_id, int((details.get("State") or {}).get("Pid") or 0))

        exit_code, timed_out = await self._wait_for_exit(session, job, log)
        await self._drain_output(session, log)
        if timed_out:
            return BuildResult(exit_code=exit_code, timed_out=True, image=None)
        log.agent(STAGE, f"build container exited with code {exit_code}")
        image = None
        if exit_code == 0 and job.commit_image:
            image = await self._commit(container_id, job, log)
        return BuildResult(exit_code=exit_code, timed_out=False, image=image)

    async def _copy_workspace(self, container_id: str, workspace: Path) -> None:
        try:
            archive = await self._in_thread(functools.partial(_archive_workspace, workspace))
        except OSError as exc:
            raise RuntimeFailure(f"archiving the workspace {workspace} failed: {exc}") from exc
        try:
            await self._call(
                "copying the workspace into the build container",
                lambda: self._docker().api.put_archive(container_id, "/", archive),
            )
        finally:
            archive.close()

    async def _wait_for_exit(self, session: _BuildSession, job: BuildJob, log: DeploymentLog) -> tuple[int, bool]:
        """Waits at most the job's timeout for the container to exit; stops it on expiry."""
        container_id = session.container_id
        session.waiting = asyncio.ensure_future(
            self._call("waiting for the build container", lambda: self._docker().api.wait(container_id))
        )
        session.waiting.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({session.waiting}, timeout=job.timeout_s)
        timed_out = not done
        if timed_out:
            log.agent(STAGE, f"build timed out after {job.timeout_s:g}s; stopping")
            await self._stop_container(container_id, self._kill_grace_s)
        try:
            status = await session.waiting
        except _ContainerMissing:
            if not timed_out:
                raise
            status = {}  # removed by someone else while being stopped: it timed out all the same
        return int(status.get("StatusCode", UNKNOWN_EXIT_CODE)), timed_out

    async def _drain_output(self, session: _BuildSession, log: DeploymentLog) -> None:
        """Lets the output stream finish after the exit; closes it if it lingers."""
        assert session.pump is not None
        done, _ = await asyncio.wait({session.pump}, timeout=OUTPUT_DRAIN_S)
        if not done:
            log.agent(STAGE, "the output stream did not end with the container; closing it")
            await self._close_stream(session)
            await asyncio.wait({session.pump}, timeout=OUTPUT_DRAIN_S)

    async def _commit(self, container_id: str, job: BuildJob, log: DeploymentLog) -> str:
        assert job.commit_image is not None
        repository, tag = parse_repository_tag(job.commit_image)
        tag = tag or "latest"
        base_config = await self._image_config(job.image)
        # Docker merges this into the container's config: restore the base image's command
        # and entrypoint so the image does not rerun the build when started without a command.
        conf = {
            "Labels": {
                DEPLOYMENT_LABEL: job.deployment_id,
                APPLICATION_LABEL: job.application,
                ROLE_LABEL: IMAGE_ROLE,
            },
            "Cmd": base_config.get("Cmd"),
            "Entrypoint": base_config.get("Entrypoint"),
        }
        try:
            await self._call(
                "committing the build result",
                lambda: self._docker().api.commit(container_id, repository=repository, tag=tag, conf=conf),
            )
        except _ContainerMissing as exc:
            raise RuntimeFailure(
                f"the build container was removed before its result could be committed: {exc.message}"
            ) from exc
        reference = f"{repository}:{tag}"
        log.agent(STAGE, f"committed the build result as image {reference}")
        return reference

    async def _image_config(self, reference: str) -> dict[str, Any]:
        """The image's config, or an empty one when the image is gone."""
        try:
            details = await self._call(f"inspecting image {reference}", lambda: self._docker().api.inspect_image(reference))
        except _ContainerMissing:
            return {}
        return details.get("Config") or {}

    async def _discard_session(self, session: _BuildSession) -> None:
        """Removes the container, closes its stream and lets the build's threads finish."""
        with contextlib.suppress(RuntimeFailure):
            await self._remove_container(session.container_id)
        await self._close_stream(session)
        pending = [future for future in (session.pump, session.waiting) if future is not None]
        if pending:
            await asyncio.wait(pending, timeout=OUTPUT_DRAIN_S)

    # --- container housekeeping ------------------------------------------------------------

    async def _list_build_containers(self, *labels: str) -> list[dict[str, Any]]:
        """This runtime's build containers, running or not, that carry every given label."""
        wanted = [f"{ROLE_LABEL}={BUILD_ROLE}", *labels]
        if self._instance is not None:
            wanted.append(f"{INSTANCE_LABEL}={self._instance}")
        containers = await self._call(
            "listing build containers", lambda: self._docker().api.containers(all=True, filters={"label": wanted})
        )
        # Docker cannot filter on a label's absence: drop other instances' containers here.
        return [entry for entry in containers if (entry.get("Labels") or {}).get(INSTANCE_LABEL) == self._instance]

    async def _stop_and_remove(self, container_id: str, grace_s: float) -> None:
        await self._stop_container(container_id, grace_s)
        await self._remove_container(container_id)

    async def _stop_container(self, container_id: str, grace_s: float) -> None:
        """SIGTERM to the container's init, SIGKILL after the grace period; gone already is fine."""
        # The engine's API takes whole seconds only.
        seconds = max(0, math.ceil(grace_s))
        with contextlib.suppress(_ContainerMissing):
            await self._call(
                f"stopping container {container_id[:12]}",
                lambda: self._docker().api.stop(container_id, timeout=seconds),
            )

    async def _remove_container(self, container_id: str) -> None:
        """Force-removes a container; gone already, or being removed by someone else, is fine."""
        try:
            await self._call(
                f"removing container {container_id[:12]}",
                lambda: self._docker().api.remove_container(container_id, force=True),
            )
        except _ContainerMissing:
            return
        except RuntimeFailure as exc:
            if "already in progress" not in exc.message:
                raise

    async def _close_stream(self, session: _BuildSession) -> None:
        stream = session.stream
        if stream is not None:
            await self._in_thread(functools.partial(_close_quietly, stream))

    # --- threads ---------------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        """The client, created on first use; only ever called from a pool thread."""
        with self._client_lock:
            if self._client is None:
                if self._settings.url:
                    self._client = docker.DockerClient(base_url=self._settings.url, max_pool_size=self._pool_size)
                else:
                    self._client = docker.from_env(max_pool_size=self._pool_size)
            return self._client

    async def _in_thread(self, function: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function)

    def _background(self, function: Callable[[], None]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().run_in_executor(self._executor, function)
        future.add_done_callback(_retrieve)
        return future

    async def _call(self, action: str, function: Callable[[], T]) -> T:
        """Runs a docker call on the pool, turning docker's exceptions into RuntimeFailure."""
        try:
            return await self._in_thread(function)
        except docker.errors.NotFound as exc:
            raise _ContainerMissing(f"{action}: {_explain(exc)}") from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure(f"{action} failed: {_explain(exc)}") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise Unavailable(f"{action} failed: Docker engine unreachable: {exc}") from exc


# --- helpers that run in pool threads ------------------------------------------------------


def _pump_output(stream: CancellableStream, log: DeploymentLog) -> None:
    """Copies the container's demultiplexed output into the log, line by line, as it comes."""
    splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
    try:
        for stdout, stderr in stream:
            if stdout:
                log.write_lines(STAGE, "stdout", splitters["stdout"].feed(stdout))
            if stderr:
                log.write_lines(STAGE, "stderr", splitters["stderr"].feed(stderr))
    except Exception as exc:  # noqa: BLE001 - a broken stream loses output, not the build
        log.agent(STAGE, f"the output stream broke: {exc}")
    finally:
        for name, splitter in splitters.items():
            log.write_lines(STAGE, name, splitter.flush())


def _archive_workspace(workspace: Path) -> IO[bytes]:
    """A tar of the workspace as `workspace/`, in an unnamed temporary file (sources may be big)."""
    # Next to the workspace rather than in /tmp, which is often a RAM-backed tmpfs.
    directory = workspace.parent if workspace.parent.is_dir() else None
    archive = tempfile.TemporaryFile(dir=directory, prefix=".workspace-", suffix=".tar")
    try:
        with tarfile.open(fileobj=archive, mode="w") as tar:
            if workspace.is_dir():
                tar.add(workspace, arcname="workspace", filter=_owned_by_root)
            else:
                # No source: /workspace must still exist, empty.
                entry = tarfile.TarInfo("workspace")
                entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(entry)
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return archive


def _owned_by_root(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    # As `docker cp` does: the agent's own uid means nothing inside the container.
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = "root"
    return entry


def _close_quietly(stream: CancellableStream) -> None:
    with contextlib.suppress(Exception):
        stream.close()


# --- small pure helpers --------------------------------------------------------------------


def _command_of(command: tuple[str, ...] | str) -> list[str]:
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def _build_labels(job: BuildJob) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: job.deployment_id, APPLICATION_LABEL: job.application, ROLE_LABEL: BUILD_ROLE}


def _exit_code_of(waiting: asyncio.Future[dict[str, Any]] | None) -> int:
    """The exit code the wait saw, or UNKNOWN_EXIT_CODE when it saw none."""
    if waiting is None or not waiting.done() or waiting.cancelled() or waiting.exception() is not None:
        return UNKNOWN_EXIT_CODE
    return int(waiting.result().get("StatusCode", UNKNOWN_EXIT_CODE))


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    if isinstance(exc, RuntimeFailure):
        return exc.message
    return str(exc) or type(exc).__name__


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a background future's exception as seen; its owner decides whether it matters."""
    if not future.cancelled():
        future.exception()
