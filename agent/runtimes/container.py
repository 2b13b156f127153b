"""Builds and releases in Docker containers.

Builds: create, copy the workspace in, start, stream, wait, stop, commit, remove. The commit
is of a fresh container of the build image holding only the built /workspace, so the release
image carries none of the build's environment (see _commit).
Releases: start a long-lived container from the build's image, publish its ports,
follow its output (across Docker's restarts of it), stop, resume, remove.

The docker SDK blocks, so every call to it runs on this runtime's own thread pool,
sized for the builds that may stream at once; release output streams, which last as
long as their releases, have a pool of their own. The event loop never waits on Docker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import re
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, Awaitable, Callable, Mapping, TypeVar

import docker
import docker.errors
import requests
from docker.types.daemon import CancellableStream
from docker.utils import parse_repository_tag

from agent.config import DockerSettings
from agent.errors import RuntimeFailure, Unavailable
from agent.logs import DEFAULT_POLICY, DeploymentLog, LineSplitter, LogPolicy
from agent.runtimes.base import RELEASE_STAGE, ReleaseHandle, ReleaseSpec, ReleaseState

DEPLOYMENT_LABEL = "deploy-agent.deployment"
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
# The never-started container a build's result is committed from (see _commit); swept with builds.
SNAPSHOT_ROLE = "snapshot"
# Build result images are `deploy-agent/<application>:<tag>`; they are never pulled from a registry.
RELEASE_REPOSITORY = "deploy-agent"
WORKSPACE = "/workspace"
STAGE = "build"
# How long the output stream may lag behind the container's exit before it is closed.
OUTPUT_DRAIN_S = 5.0
# Exit code reported when the container vanished before its exit code could be read (as SIGKILL).
UNKNOWN_EXIT_CODE = 137
# Threads one build may hold at once: its output stream, its wait, and a short call.
THREADS_PER_BUILD = 3
# Release output streams at once (one thread each, created on demand): a stream left
# waiting for a thread stops reading, and an unread attach stream can block the release.
MAX_RELEASE_STREAMS = 256
# A promoted release survives agent and Docker restarts; `docker stop` (stop_release) keeps it
# stopped. Until promotion a release has no restart policy: a crash during its health check
# must show as an exit with its real code, not as a restart that resets the exit code to 0.
RELEASE_RESTART_POLICY = {"Name": "unless-stopped"}
UNCHECKED_RESTART_POLICY = {"Name": "no"}
# Docker keeps the release's output too, rotated, so that `docker logs` works for operators.
RELEASE_LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
# Addresses that mean "every interface": the agent reaches such a release on loopback.
ANY_ADDRESS = ("0.0.0.0", "", "::")
# How long after a start Docker may take to report the published host ports.
PORTS_PUBLISHED_S = 2.0
# Polling for Docker's restart of a release that exited: first and longest interval.
RESTART_POLL_S = (0.1, 0.5)
# How long to keep waiting for a release to come back while the Docker engine cannot be reached.
ENGINE_OUTAGE_S = 120.0
# Every container the agent creates: no setuid binary, file capability or exec may gain privileges.
SECURITY_OPT = ("no-new-privileges",)
# Docker's default set without NET_RAW (raw sockets: spoofing on the bridge network), MKNOD
# (device nodes), SYS_CHROOT, AUDIT_WRITE (the host's audit log), SETPCAP and SETFCAP
# (granting capabilities to processes and files). What stays is what a build or release
# running as root does in ordinary work:
KEPT_CAPABILITIES = (
    "CHOWN",  # chown files: package installs, `chown app /workspace`
    "DAC_OVERRIDE",  # root reads and writes files whatever their mode bits (caches, read-only files)
    "FOWNER",  # chmod, utime and xattrs on files of other users (tar, cp -p, package managers)
    "FSETID",  # keep setuid/setgid bits across chmod and chown (package installs)
    "SETUID",  # switch to another user: su, gosu, apt's _apt sandbox, a release dropping root
    "SETGID",  # the same for groups (setgroups)
    "KILL",  # signal processes of other users in the container (a root supervisor's workers)
    "NET_BIND_SERVICE",  # listen on ports below 1024 (httpd -p 80)
)
_PORT_IN_USE = re.compile(r"(?:Bind for \S*:(\d+) failed: port is already allocated|listen \w+ \S*:(\d+): bind: address already in use)")

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
    # A tar of the workspace's contents (entries "./..."), used instead of `workspace` when the
    # source was prepared elsewhere (cloned on a remote server).
    workspace_archive: Path | None = None


@dataclass(frozen=True)
class BuildResult:
    """How a build ended; `image` is the committed reference when one was asked for and made."""

    exit_code: int
    timed_out: bool
    image: str | None


class _ContainerMissing(RuntimeFailure):
    """Docker answered 404: the container (or image) is not there, e.g. removed by stop_deployment."""


@dataclass(frozen=True)
class ReleaseContainer:
    """A release container on this host, as reconciliation after a restart needs it.

    `running` is true while it runs or while Docker is about to restart it after a crash.
    """

    deployment_id: str
    application: str
    container_id: str
    running: bool


@dataclass
class _ReleaseOutput:
    """The follower copying one release container's output into its deployment's log."""

    container_id: str
    log: DeploymentLog  # the follower's own writer, closed when it ends
    stream: CancellableStream | None = None
    # Set before the agent stops the container or lets go of it: the end of the stream is expected.
    stopping: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class _BuildSession:
    """The moving parts of one running build, so that cleanup can reach every one of them."""

    container_id: str
    stream: CancellableStream | None = None
    pump: asyncio.Future[None] | None = None
    waiting: asyncio.Future[dict[str, Any]] | None = None
    # Set by stop_deployment: a failure from here on is the stop's doing, not the build's.
    stopped: bool = False


class ContainerRuntime:
    """Runs build and release containers through the docker SDK on dedicated thread pools."""

    def __init__(
        self,
        settings: DockerSettings,
        max_streams: int,
        kill_grace_s: float = 10.0,
        instance: str | None = None,
        max_release_streams: int = MAX_RELEASE_STREAMS,
    ) -> None:
        self._settings = settings
        self._kill_grace_s = kill_grace_s
        # Containers are this runtime's when their instance label equals this (absent when None).
        self._instance = instance
        self._pool_size = THREADS_PER_BUILD * max(1, max_streams) + 4
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._pool_size, thread_name_prefix="docker"
        )
        self._stream_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, max_release_streams), thread_name_prefix="docker-release"
        )
        # The output follower of each release container this runtime streams, by container id.
        self._release_outputs: dict[str, _ReleaseOutput] = {}
        # The builds running now, by deployment id.
        self._builds: dict[str, _BuildSession] = {}
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
        self._builds[job.deployment_id] = session
        try:
            return await self._run_container(session, job, log, on_start)
        except _ContainerMissing as exc:
            log.agent(STAGE, f"the build container was removed while the build ran ({exc.message})")
            exit_code = _exit_code_of(session.waiting)
            return BuildResult(exit_code=exit_code, timed_out=False, image=None)
        finally:
            if self._builds.get(job.deployment_id) is session:
                del self._builds[job.deployment_id]
            # Shielded: a second cancellation must not leave the container behind.
            await asyncio.shield(self._discard_session(session))

    async def stop_deployment(self, deployment_id: str, grace_s: float) -> int:
        """Stops (SIGTERM, SIGKILL after `grace_s`) and removes the deployment's build and snapshot containers."""
        session = self._builds.get(deployment_id)
        if session is not None:
            session.stopped = True
        containers = await self._list_build_containers(f"{DEPLOYMENT_LABEL}={deployment_id}")
        await asyncio.gather(*(self._stop_and_remove(entry["Id"], grace_s) for entry in containers))
        return len(containers)

    async def remove_build_containers(self, keep: Callable[[str], bool]) -> list[str]:
        """Removes build and snapshot containers whose deployment `keep` rejects; returns those deployment ids."""
        containers = await self._list_build_containers()
        removed: list[str] = []
        for entry in containers:
            deployment_id = (entry.get("Labels") or {}).get(DEPLOYMENT_LABEL)
            if not deployment_id or keep(deployment_id):
                continue
            await self._remove_container(entry["Id"])
            if deployment_id not in removed:
                removed.append(deployment_id)
        return removed

    async def image_exists(self, reference: str) -> bool:
        """Whether the image is present on this host."""
        try:
            await self._call(f"inspecting image {reference}", lambda: self._docker().api.inspect_image(reference))
        except _ContainerMissing:
            return False
        return True

    # --- releases: the ReleaseRuntime interface ----------------------------------------------

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Creates and starts the release container; its output goes to the log (stage `release`).

        Fails with RuntimeFailure, leaving no container, when the image is missing or a host
        port is taken.
        """
        if not spec.image:
            raise RuntimeFailure(f"release of {spec.deployment_id} names no image to start")
        await self._ensure_release_image(spec.image, log)
        container_id = await self._create_cancel_safe(
            "creating the release container", functools.partial(self._create_release_in_thread, spec, spec.image)
        )
        handle = ReleaseHandle(
            runtime="container",
            deployment_id=spec.deployment_id,
            application=spec.application,
            host=_reachable_host(spec.bind),
            container_id=container_id,
        )
        try:
            log.agent(RELEASE_STAGE, f"starting release container {container_id[:12]} from {spec.image}")
            return await self._start_release_container(handle, spec, log)
        except BaseException:
            # Shielded: a cancelled start must not leave the container behind.
            await asyncio.shield(self._discard_release(container_id))
            raise

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Whether it runs; its exit code while stopped or waiting for Docker to restart it."""
        details = await self._inspect_release(handle)
        if details is None:
            return ReleaseState(running=False, exit_code=None)
        state = details.get("State") or {}
        running = _is_running(state)
        ended = not running and state.get("Status") != "created"
        return ReleaseState(
            running=running,
            exit_code=int(state.get("ExitCode") or 0) if ended else None,
            restart_count=int(details.get("RestartCount") or 0),
            pid=int(state.get("Pid") or 0) or None,
        )

    async def refresh_release(self, handle: ReleaseHandle) -> ReleaseHandle | None:
        """The handle with the host ports and pid the container has now; None when it is gone.

        Docker assigns new ephemeral host ports (and a new pid) each time it restarts a release.
        """
        details = await self._inspect_release(handle)
        if details is None:
            return None
        # In the handle's order: its first port is the one published on the bound address.
        bindings = _published_bindings(details, tuple(handle.ports) or None)
        return replace(
            handle,
            host=_bound_host(bindings, handle.host),
            ports={port: host_port for port, (_, host_port) in bindings.items()},
            pid=int((details.get("State") or {}).get("Pid") or 0) or None,
        )

    async def keep_running(self, handle: ReleaseHandle) -> None:
        """Gives a promoted release its restart policy, so it survives crashes and restarts."""
        container_id = handle.container_id
        if container_id is None:
            return
        await self._call(
            f"setting the restart policy of container {container_id[:12]}",
            lambda: self._docker().api.update_container(container_id, restart_policy=RELEASE_RESTART_POLICY),
        )

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """SIGTERM via docker-init, SIGKILL after `grace_s`; the container is kept, stopped, for resume."""
        if handle.container_id is None:
            return
        await self._stop_release_container(handle.container_id, grace_s)

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the stopped release container again, or a new one when it is gone; returns the new handle."""
        container_id = handle.container_id
        if container_id is None or await self._inspect_release(handle) is None:
            log.agent(RELEASE_STAGE, "the stopped release container is gone; starting a new one")
            return await self.start_release(spec, log)
        await self._stop_following(container_id)
        log.agent(RELEASE_STAGE, f"starting release container {container_id[:12]} again")
        try:
            return await self._start_release_container(handle, spec, log)
        except _ContainerMissing:
            await self._stop_following(container_id)
            log.agent(RELEASE_STAGE, "the release container vanished while it was started; starting a new one")
            return await self.start_release(spec, log)
        except BaseException:
            # The container stays, stopped, so that a later resume can try again.
            await asyncio.shield(self._stop_following(container_id))
            raise

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops the release container (grace, then SIGKILL) and removes it; gone already is fine."""
        if handle.container_id is None:
            return
        await self._stop_release_container(handle.container_id, grace_s)
        await self._remove_container(handle.container_id)

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """The container's last `lines` output lines (stdout and stderr, as Docker kept them)."""
        container_id = handle.container_id
        if container_id is None or lines <= 0:
            return []
        try:
            raw = await self._call(
                f"reading the output of container {container_id[:12]}",
                lambda: self._docker().api.logs(container_id, stdout=True, stderr=True, tail=lines),
            )
        except _ContainerMissing:
            return []
        return [line.rstrip("\r") for line in raw.decode("utf-8", errors="replace").splitlines()][-lines:]

    async def attach_release_output(
        self, handle: ReleaseHandle, log_path: Path, policy: LogPolicy = DEFAULT_POLICY
    ) -> None:
        """Follows a release's output from now on into the log at `log_path` (after an agent restart).

        `policy` is the deployment's (LogPolicy.for_spec), so that the log stays masked and capped.

        A no-op when it is already followed, gone, or stopped (resume_release follows it again).
        """
        container_id = handle.container_id
        if container_id is None or container_id in self._release_outputs:
            return
        details = await self._inspect_release(handle)
        if details is None:
            return
        state = details.get("State") or {}
        stream = None
        if _is_running(state):
            try:
                stream = await self._attach(container_id)
            except RuntimeFailure:
                return  # stopped or removed meanwhile: nothing to follow
        elif not state.get("Restarting"):
            return
        # Restarting: the follower picks the output up once Docker has started it again.
        self._follow_output(container_id, log_path, stream, policy)

    async def detach_release_output(self, handle: ReleaseHandle) -> None:
        """Stops copying the release's output into its log; the release itself goes on."""
        if handle.container_id is not None:
            await self._stop_following(handle.container_id)

    async def list_release_containers(self, deployment_id: str | None = None) -> list[ReleaseContainer]:
        """This runtime's release containers, running or not, optionally of one deployment only."""
        labels = [f"{DEPLOYMENT_LABEL}={deployment_id}"] if deployment_id is not None else []
        entries = await self._list_containers(RELEASE_ROLE, *labels)
        return [
            ReleaseContainer(
                deployment_id=(entry.get("Labels") or {}).get(DEPLOYMENT_LABEL, ""),
                application=(entry.get("Labels") or {}).get(APPLICATION_LABEL, ""),
                container_id=str(entry["Id"]),
                running=entry.get("State") in ("running", "restarting"),
            )
            for entry in entries
        ]

    async def remove_copy_containers(self) -> int:
        """Removes copy containers an interrupted copy_workspace_out left behind; returns how many."""
        entries = await self._list_containers(COPY_ROLE)
        for entry in entries:
            await self._remove_container(entry["Id"])
        return len(entries)

    # --- release images and workspaces ---------------------------------------------------------

    async def list_release_images(self, application: str) -> list[str]:
        """References of the application's build result images (`deploy-agent/<application>:*`), newest first."""
        repository = f"{RELEASE_REPOSITORY}/{application}"
        images = await self._call(
            f"listing the images of {application}",
            lambda: self._docker().api.images(
                name=repository, filters={"label": f"{APPLICATION_LABEL}={application}"}
            ),
        )
        found = [
            (int(image.get("Created") or 0), tag)
            for image in images
            for tag in image.get("RepoTags") or []
            if tag.startswith(f"{repository}:")
        ]
        return [tag for _, tag in sorted(found, key=lambda item: (-item[0], item[1]))]

    async def remove_image(self, reference: str) -> bool:
        """Removes the image reference; False when it is missing or a container (even stopped) uses it."""
        try:
            await self._call(
                f"removing image {reference}", lambda: self._docker().api.remove_image(reference, force=False)
            )
        except _ContainerMissing:
            return False
        except RuntimeFailure as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.APIError) and cause.status_code == 409:
                return False
            raise
        return True

    async def copy_workspace_out(self, image: str, dest: Path) -> None:
        """Extracts the image's /workspace into the host directory `dest` (its content, not the folder)."""
        try:
            container_id = await self._create_cancel_safe(
                "creating the container to copy the workspace out of",
                functools.partial(self._create_copy_in_thread, image),
            )
        except _ContainerMissing as exc:
            raise RuntimeFailure(f"image {image} is not present on this host") from exc
        try:
            await self._in_thread(functools.partial(Path(dest).mkdir, parents=True, exist_ok=True))
            try:
                archive = await self._call(
                    f"copying {WORKSPACE} out of image {image}",
                    functools.partial(self._fetch_workspace_in_thread, container_id, Path(dest).parent),
                )
            except _ContainerMissing as exc:
                raise RuntimeFailure(f"image {image} has no {WORKSPACE}") from exc
            try:
                await self._in_thread(functools.partial(_extract_workspace, archive, Path(dest), image))
            finally:
                archive.close()
        finally:
            await asyncio.shield(self._remove_container(container_id))

    async def close(self) -> None:
        """Closes the docker client and the thread pool."""
        if self._closed:
            return
        self._closed = True
        # Releases go on running; only this agent's reading of their output ends.
        await asyncio.gather(*(self._stop_following(container_id) for container_id in list(self._release_outputs)))
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._in_thread(self._client.close)
        # No waiting: a thread still blocked on a stream must not hang the daemon's shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stream_executor.shutdown(wait=False, cancel_futures=True)

    # --- the steps of a build --------------------------------------------------------------

    async def _ensure_image(self, image: str, log: DeploymentLog, stage: str = STAGE) -> None:
        if await self.image_exists(image):
            return
        log.agent(stage, f"image {image} is not present on this host; pulling it")
        repository, tag = parse_repository_tag(image)
        try:
            await self._call(f"pulling image {image}", lambda: self._docker().images.pull(repository, tag=tag))
        except RuntimeFailure as exc:
            raise RuntimeFailure(
                f"image {image} is not present on this host and could not be pulled: {exc.message}"
            ) from exc

    async def _create_container(self, job: BuildJob) -> str:
        return await self._create_cancel_safe(
            "creating the build container", functools.partial(self._create_in_thread, job)
        )

    async def _create_cancel_safe(self, action: str, create: Callable[[], str]) -> str:
        """Runs a container create; when cancelled meanwhile, removes what it made."""
        creating = asyncio.ensure_future(self._call(action, create))
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
            **_hardening(),
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
        if job.workspace_archive is not None:
            await self._copy_archive(container_id, job.workspace_archive)
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
            try:
                image = await self._commit(container_id, job, log)
            except RuntimeFailure as exc:
                if not session.stopped:
                    if isinstance(exc, _ContainerMissing):
                        raise RuntimeFailure(f"the build result could not be kept: {exc.message}") from exc
                    raise
                # Stopped while its result was being kept: as killed, which the engine reports.
                log.agent(STAGE, "the build was stopped before its result was kept")
                return BuildResult(exit_code=UNKNOWN_EXIT_CODE, timed_out=False, image=None)
        return BuildResult(exit_code=exit_code, timed_out=False, image=image)

    async def _copy_workspace(self, container_id: str, workspace: Path) -> None:
        try:
            archive = await self._in_thread(functools.partial(_archive_workspace, workspace))
        except OSError as exc:
            raise RuntimeFailure(f"archiving the workspace {workspace} failed: {exc}") from exc
        try:
            await self._put_archive(container_id, "/", archive)
        finally:
            archive.close()

    async def _copy_archive(self, container_id: str, archive_path: Path) -> None:
        try:
            archive = await self._in_thread(functools.partial(open, archive_path, "rb"))
        except OSError as exc:
            raise RuntimeFailure(f"reading the workspace archive {archive_path} failed: {exc}") from exc
        try:
            await self._put_archive(container_id, WORKSPACE, archive)
        finally:
            archive.close()

    async def _put_archive(self, container_id: str, path: str, archive: IO[bytes]) -> None:
        await self._call(
            "copying the workspace into the build container",
            lambda: self._docker().api.put_archive(container_id, path, archive),
        )

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
        """Commits the build image plus the built /workspace, and nothing of the build's environment.

        Docker's commit keeps every variable of the committed container's Env (it adds each one
        the commit's own Env lacks), and the build container's Env holds build.env. So the build
        container is never committed: a fresh container of the build image, never started and
        given no environment, receives the built /workspace and is committed instead.
        """
        assert job.commit_image is not None
        repository, tag = parse_repository_tag(job.commit_image)
        tag = tag or "latest"
        base_config = await self._image_config(job.image)
        snapshot_id = await self._create_cancel_safe(
            "creating the snapshot container", functools.partial(self._create_snapshot_in_thread, job)
        )
        try:
            await self._copy_built_workspace(container_id, snapshot_id, job)
            # The base image's command and entrypoint, not the snapshot's placeholder; its Env exactly.
            conf = {
                "Labels": {
                    DEPLOYMENT_LABEL: job.deployment_id,
                    APPLICATION_LABEL: job.application,
                    ROLE_LABEL: IMAGE_ROLE,
                },
                "Cmd": base_config.get("Cmd"),
                "Entrypoint": base_config.get("Entrypoint"),
                "Env": base_config.get("Env"),
            }
            await self._call(
                "committing the build result",
                lambda: self._docker().api.commit(
                    snapshot_id, repository=repository, tag=tag, conf=conf,
                    message=f"deploy-agent: {WORKSPACE} built by {job.deployment_id}",
                ),
            )
        finally:
            await asyncio.shield(self._remove_container(snapshot_id))
        reference = f"{repository}:{tag}"
        log.agent(STAGE, f"committed the build result as image {reference}")
        return reference

    def _create_snapshot_in_thread(self, job: BuildJob) -> str:
        api = self._docker().api
        created = api.create_container(
            image=job.image,
            # Never started: any command does, and an image without one still gets a container.
            command=["true"],
            entrypoint=[],
            labels=self._labels(SNAPSHOT_ROLE, job.deployment_id, job.application),
            name=f"deploy-agent-snapshot-{job.deployment_id}",
            host_config=api.create_host_config(**_hardening()),
        )
        return str(created["Id"])

    async def _copy_built_workspace(self, build_id: str, snapshot_id: str, job: BuildJob) -> None:
        """Copies /workspace, owners and modes kept, from the exited build container into the snapshot."""
        archive = await self._call(
            f"copying {WORKSPACE} out of the build container",
            functools.partial(self._fetch_workspace_in_thread, build_id, job.workspace.parent),
        )
        try:
            await self._call(
                f"copying {WORKSPACE} into the snapshot container",
                lambda: self._docker().api.put_archive(snapshot_id, "/", archive),
            )
        finally:
            archive.close()

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


    # --- the steps of a release ----------------------------------------------------------------

    async def _ensure_release_image(self, image: str, log: DeploymentLog) -> None:
        """Pulls a missing image, except the agent's own build results, which no registry holds."""
        repository, _ = parse_repository_tag(image)
        if repository.startswith(f"{RELEASE_REPOSITORY}/"):
            if not await self.image_exists(image):
                raise RuntimeFailure(f"image {image} is not present on this host")
            return
        await self._ensure_image(image, log, RELEASE_STAGE)

    def _create_release_in_thread(self, spec: ReleaseSpec, image: str) -> str:
        api = self._docker().api
        ports = list(dict.fromkeys(spec.ports))
        bindings: dict[int, tuple[str, int | None]] = {}
        for index, port in enumerate(ports):
            if index == 0:
                bindings[port] = (spec.bind, spec.host_port or None)
            else:
                bindings[port] = ("127.0.0.1", None)
        settings = self._settings
        cpus = spec.cpus or settings.release_cpus
        host_config = api.create_host_config(
            init=True,  # docker-init forwards SIGTERM to the command and reaps zombies
            privileged=False,
            **_hardening(),
            mem_limit=spec.memory or settings.release_memory_bytes,
            nano_cpus=int(cpus * 1e9),
            pids_limit=spec.pids or settings.release_pids,
            restart_policy=UNCHECKED_RESTART_POLICY,
            log_config=RELEASE_LOG_CONFIG,
            port_bindings=bindings or None,
        )
        command = None if spec.command is None else _command_of(spec.command)
        created = api.create_container(
            image=image,
            command=command,
            # A given command runs exactly as given; without one the image's own entrypoint and command run.
            entrypoint=[] if command is not None else None,
            environment=dict(spec.env),
            working_dir=WORKSPACE,
            labels=self._labels(RELEASE_ROLE, spec.deployment_id, spec.application),
            name=f"deploy-agent-release-{spec.deployment_id}",
            ports=ports or None,
            host_config=host_config,
        )
        return str(created["Id"])

    async def _start_release_container(
        self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog
    ) -> ReleaseHandle:
        """Attaches, starts and inspects the (created or stopped) release container."""
        container_id = handle.container_id
        assert container_id is not None
        # Attached before the start, so that not one line of early output is missed.
        self._follow_output(container_id, log.path, await self._attach(container_id), log.policy)
        try:
            await self._call("starting the release container", lambda: self._docker().api.start(container_id))
        except _ContainerMissing:
            raise
        except RuntimeFailure as exc:
            port_in_use = _port_in_use(exc, spec)
            if port_in_use is None:
                raise
            raise port_in_use from exc
        wanted = tuple(dict.fromkeys(spec.ports))
        deadline = time.monotonic() + PORTS_PUBLISHED_S
        while True:
            details = await self._call(
                "inspecting the release container", lambda: self._docker().api.inspect_container(container_id)
            )
            bindings = _published_bindings(details, wanted)
            state = details.get("State") or {}
            # A release that died at once has no ports to wait for; release_state tells the engine.
            if len(bindings) == len(wanted) or not _is_running(state) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        pid = int(state.get("Pid") or 0) or None
        published = ", ".join(f"{port} -> {address or '*'}:{host}" for port, (address, host) in bindings.items())
        log.agent(RELEASE_STAGE, f"release container {container_id[:12]} started (pid {pid}; ports {published or 'none'})")
        # The url is built from the address Docker reports having bound, never from the request.
        return replace(
            handle,
            host=_bound_host(bindings, handle.host),
            ports={port: host_port for port, (_, host_port) in bindings.items()},
            pid=pid,
        )

    async def _discard_release(self, container_id: str) -> None:
        """Undoes a release start that failed: no follower, no container."""
        await self._stop_following(container_id)
        with contextlib.suppress(RuntimeFailure):
            await self._remove_container(container_id)

    async def _inspect_release(self, handle: ReleaseHandle) -> dict[str, Any] | None:
        """The release container's details, or None when it is gone."""
        container_id = handle.container_id
        if container_id is None:
            return None
        try:
            return await self._call(
                f"inspecting container {container_id[:12]}",
                lambda: self._docker().api.inspect_container(container_id),
            )
        except _ContainerMissing:
            return None

    async def _stop_release_container(self, container_id: str, grace_s: float) -> None:
        """Stops the container, letting its output drain into the log before the follower ends."""
        output = self._release_outputs.get(container_id)
        if output is not None:
            output.stopping.set()
        await self._stop_container(container_id, grace_s)
        await self._stop_following(container_id, drain=True)

    def _create_copy_in_thread(self, image: str) -> str:
        api = self._docker().api
        created = api.create_container(
            image=image,
            # Never started: any command does, and an image without one still gets a container.
            command=["true"],
            entrypoint=[],
            # Deployment and application come with the build result image's own labels.
            labels=self._labels(COPY_ROLE),
            host_config=api.create_host_config(**_hardening()),
        )
        return str(created["Id"])

    def _fetch_workspace_in_thread(self, container_id: str, directory: Path) -> IO[bytes]:
        """Streams the container's /workspace as a tar into an unnamed temporary file next to `directory`."""
        chunks, _ = self._docker().api.get_archive(container_id, WORKSPACE)
        archive = tempfile.TemporaryFile(dir=directory if directory.is_dir() else None, prefix=".workspace-", suffix=".tar")
        try:
            for chunk in chunks:
                archive.write(chunk)
            archive.seek(0)
        except BaseException:
            archive.close()
            raise
        return archive

    # --- release output --------------------------------------------------------------------

    async def _attach(self, container_id: str) -> CancellableStream:
        return await self._call(
            f"attaching to container {container_id[:12]}",
            lambda: self._docker().api.attach(container_id, stream=True, logs=False, demux=True),
        )

    def _follow_output(
        self, container_id: str, log_path: Path, stream: CancellableStream | None, policy: LogPolicy
    ) -> None:
        """Starts copying the container's output into the log at `log_path`, in the background."""
        # The follower writes through its own writer: the engine may close its log of the
        # deployment long before the release ends.
        output = _ReleaseOutput(container_id, DeploymentLog(log_path, policy), stream)
        self._release_outputs[container_id] = output
        output.task = asyncio.ensure_future(self._follow_release_output(output))
        output.task.add_done_callback(functools.partial(self._forget_output, output))

    def _forget_output(self, output: _ReleaseOutput, task: asyncio.Future[None]) -> None:
        _retrieve(task)
        output.log.close()
        if self._release_outputs.get(output.container_id) is output:
            del self._release_outputs[output.container_id]

    async def _follow_release_output(self, output: _ReleaseOutput) -> None:
        """Copies output until the container stops for good, picking it up again after Docker restarts it."""
        try:
            while True:
                if output.stream is not None:
                    # The attach stream ends when the container stops (or when it is closed).
                    await self._in_stream_thread(
                        functools.partial(_pump_output, output.stream, output.log, RELEASE_STAGE, output.stopping)
                    )
                    await self._close_release_stream(output)
                restarts = await self._await_restart(output)
                if restarts is None:
                    return
                try:
                    output.stream = await self._attach(output.container_id)
                except _ContainerMissing:
                    return
                except RuntimeFailure:
                    continue  # "restarting": it exited again before the attach; wait for the next start
                if output.stopping.is_set():
                    await self._close_release_stream(output)
                    return
                output.log.agent(
                    RELEASE_STAGE,
                    f"Docker restarted the release container (restart {restarts}); following its output again",
                )
        except Exception as exc:  # noqa: BLE001 - a broken follower loses output, never the release
            if not output.stopping.is_set():
                output.log.agent(RELEASE_STAGE, f"stopped following the release output: {_explain(exc)}")
        finally:
            with contextlib.suppress(Exception):
                await self._close_release_stream(output)

    async def _await_restart(self, output: _ReleaseOutput) -> int | None:
        """Waits for Docker to run the container again; its restart count, or None when it will not."""
        delay, longest = RESTART_POLL_S
        stopped_seen = 0
        outage_since: float | None = None
        while not output.stopping.is_set():
            try:
                details = await self._call(
                    f"inspecting container {output.container_id[:12]}",
                    lambda: self._docker().api.inspect_container(output.container_id),
                )
            except _ContainerMissing:
                return None
            except Unavailable:
                # The engine itself restarting: it restarts the release (unless-stopped) once it is back.
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > ENGINE_OUTAGE_S:
                    raise
            else:
                outage_since = None
                state = details.get("State") or {}
                if _is_running(state):
                    return int(details.get("RestartCount") or 0)
                if not state.get("Restarting"):
                    # Stopped and not to be restarted (docker stop); a few looks rule out a passing state.
                    stopped_seen += 1
                    if stopped_seen >= 3:
                        return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
        return None

    async def _stop_following(self, container_id: str, drain: bool = False) -> None:
        """Ends the container's follower; with `drain`, first lets a stopped container's stream end by itself."""
        output = self._release_outputs.get(container_id)
        if output is None or output.task is None:
            return
        output.stopping.set()
        task = output.task
        done: set[asyncio.Task[None]] = set()
        if drain:
            done, _ = await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)
        if not done:
            await self._close_release_stream(output)
            done, _ = await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=OUTPUT_DRAIN_S)

    async def _close_release_stream(self, output: _ReleaseOutput) -> None:
        stream, output.stream = output.stream, None
        if stream is not None:
            await self._in_thread(functools.partial(_close_quietly, stream))

    # --- container housekeeping ------------------------------------------------------------

    async def _list_build_containers(self, *labels: str) -> list[dict[str, Any]]:
        """This runtime's build and snapshot containers, running or not, that carry every given label."""
        # Docker ANDs label filters: one listing per role.
        builds = await self._list_containers(BUILD_ROLE, *labels)
        return builds + await self._list_containers(SNAPSHOT_ROLE, *labels)

    async def _list_containers(self, role: str, *labels: str) -> list[dict[str, Any]]:
        """This runtime's containers of `role`, running or not, that carry every given label."""
        wanted = [f"{ROLE_LABEL}={role}", *labels]
        if self._instance is not None:
            wanted.append(f"{INSTANCE_LABEL}={self._instance}")
        containers = await self._call(
            f"listing {role} containers", lambda: self._docker().api.containers(all=True, filters={"label": wanted})
        )
        # Docker cannot filter on a label's absence: drop other instances' containers here.
        # Release and copy containers say "no instance" with an empty label (see _labels).
        return [
            entry for entry in containers if ((entry.get("Labels") or {}).get(INSTANCE_LABEL) or None) == self._instance
        ]

    def _labels(self, role: str, deployment_id: str | None = None, application: str | None = None) -> dict[str, str]:
        """Labels of a release or copy container.

        The instance label is always set, empty for no instance: containers inherit the labels
        of their image, and a build result image carries those of the container it came from.
        """
        labels = {ROLE_LABEL: role, INSTANCE_LABEL: self._instance or ""}
        if deployment_id is not None:
            labels[DEPLOYMENT_LABEL] = deployment_id
        if application is not None:
            labels[APPLICATION_LABEL] = application
        return labels

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

    async def _in_stream_thread(self, function: Callable[[], T]) -> T:
        """Runs a release output stream on its own pool, apart from the short calls."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._stream_executor, function)

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


def _pump_output(
    stream: CancellableStream, log: DeploymentLog, stage: str = STAGE, closing: threading.Event | None = None
) -> None:
    """Copies the container's demultiplexed output into the log, line by line, as it comes.

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


