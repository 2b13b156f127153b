"""Builds in Docker containers: create, copy the workspace in, start, follow, wait, commit, remove.

A build's output goes, on an engine of this host, through an output pump (build_pump, a
process that outlives the agent; build_pumps is the agent's side); on a server's engine it is
read back from its Docker log (build_output), from where the deployment log stopped when a
restarted agent takes it back (`Builds.reattach`). First run and re-adoption share one path.
The timeout counts from the container's real start.

It runs past 400 lines for a reason: the first run and the re-adoption share one path
(follow, wait, timeout, commit, cleanup), and splitting it would split that path.

The commit is of a fresh container of the build image holding only the built /workspace, so
the release image carries none of the build's environment (see Builds._commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, Mapping

import docker
from docker.types.daemon import CancellableStream
from docker.utils import parse_repository_tag

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.docker.gateway import (
    APPLICATION_LABEL,
    BUILD_ROLE,
    DEPLOYMENT_LABEL,
    IMAGE_ROLE,
    INSTANCE_LABEL,
    ROLE_LABEL,
    SNAPSHOT_ROLE,
    ContainerMissing,
    DockerGateway,
    command_line,
    create_idle_container,
    is_running,
    retrieve,
)
from agent.runtimes.docker.build_output import (
    BuildCursor,
    BuildOutputCopier,
    count_output_lines,
    cursor_path,
    docker_time,
    load_cursor,
    open_build_logs,
    remove_cursor,
)
from agent.runtimes.docker import build_pumps
from agent.runtimes.docker.build_pumps import PumpPipes, PumpProcess
from agent.runtimes.docker.hardening import create_running_host_config
from agent.runtimes.docker.images import WORKSPACE, Images, archive_workspace
from agent.runtimes.docker.json_log import JsonLogReader, readable_log_path
from agent.runtimes.docker.output import OUTPUT_DRAIN_S

STAGE = "build"
RECOVERY_STAGE = "recovery"
# Exit code reported when the container vanished before its exit code could be read (as SIGKILL).
UNKNOWN_EXIT_CODE = 137
# Docker keeps the build's output (json-file) so that what it writes while the agent is away is
# still there to copy when the agent comes back; capped, so that an endless build cannot fill the
# disk (the deployment log has its own cap, agent.max_log_bytes). One large file rather than
# several small ones: a followed json-file log loses lines when it rotates (Docker 20.10 reads
# on from the new file and skips what the reader had not reached), and JSON makes each line
# about 1.6 times longer, so 512 MiB holds well over the default 100 MiB deployment log.
BUILD_LOG_CONFIG = {"Type": "json-file", "Config": {"max-size": "512m", "max-file": "2"}}
# With an engine on this host, a pump process copies the attach stream instead (build_pump):
# dockerd then only hands the bytes over, and the pump outlives the agent, so nothing is lost.
PUMPED_LOG_CONFIG = {"Type": "none", "Config": {}}
# The states of a build container that a restarted agent takes back: it runs, or it ended by itself.
ADOPTABLE_STATES = ("running", "exited")

OnStart = Callable[[str, int], Awaitable[None]]


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


@dataclass
class _BuildSession:
    """The moving parts of one running build, so that cleanup can reach every one of them."""

    container_id: str
    # The output pump of an engine on this host: started before the container is created, then attached.
    pump_pipes: PumpPipes | None = None
    pump_process: PumpProcess | None = None
    stream: CancellableStream | None = None
    pump: asyncio.Future[None] | None = None
    copier: BuildOutputCopier | None = None
    # For a copy from the log file: the container stopped (read to the end), or the copy is let go.
    exited: threading.Event = field(default_factory=threading.Event)
    # The same, for a pump's watch on the event loop.
    exited_here: asyncio.Event = field(default_factory=asyncio.Event)
    closing: threading.Event = field(default_factory=threading.Event)
    waiting: asyncio.Future[dict[str, Any]] | None = None
    # Set by stop_deployment: a failure from here on is the stop's doing, not the build's.
    stopped: bool = False


class Builds:
    """Runs build containers on one engine and keeps their results as images."""

    def __init__(self, gateway: DockerGateway, images: Images, *, kill_grace_s: float, engine_here: bool = True) -> None:
        self._gateway = gateway
        # Whether the engine runs on this host: its containers' log files can then be read directly.
        self._engine_here = engine_here
        # The engine's unix socket, for build output pumps; None: output is read back from Docker's log.
        self._pump_socket = build_pumps.unix_socket_of(gateway.settings.url) if engine_here else None
        self._pump_starter = build_pumps.PumpStarter()
        self._images = images
        self._kill_grace_s = kill_grace_s
        # The builds running now, by deployment id.
        self._sessions: dict[str, _BuildSession] = {}

    async def run(self, job: BuildJob, log: DeploymentLog, on_start: OnStart) -> BuildResult:
        """Runs the build command in a fresh container and always removes the container after."""
        await self._images.ensure(job.image, log, STAGE)
        # Forked first: the pump gets ready while the container is created.
        pipes = await self._gateway.in_thread(self._pump_starter.fork) if self._pump_socket else None
        try:
            container_id = await self._gateway.create_cancel_safe(
                "creating the build container", lambda client: self._create_container(client, job)
            )
        except BaseException:
            if pipes is not None:
                pipes.close()
            raise
        session = _BuildSession(container_id, pump_pipes=pipes)
        return await self._supervise(session, job, log, self._start_container(job, log, on_start))

    async def reattach(self, job: BuildJob, log: DeploymentLog, on_found: OnStart) -> BuildResult | None:
        """After an agent restart: follows the deployment's build container again, from where its log stopped.

        It ends as `run` does (waited for, its timeout counted from its real start, committed,
        removed). None when no build container of the deployment runs or ended by itself: it is
        gone (or never started), and whatever is left of it is removed.
        """
        label = f"{DEPLOYMENT_LABEL}={job.deployment_id}"
        # A snapshot container of a commit the agent did not finish: the commit is made again.
        for entry in await self._gateway.list_containers(SNAPSHOT_ROLE, label):
            await self._gateway.remove_container(entry["Id"])
        found = await self._gateway.list_containers(BUILD_ROLE, label)
        details = await self._gateway.inspect_or_none(found[0]["Id"]) if found else None
        state = (details or {}).get("State") or {}
        if details is None or state.get("Status") not in ADOPTABLE_STATES:
            for entry in found:
                await self._gateway.remove_container(entry["Id"])
            await self._gateway.in_thread(functools.partial(_forget_output_state, cursor_path(log.path)))
            return None
        container_id = str(details["Id"])

        async def follow(session: _BuildSession) -> BuildResult:
            log.agent(
                RECOVERY_STAGE,
                f"the agent restarted while the build ran; following build container {container_id[:12]} "
                "again from where this log stopped",
            )
            await on_found(container_id, int(state.get("Pid") or 0))
            return await self._follow(session, job, log, details, resuming=True)

        return await self._supervise(_BuildSession(container_id), job, log, follow)

    async def _supervise(
        self, session: _BuildSession, job: BuildJob, log: DeploymentLog,
        work: Callable[[_BuildSession], Awaitable[BuildResult]],
    ) -> BuildResult:
        """Runs `work` on the session's container; whatever happens, removes the container and the cursor after."""
        self._sessions[job.deployment_id] = session
        try:
            return await work(session)
        except ContainerMissing as exc:
            log.agent(STAGE, f"the build container was removed while the build ran ({exc.message})")
            return BuildResult(exit_code=_exit_code_of(session.waiting), timed_out=False, image=None)
        finally:
            if self._sessions.get(job.deployment_id) is session:
                del self._sessions[job.deployment_id]
            # Shielded: a second cancellation must not leave the container behind.
            await asyncio.shield(self._discard_session(session, cursor_path(log.path)))

    async def stop_deployment(self, deployment_id: str, grace_s: float) -> int:
        """Stops (SIGTERM, SIGKILL after `grace_s`) and removes the deployment's build and snapshot containers."""
        session = self._sessions.get(deployment_id)
        if session is not None:
            session.stopped = True
        containers = await self._list_containers(f"{DEPLOYMENT_LABEL}={deployment_id}")
        await asyncio.gather(*(self._gateway.stop_and_remove(entry["Id"], grace_s) for entry in containers))
        return len(containers)

    async def remove_containers(self, keep: Callable[[str], bool]) -> list[str]:
        """Removes build and snapshot containers whose deployment `keep` rejects; returns those deployment ids.

        The containers of builds this agent runs or re-adopted are never leftovers: they stay.
        """
        removed: list[str] = []
        for entry in await self._list_containers():
            deployment_id = (entry.get("Labels") or {}).get(DEPLOYMENT_LABEL)
            if not deployment_id or keep(deployment_id) or deployment_id in self._sessions:
                continue
            await self._gateway.remove_container(entry["Id"])
            if deployment_id not in removed:
                removed.append(deployment_id)
        return removed

    async def _list_containers(self, *labels: str) -> list[dict[str, Any]]:
        """This gateway's build and snapshot containers, running or not, that carry every given label."""
        # Docker ANDs label filters: one listing per role.
        builds = await self._gateway.list_containers(BUILD_ROLE, *labels)
        return builds + await self._gateway.list_containers(SNAPSHOT_ROLE, *labels)

    def _create_container(self, client: docker.DockerClient, job: BuildJob) -> str:
        settings = self._gateway.settings
        host_config = create_running_host_config(
            client.api,
            memory=settings.build_memory_bytes,
            nano_cpus=int(settings.build_cpus * 1e9) if settings.build_cpus else None,
            pids=settings.build_pids,
            # Half the default CPU weight: a busy build never starves the agent serving the API.
            cpu_shares=512,
            log_config=PUMPED_LOG_CONFIG if self._pump_socket else BUILD_LOG_CONFIG,
        )
        labels = {DEPLOYMENT_LABEL: job.deployment_id, APPLICATION_LABEL: job.application, ROLE_LABEL: BUILD_ROLE}
        if self._gateway.instance is not None:
            labels[INSTANCE_LABEL] = self._gateway.instance
        created = client.api.create_container(
            image=job.image,
            command=command_line(job.command),
            # The command runs exactly as given, never as arguments to an image's entrypoint.
            entrypoint=[],
            environment=dict(job.env),
            working_dir=WORKSPACE,
            labels=labels,
            name=f"deploy-agent-build-{job.deployment_id}",
            host_config=host_config,
        )
        return str(created["Id"])

    def _start_container(
        self, job: BuildJob, log: DeploymentLog, on_start: OnStart
    ) -> Callable[[_BuildSession], Awaitable[BuildResult]]:
        """The work of a first run: copy the workspace in, start, then follow as a re-adoption does."""

        async def start(session: _BuildSession) -> BuildResult:
            container_id = session.container_id
            if session.pump_pipes is not None:
                session.pump_process = await self._attach_pump(session.pump_pipes, container_id, log)
            await self._copy_workspace(container_id, job.workspace)
            if job.workspace_archive is not None:
                await self._copy_archive(container_id, job.workspace_archive)
            log.agent(STAGE, f"starting build container {container_id[:12]} from {job.image}")
            await self._gateway.start(container_id, "starting the build container")
            details = await self._gateway.inspect(container_id, "inspecting the build container")
            await on_start(container_id, int((details.get("State") or {}).get("Pid") or 0))
            return await self._follow(session, job, log, details, resuming=False)

        return start

    async def _follow(
        self, session: _BuildSession, job: BuildJob, log: DeploymentLog, details: dict[str, Any], *, resuming: bool
    ) -> BuildResult:
        """Copies the container's output into the log (from the cursor when `resuming`), waits for its end, commits."""
        container_id = session.container_id
        state = details.get("State") or {}
        if _is_pumped(details) and self._pump_socket is not None:
            if resuming:
                session.pump_process = await self._find_pump(container_id, log, running=is_running(state))
            if session.pump_process is not None:
                session.pump = asyncio.ensure_future(build_pumps.watch(session.pump_process, log, STAGE, session.exited_here))
            return await self._wait_and_commit(session, job, log, state, resuming=resuming)
        log_file = readable_log_path(details) if self._engine_here else None
        copier, cursor = await self._gateway.in_thread(functools.partial(_prepare_copier, log, resuming))
        session.copier = copier
        # Docker's log holds everything from the start: opened after the start, nothing is missed.
        if log_file is not None and (cursor is None or cursor.file_position is not None):
            reader = JsonLogReader(log_file, cursor.file_position if cursor else None)
            session.pump = self._gateway.start_background(
                functools.partial(copier.copy_file, reader, session.exited, session.closing)
            )
        else:
            since = cursor.since if cursor else None
            session.stream = await self._gateway.call(
                "reading the build output", lambda client: open_build_logs(client, container_id, since)
            )
            session.pump = self._gateway.start_background(functools.partial(copier.copy, session.stream))
        return await self._wait_and_commit(session, job, log, state, resuming=resuming)

    async def _wait_and_commit(
        self, session: _BuildSession, job: BuildJob, log: DeploymentLog, state: dict[str, Any], *, resuming: bool
    ) -> BuildResult:
        """Waits for the container's end (its timeout counted from its real start) and its output's, then commits."""
        container_id = session.container_id
        if resuming and not is_running(state):
            exit_code, timed_out = _ended_while_away(state, job, log)
        else:
            # On a first run the clocks of agent and engine need not agree: the timeout starts now.
            started = docker_time(state.get("StartedAt")) if resuming else None
            elapsed = max(0.0, time.time() - started) if started is not None else 0.0
            exit_code, timed_out = await self._wait_for_exit(session, job, log, job.timeout_s - elapsed)
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
                    if isinstance(exc, ContainerMissing):
                        raise RuntimeFailure(f"the build result could not be kept: {exc.message}") from exc
                    raise
                # Stopped while its result was being kept: as killed, which the engine reports.
                log.agent(STAGE, "the build was stopped before its result was kept")
                return BuildResult(exit_code=UNKNOWN_EXIT_CODE, timed_out=False, image=None)
        return BuildResult(exit_code=exit_code, timed_out=False, image=image)

    async def close(self) -> None:
        """Ends the pump starter (running builds and their pumps go on)."""
        await self._gateway.in_thread(self._pump_starter.close)

    async def _attach_pump(self, pipes: PumpPipes, container_id: str, log: DeploymentLog) -> PumpProcess:
        """Hands the started pump its container; once attached, the container may start."""
        assert self._pump_socket is not None
        attach = self._gateway.in_thread(
            functools.partial(build_pumps.hand_job, pipes, self._pump_socket, container_id, log, STAGE)
        )
        try:
            return await asyncio.wait_for(attach, build_pumps.HANDSHAKE_S)
        except asyncio.CancelledError:
            pipes.kill()  # the thread's read then ends
            raise
        except asyncio.TimeoutError:
            pipes.kill()
            raise RuntimeFailure(
                f"following the build's output failed: the output pump did not attach within {build_pumps.HANDSHAKE_S:g}s"
            ) from None

    async def _find_pump(self, container_id: str, log: DeploymentLog, *, running: bool) -> PumpProcess | None:
        """After a restart: the pump that kept copying while the agent was away, or a new one if it is gone.

        A build that ended while away has nothing more to copy: its pump ended with it.
        """
        found = await self._gateway.in_thread(functools.partial(build_pumps.find, log.path))
        if found is not None or not running:
            return found
        log.agent(
            RECOVERY_STAGE,
            "the build's output pump had stopped while the agent was away; output from then until now is lost",
        )
        pipes = await self._gateway.in_thread(self._pump_starter.fork)
        return await self._attach_pump(pipes, container_id, log)

    async def _copy_workspace(self, container_id: str, workspace: Path) -> None:
        try:
            archive = await self._gateway.in_thread(functools.partial(_archive_unless_empty, workspace))
        except OSError as exc:
            raise RuntimeFailure(f"archiving the workspace {workspace} failed: {exc}") from exc
        if archive is None:
            return  # nothing to copy: Docker makes the working directory /workspace itself, empty
        await self._put_archive(container_id, "/", archive, "copying the workspace into the build container")

    async def _copy_archive(self, container_id: str, archive_path: Path) -> None:
        try:
            archive = await self._gateway.in_thread(functools.partial(open, archive_path, "rb"))
        except OSError as exc:
            raise RuntimeFailure(f"reading the workspace archive {archive_path} failed: {exc}") from exc
        await self._put_archive(container_id, WORKSPACE, archive, "copying the workspace into the build container")

    async def _put_archive(self, container_id: str, path: str, archive: IO[bytes], action: str) -> None:
        """Unpacks the tar at `path` in the container, and closes it."""
        try:
            await self._gateway.call(action, lambda client: client.api.put_archive(container_id, path, archive))
        finally:
            archive.close()

    async def _wait_for_exit(
        self, session: _BuildSession, job: BuildJob, log: DeploymentLog, remaining_s: float
    ) -> tuple[int, bool]:
        """Waits at most `remaining_s` (what is left of the job's timeout) for the container to exit; stops it on expiry."""
        container_id = session.container_id
        session.waiting = asyncio.ensure_future(
            self._gateway.call("waiting for the build container", lambda client: client.api.wait(container_id))
        )
        session.waiting.add_done_callback(retrieve)
        done, _ = await asyncio.wait({session.waiting}, timeout=max(0.0, remaining_s))
        timed_out = not done
        if timed_out:
            log.agent(STAGE, f"build timed out after {job.timeout_s:g}s; stopping")
            await self._gateway.stop_container(container_id, self._kill_grace_s)
        try:
            status = await session.waiting
        except ContainerMissing:
            if not timed_out:
                raise
            status = {}  # removed by someone else while being stopped: it timed out all the same
        return int(status.get("StatusCode", UNKNOWN_EXIT_CODE)), timed_out

    async def _drain_output(self, session: _BuildSession, log: DeploymentLog) -> None:
        """Lets the copy finish after the exit, however far behind it is; closes a stream that no longer brings anything.

        A copy from the log file ends at the file's end (complete once the container stopped). A
        followed logs request should end by itself; while output still comes in it is only behind
        (a busy host), and it is let go only once OUTPUT_DRAIN_S pass with nothing.
        """
        session.exited.set()
        session.exited_here.set()
        if session.copier is None:  # output through a pump: its watch stops one whose stream outlives the container
            if session.pump is not None:
                await session.pump
            return
        while True:
            done, _ = await asyncio.wait({session.pump}, timeout=OUTPUT_DRAIN_S)
            if done:
                return
            if session.stream is not None and time.monotonic() - session.copier.last_data_at >= OUTPUT_DRAIN_S:
                break
        log.agent(STAGE, "the output stream did not end with the container; closing it")
        await self._gateway.close_stream(session.stream)
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
        base_config = await self._images.config_of(job.image)
        labels = self._gateway.labels(SNAPSHOT_ROLE, job.deployment_id, job.application)
        snapshot_id = await self._gateway.create_cancel_safe(
            "creating the snapshot container",
            lambda client: create_idle_container(client, job.image, labels, f"deploy-agent-snapshot-{job.deployment_id}"),
        )
        try:
            archive = await self._images.fetch_workspace(
                container_id, job.workspace.parent, f"copying {WORKSPACE} out of the build container"
            )
            await self._put_archive(snapshot_id, "/", archive, f"copying {WORKSPACE} into the snapshot container")
            # The base image's command and entrypoint, not the snapshot's placeholder; its Env exactly.
            conf = {
                # The instance label keeps another agent on this engine from pruning this image.
                "Labels": {
                    DEPLOYMENT_LABEL: job.deployment_id, APPLICATION_LABEL: job.application, ROLE_LABEL: IMAGE_ROLE,
                    **({INSTANCE_LABEL: self._gateway.instance} if self._gateway.instance else {}),
                },
                "Cmd": base_config.get("Cmd"),
                "Entrypoint": base_config.get("Entrypoint"),
                "Env": base_config.get("Env"),
            }
            await self._gateway.call(
                "committing the build result",
                lambda client: client.api.commit(
                    snapshot_id, repository=repository, tag=tag, conf=conf,
                    message=f"deploy-agent: {WORKSPACE} built by {job.deployment_id}",
                ),
            )
        finally:
            await asyncio.shield(self._gateway.remove_container(snapshot_id))
        reference = f"{repository}:{tag}"
        log.agent(STAGE, f"committed the build result as image {reference}")
        return reference

    async def _discard_session(self, session: _BuildSession, cursor_file: Path) -> None:
        """Removes the container, closes its stream, lets the build's threads finish, and removes the cursor."""
        session.closing.set()
        with contextlib.suppress(RuntimeFailure):
            await self._gateway.remove_container(session.container_id)
        await self._gateway.close_stream(session.stream)
        pending = [future for future in (session.pump, session.waiting) if future is not None]
        if pending:
            await asyncio.wait(pending, timeout=OUTPUT_DRAIN_S)
        if session.pump_process is not None:
            # Its container is gone, so its stream ended; one that still runs is stuck, and ours.
            session.pump_process.kill()
        elif session.pump_pipes is not None:
            session.pump_pipes.close()
        await self._gateway.in_thread(functools.partial(_forget_output_state, cursor_file))


