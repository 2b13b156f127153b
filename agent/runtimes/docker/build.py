"""Builds in Docker containers: create, copy the workspace in, attach, start, wait, commit, remove.

The commit is of a fresh container of the build image holding only the built /workspace, so
the release image carries none of the build's environment (see Builds._commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
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
    retrieve,
)
from agent.runtimes.docker.hardening import create_running_host_config
from agent.runtimes.docker.images import WORKSPACE, Images, archive_workspace
from agent.runtimes.docker.output import OUTPUT_DRAIN_S, pump_output

STAGE = "build"
# Exit code reported when the container vanished before its exit code could be read (as SIGKILL).
UNKNOWN_EXIT_CODE = 137


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
    stream: CancellableStream | None = None
    pump: asyncio.Future[None] | None = None
    waiting: asyncio.Future[dict[str, Any]] | None = None
    # Set by stop_deployment: a failure from here on is the stop's doing, not the build's.
    stopped: bool = False


class Builds:
    """Runs build containers on one engine and keeps their results as images."""

    def __init__(self, gateway: DockerGateway, images: Images, *, kill_grace_s: float) -> None:
        self._gateway = gateway
        self._images = images
        self._kill_grace_s = kill_grace_s
        # The builds running now, by deployment id.
        self._sessions: dict[str, _BuildSession] = {}

    async def run(
        self, job: BuildJob, log: DeploymentLog, on_start: Callable[[str, int], Awaitable[None]]
    ) -> BuildResult:
        """Runs the build command in a fresh container and always removes the container after."""
        await self._images.ensure(job.image, log, STAGE)
        container_id = await self._gateway.create_cancel_safe(
            "creating the build container", lambda client: self._create_container(client, job)
        )
        session = _BuildSession(container_id)
        self._sessions[job.deployment_id] = session
        try:
            return await self._run_container(session, job, log, on_start)
        except ContainerMissing as exc:
            log.agent(STAGE, f"the build container was removed while the build ran ({exc.message})")
            return BuildResult(exit_code=_exit_code_of(session.waiting), timed_out=False, image=None)
        finally:
            if self._sessions.get(job.deployment_id) is session:
                del self._sessions[job.deployment_id]
            # Shielded: a second cancellation must not leave the container behind.
            await asyncio.shield(self._discard_session(session))

    async def stop_deployment(self, deployment_id: str, grace_s: float) -> int:
        """Stops (SIGTERM, SIGKILL after `grace_s`) and removes the deployment's build and snapshot containers."""
        session = self._sessions.get(deployment_id)
        if session is not None:
            session.stopped = True
        containers = await self._list_containers(f"{DEPLOYMENT_LABEL}={deployment_id}")
        await asyncio.gather(*(self._gateway.stop_and_remove(entry["Id"], grace_s) for entry in containers))
        return len(containers)

    async def remove_containers(self, keep: Callable[[str], bool]) -> list[str]:
        """Removes build and snapshot containers whose deployment `keep` rejects; returns those deployment ids."""
        removed: list[str] = []
        for entry in await self._list_containers():
            deployment_id = (entry.get("Labels") or {}).get(DEPLOYMENT_LABEL)
            if not deployment_id or keep(deployment_id):
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
            # The agent streams output itself; Docker keeping a second copy costs CPU and disk.
            log_config={"Type": "none", "Config": {}},
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
        session.stream = await self._gateway.attach(container_id, "attaching to the build container")
        session.pump = self._gateway.start_background(functools.partial(pump_output, session.stream, log, STAGE))
        log.agent(STAGE, f"starting build container {container_id[:12]} from {job.image}")
        await self._gateway.start(container_id, "starting the build container")
        details = await self._gateway.inspect(container_id, "inspecting the build container")
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
                    if isinstance(exc, ContainerMissing):
                        raise RuntimeFailure(f"the build result could not be kept: {exc.message}") from exc
                    raise
                # Stopped while its result was being kept: as killed, which the engine reports.
                log.agent(STAGE, "the build was stopped before its result was kept")
                return BuildResult(exit_code=UNKNOWN_EXIT_CODE, timed_out=False, image=None)
        return BuildResult(exit_code=exit_code, timed_out=False, image=image)

    async def _copy_workspace(self, container_id: str, workspace: Path) -> None:
        try:
            archive = await self._gateway.in_thread(functools.partial(archive_workspace, workspace))
        except OSError as exc:
            raise RuntimeFailure(f"archiving the workspace {workspace} failed: {exc}") from exc
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

    async def _wait_for_exit(self, session: _BuildSession, job: BuildJob, log: DeploymentLog) -> tuple[int, bool]:
        """Waits at most the job's timeout for the container to exit; stops it on expiry."""
        container_id = session.container_id
        session.waiting = asyncio.ensure_future(
            self._gateway.call("waiting for the build container", lambda client: client.api.wait(container_id))
        )
        session.waiting.add_done_callback(retrieve)
        done, _ = await asyncio.wait({session.waiting}, timeout=job.timeout_s)
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
        """Lets the output stream finish after the exit; closes it if it lingers."""
        assert session.pump is not None
        done, _ = await asyncio.wait({session.pump}, timeout=OUTPUT_DRAIN_S)
        if not done:
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

    async def _discard_session(self, session: _BuildSession) -> None:
        """Removes the container, closes its stream and lets the build's threads finish."""
        with contextlib.suppress(RuntimeFailure):
            await self._gateway.remove_container(session.container_id)
        await self._gateway.close_stream(session.stream)
        pending = [future for future in (session.pump, session.waiting) if future is not None]
        if pending:
            await asyncio.wait(pending, timeout=OUTPUT_DRAIN_S)


def _exit_code_of(waiting: asyncio.Future[dict[str, Any]] | None) -> int:
    """The exit code the wait saw, or UNKNOWN_EXIT_CODE when it saw none."""
    if waiting is None or not waiting.done() or waiting.cancelled() or waiting.exception() is not None:
        return UNKNOWN_EXIT_CODE
    return int(waiting.result().get("StatusCode", UNKNOWN_EXIT_CODE))