def _extract_workspace(archive: IO[bytes], dest: Path, image: str) -> None:
    """Extracts a `workspace/...` tar into `dest` without the leading folder, refusing unsafe members."""
    prefix = PurePosixPath(WORKSPACE).name + "/"
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = []
            for member in tar:
                if member.name.rstrip("/") == prefix.rstrip("/"):
                    continue  # the folder itself: dest stands for it
                relative = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                parts = PurePosixPath(relative).parts
                if not relative or relative.startswith("/") or ".." in parts:
                    raise RuntimeFailure(f"refusing unsafe path {member.name!r} in {WORKSPACE} of image {image}")
                if member.isdev():
                    raise RuntimeFailure(f"refusing device or pipe {member.name!r} in {WORKSPACE} of image {image}")
                member.name = relative
                if member.islnk():
                    # Hard links name another member of the archive: that one loses its prefix too.
                    member.linkname = member.linkname[len(prefix):] if member.linkname.startswith(prefix) else ""
                members.append(member)
            # The "data" filter also refuses links that point outside dest and drops owners and modes bits.
            tar.errorlevel = 1
            tar.extractall(dest, members=members, filter=_private_data)
    except tarfile.FilterError as exc:
        raise RuntimeFailure(f"refusing unsafe entry in {WORKSPACE} of image {image}: {exc}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise RuntimeFailure(f"extracting {WORKSPACE} of image {image} into {dest} failed: {exc}") from exc


def _owned_by_root(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    # As `docker cp` does: the agent's own uid means nothing inside the container.
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = "root"
    # The agent's copies are owner-only (umask 077); inside the container they get the modes
    # git would give them, so an image that runs as a non-root USER can still read /workspace.
    if entry.isdir() or (entry.isfile() and entry.mode & 0o100):
        entry.mode = 0o755
    elif entry.isfile():
        entry.mode = 0o644
    return entry


def _private_data(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, then owner-only modes: files the agent extracts are its user's alone."""
    member = tarfile.data_filter(member, path)
    if member.mode is not None and not member.issym():
        mode = 0o700 if member.isdir() else (member.mode & 0o100) | 0o600
        member = member.replace(mode=mode, deep=False)
    return member


def _close_quietly(stream: CancellableStream) -> None:
    with contextlib.suppress(Exception):
        stream.close()


# --- small pure helpers --------------------------------------------------------------------


def _command_of(command: tuple[str, ...] | str) -> list[str]:
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def _reachable_host(bind: str) -> str:
    """Where the agent reaches a port published on `bind`."""
    return "127.0.0.1" if bind in ANY_ADDRESS else bind


def _is_running(state: Mapping[str, Any]) -> bool:
    # While Docker waits to restart a crashed container it reports Running and Restarting both.
    return bool(state.get("Running")) and not state.get("Restarting")


def _published_bindings(
    details: Mapping[str, Any], wanted: tuple[int, ...] | None = None
) -> dict[int, tuple[str, int]]:
    """Container port → (host address, host port) as Docker reports them, for the wanted (default: all) tcp ports."""
    published = (details.get("NetworkSettings") or {}).get("Ports") or {}
    if wanted is None:
        wanted = tuple(sorted(int(key.split("/")[0]) for key in published if key.endswith("/tcp")))
    bindings: dict[int, tuple[str, int]] = {}
    for port in wanted:
        for binding in published.get(f"{port}/tcp") or []:
            if binding.get("HostPort"):
                bindings[port] = (str(binding.get("HostIp") or ""), int(binding["HostPort"]))
                break
    return bindings


def _bound_host(bindings: Mapping[int, tuple[str, int]], fallback: str) -> str:
    """Where the agent and clients reach the release: the address Docker bound its first port on."""
    for address, _ in bindings.values():
        return _reachable_host(address)
    return fallback


def _port_in_use(exc: RuntimeFailure, spec: ReleaseSpec) -> RuntimeFailure | None:
    """A failure naming the host port when a start failed because that port is taken, else None."""
    match = _PORT_IN_USE.search(exc.message)
    if match is None:
        return None
    port = match.group(1) or match.group(2)
    return RuntimeFailure(f"cannot start the release: host port {port} is already in use on {spec.bind or '*'}")


def _hardening() -> dict[str, list[str]]:
    """Host config of every container: no new privileges, and only the capabilities kept above."""
    return {"security_opt": list(SECURITY_OPT), "cap_drop": ["ALL"], "cap_add": list(KEPT_CAPABILITIES)}


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