def _is_pumped(details: dict[str, Any]) -> bool:
    """Whether the build container's output goes to a pump (log driver none) rather than Docker's log.

    A container made by an agent before pumps (json-file) is still followed from its log.
    """
    config = ((details.get("HostConfig") or {}).get("LogConfig") or {})
    return config.get("Type") == PUMPED_LOG_CONFIG["Type"]


def _forget_output_state(cursor_file: Path) -> None:
    """Removes a build's cursor and pump record (both beside its log)."""
    remove_cursor(cursor_file)
    build_pumps.forget(cursor_file)


def _prepare_copier(log: DeploymentLog, resuming: bool) -> tuple[BuildOutputCopier, BuildCursor | None]:
    """The copier of the build's output and the cursor to resume from; file work, run in a thread.

    Resuming, it passes over what the log already holds: the frames up to the saved cursor, then
    the output lines the log got after the cursor was saved (counted in the log itself).
    """
    cursor_file = cursor_path(log.path)
    if not resuming:
        remove_cursor(cursor_file)
        return BuildOutputCopier(log, STAGE, cursor_file), None
    cursor = load_cursor(cursor_file)
    written_after = count_output_lines(log.path, cursor.log_bytes if cursor else 0, STAGE)
    copier = BuildOutputCopier(log, STAGE, cursor_file, cursor, skip_lines=written_after)
    return copier, cursor


def _ended_while_away(state: dict[str, Any], job: BuildJob, log: DeploymentLog) -> tuple[int, bool]:
    """The exit code of a build that ended while the agent was away, and whether it ran past its timeout."""
    exit_code = int(state.get("ExitCode", UNKNOWN_EXIT_CODE))
    started, finished = docker_time(state.get("StartedAt")), docker_time(state.get("FinishedAt"))
    timed_out = started is not None and finished is not None and finished - started > job.timeout_s
    if timed_out:
        log.agent(STAGE, f"build timed out after {job.timeout_s:g}s while the agent was away")
    return exit_code, timed_out


def _exit_code_of(waiting: asyncio.Future[dict[str, Any]] | None) -> int:
    """The exit code the wait saw, or UNKNOWN_EXIT_CODE when it saw none."""
    if waiting is None or not waiting.done() or waiting.cancelled() or waiting.exception() is not None:
        return UNKNOWN_EXIT_CODE
    return int(waiting.result().get("StatusCode", UNKNOWN_EXIT_CODE))


def _archive_unless_empty(workspace: Path) -> IO[bytes] | None:
    """The workspace's tar, or None when it holds nothing (a build with no source saves the copy)."""
    if not workspace.is_dir():
        return None
    with os.scandir(workspace) as entries:
        if next(entries, None) is None:
            return None
    return archive_workspace(workspace)
