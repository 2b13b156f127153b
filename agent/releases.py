"""Releases: start a deployment's release, check it, promote it, and keep the old one until then.

The previous release of an application is stopped only after the new one
passes its health check. With a fixed host port the two cannot overlap: the old
one is stopped first and started again if the new one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

import structlog

from agent.config import Config
from agent.errors import AgentError, Conflict, NotFound
from agent.health import HealthTarget, ReleaseUnhealthy, check_release
from agent.logs import DeploymentLog, LogPolicy
from agent.models import Deployment, RunSpec
from agent.runtimes.base import ReleaseHandle, ReleaseRuntime, ReleaseSpec
from agent.servers import LOCAL, Servers
from agent.store import Application, Store
from agent.workspace import prepare_workspace, remove_workspace

logger = structlog.get_logger("agent.releases")

STAGE = "release"
LAST_OUTPUT_LINES = 10
REMOTE_RETRY_S = 5.0
MAX_REMOTE_RETRY_S = 60.0


class ReleaseFailed(Exception):
    """The new release did not get healthy; the previous one keeps serving."""

    def __init__(self, error_type: str, message: str, *, exit_code: int | None, smoke_test: dict[str, Any] | None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.exit_code = exit_code
        self.smoke_test = smoke_test


class ReleaseManager:
    """Puts releases into service and takes them out, one application at a time."""

    def __init__(self, config: Config, store: Store, servers: Servers) -> None:
        self.config = config
        self.store = store
        self.servers = servers
        self.containers = servers.local_containers
        # One lock per application, kept only while someone holds or waits for it.
        self._locks: dict[str, _HeldLock] = {}
        self._remote_reconciler: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def lock(self, application: str) -> AsyncIterator[None]:
        """Holds the application's lock; it is dropped again once nobody holds or waits for it."""
        held = self._locks.get(application)
        if held is None:
            held = self._locks[application] = _HeldLock()
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if held.users == 0 and self._locks.get(application) is held:
                del self._locks[application]

    def is_locked(self, application: str) -> bool:
        held = self._locks.get(application)
        return held is not None and held.lock.locked()

    def _address(self, deployment: Deployment, handle: ReleaseHandle) -> str:
        """The host of a release's `url`: the address it is bound on."""
        bind = deployment.spec.run.bind if deployment.spec.run else None
        return self.servers.address_of(deployment.server, handle, bind)

    def _log_policy(self, deployment: Deployment) -> LogPolicy:
        """The deployment's log policy, for writers (and release followers) opened here."""
        return LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)

    async def runtime_of(self, kind: str, server: str) -> ReleaseRuntime:
        return await self.servers.release_runtime(kind, server)

    # --- deploying -------------------------------------------------------------------------

    async def deploy(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> dict[str, Any]:
        """Starts, checks and promotes the release; returns the deployment's fields on success."""
        run = deployment.spec.run
        assert run is not None
        async with self.lock(deployment.application):
            spec = await self._release_spec(deployment, log, image)
            server = deployment.server
            runtime = await self.runtime_of(run.runtime, server)
            previous = await self._current_release(deployment.application)
            fixed_port = run.host_port if run.runtime == "container" else run.port
            stopped_previous = False
            if previous is not None and fixed_port is not None and fixed_port in previous[1].ports.values():
                log.agent(STAGE, f"stopping the previous release {previous[0].id} to free host port {fixed_port}")
                previous_runtime = await self.runtime_of(previous[1].runtime, previous[0].server)
                await previous_runtime.stop_release(previous[1], self.config.agent.kill_grace_s)
                stopped_previous = True
            handle: ReleaseHandle | None = None
            try:
                handle = await runtime.start_release(spec, log)
                url = _url_of(handle, spec.ports[0] if spec.ports else None, self._address(deployment, handle))
                await self.store.update(
                    deployment.id, release=handle.to_dict(), pid=handle.pid, pid_started_at=handle.pid_started_at,
                    container_id=handle.container_id, url=url, stage="health",
                )
                log.agent(STAGE, f"release started{f' at {url}' if url else ''}")
                started = handle
                smoke_test = await check_release(
                    deployment.spec.health_check,
                    await self._health_target(handle, deployment),
                    lambda: runtime.release_state(started),
                    log,
                )
            except BaseException as exc:
                # Read the dying release's last output before removing it.
                failure = await self._failure(exc, runtime, handle, log) if isinstance(exc, ReleaseUnhealthy) else None
                await asyncio.shield(self._undo(deployment, runtime, handle, previous, stopped_previous, log))
                if failure is not None:
                    raise failure from None
                raise
            if handle.runtime == "container":
                await (await self.servers.containers(server)).keep_running(handle)
            # Switch first, then drain: clients that looked up the old URL a moment ago still get answers.
            await self.store.set_application(deployment.application, deployment.id, "running")
            log.agent(STAGE, "the new release is in service")
            if previous is not None:
                if not stopped_previous and self.config.releases.drain_s:
                    log.agent(STAGE, f"draining the previous release {previous[0].id} for {self.config.releases.drain_s:g}s")
                    await asyncio.sleep(self.config.releases.drain_s)
                log.agent(STAGE, f"removing the previous release {previous[0].id}")
                previous_runtime = await self.runtime_of(previous[1].runtime, previous[0].server)
                await previous_runtime.remove_release(previous[1], self.config.agent.kill_grace_s)
                await self.store.update(previous[0].id, pid=None)
            return {
                "pid": handle.pid, "pid_started_at": handle.pid_started_at, "container_id": handle.container_id,
                "url": url, "smoke_test": smoke_test, "release": handle.to_dict(), "release_image": spec.image or image,
                "stage": None,
            }

    async def _undo(
        self,
        deployment: Deployment,
        runtime: ReleaseRuntime,
        handle: ReleaseHandle | None,
        previous: tuple[Deployment, ReleaseHandle] | None,
        stopped_previous: bool,
        log: DeploymentLog,
    ) -> None:
        """Removes a release that will not be promoted and brings back the one it displaced."""
        if handle is not None:
            await runtime.remove_release(handle, self.config.agent.kill_grace_s)
            await self.store.update(deployment.id, pid=None, stage=None)
            log.agent(STAGE, "the new release was stopped and removed")
        if previous is not None and stopped_previous:
            old, old_handle = previous
            log.agent(STAGE, f"starting the previous release {old.id} again")
            await self.resume(old, old_handle)
        elif previous is not None:
            log.agent(STAGE, f"the previous release {previous[0].id} keeps serving")

    async def _health_target(self, handle: ReleaseHandle, deployment: Deployment) -> HealthTarget | None:
        health = deployment.spec.health_check
        run = deployment.spec.run
        if health is None or run is None:
            return None
        port = health.port or run.port or (next(iter(handle.ports)) if handle.ports else None)
        if port is None:
            return None
        if handle.runtime == "container" and run.port and port != run.port:
            # Only run.port is published on run.bind; the container runtime keeps other ports on loopback.
            handle = replace(handle, host="127.0.0.1")
        return await self.servers.reach(deployment.server, handle, port)

    async def _failure(
        self, exc: ReleaseUnhealthy, runtime: ReleaseRuntime, handle: ReleaseHandle | None, log: DeploymentLog
    ) -> ReleaseFailed:
        message = exc.message
        if exc.died and handle is not None:
            lines = await runtime.last_output(handle, LAST_OUTPUT_LINES)
            if lines:
                message += "; last output: " + " | ".join(line.strip() for line in lines[-5:])
        error_type = "release_exited" if exc.died else "health_check_failed"
        # The last output comes from Docker's own log, unmasked: mask it like the deployment's log.
        message = log.mask(message)
        return ReleaseFailed(error_type, message, exit_code=exc.exit_code, smoke_test=exc.smoke_test)

    async def _release_spec(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> ReleaseSpec:
        run = deployment.spec.run
        assert run is not None
        health = deployment.spec.health_check
        ports = [run.port] if run.port else []
        if health is not None and health.port and health.port not in ports:
            ports.append(health.port)
        env = dict(run.env)
        workdir = None
        if run.runtime == "process" and deployment.server != LOCAL:
            workdir = await self._remote_workdir(deployment, log)
            if not ports:
                ports = [await self.servers.remote_processes(deployment.server).free_port()]
            env.setdefault("PORT", str(ports[0]))
        elif run.runtime == "process":
            workdir = await self._process_workdir(deployment, log, image)
            if not ports:
                ports = [_free_port()]
            env.setdefault("PORT", str(ports[0]))
        return ReleaseSpec(
            deployment_id=deployment.id,
            application=deployment.application,
            runtime=run.runtime,
            command=run.command,
            env=env,
            log_path=Path(deployment.log_path),
            ports=tuple(ports),
            image=(run.image or image) if run.runtime == "container" else None,
            host_port=run.host_port,
            bind=run.bind,
            workdir=workdir,
            **self._limits(run),
        )

    def _limits(self, run: RunSpec) -> dict[str, Any]:
        """The release container's limits: the run's own, else the [docker] release_* defaults."""
        docker = self.config.docker
        return {
            "memory": run.memory or docker.release_memory_bytes,
            "cpus": run.cpus or docker.release_cpus,
            "pids": run.pids or docker.release_pids,
        }

    async def _process_workdir(self, deployment: Deployment, log: DeploymentLog, image: str | None) -> Path:
        """The directory a host process runs in: the built workspace, the source, or a rollback's."""
        workdir = self.config.releases_dir / deployment.id
        await remove_workspace(workdir)
        origin = deployment.release_from
        if image is not None and image.startswith("deploy-agent/"):
            log.agent(STAGE, f"copying the built workspace out of {image}")
            await self.containers.copy_workspace_out(image, workdir)
        elif origin is not None and origin != deployment.id:
            source = self.config.releases_dir / origin
            log.agent(STAGE, f"copying the workspace of {origin}")
            await asyncio.to_thread(shutil.copytree, source, workdir, symlinks=True)
        else:
            await prepare_workspace(deployment.spec.source, workdir, log, state_dir=self.config.agent.state_dir)
        return workdir

    async def _remote_workdir(self, deployment: Deployment, log: DeploymentLog) -> Path:
        """A remote process release runs where its build ran, or in its rollback target's directory."""
        origin = deployment.release_from or deployment.id
        workdir = remote_release_dir(origin)
        if deployment.spec.build is None and origin == deployment.id:
            remote = self.servers.remote_processes(deployment.server)
            source = deployment.spec.source
            if source is not None and source.type == "git":
                await remote.clone_workspace(source.url or "", source.ref, str(workdir), log)
            else:
                local = self.config.workspaces_dir / deployment.id
                await prepare_workspace(source, local, log, state_dir=self.config.agent.state_dir)
                try:
                    await remote.upload_workspace(local, str(workdir), log)
                finally:
                    await remove_workspace(local)
        return workdir

    async def _current_release(self, application: str) -> tuple[Deployment, ReleaseHandle] | None:
        try:
            app = await self.store.get_application(application)
            current = await self.store.get(app.deployment_id)
        except NotFound:
            return None
        if app.state != "running" or current.release is None:
            return None
        return current, ReleaseHandle.from_dict(current.release)

    # --- applications ----------------------------------------------------------------------

    async def resume(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseHandle:
        """Starts a stopped release of `deployment` again and records its new handle."""
        runtime = await self.runtime_of(handle.runtime, deployment.server)
        spec = await self._resume_spec(deployment, handle)
        with DeploymentLog(Path(deployment.log_path), self._log_policy(deployment)) as log:
            new_handle = await runtime.resume_release(handle, spec, log)
        if new_handle.runtime == "container":
            await (await self.servers.containers(deployment.server)).keep_running(new_handle)
        await self.store.update(
            deployment.id, release=new_handle.to_dict(), pid=new_handle.pid, pid_started_at=new_handle.pid_started_at,
            container_id=new_handle.container_id,
            url=_url_of(
                new_handle, spec.ports[0] if spec.ports else None, self._address(deployment, new_handle)
            ),
        )
        return new_handle

    async def _resume_spec(self, deployment: Deployment, handle: ReleaseHandle) -> ReleaseSpec:
        run = deployment.spec.run
        assert run is not None
        env = dict(run.env)
        ports = tuple(handle.ports)
        if handle.runtime == "process" and ports:
            env.setdefault("PORT", str(ports[0]))
        return ReleaseSpec(
            deployment_id=deployment.id, application=deployment.application, runtime=handle.runtime,
            command=run.command, env=env, log_path=Path(deployment.log_path), ports=ports,
            image=deployment.release_image, host_port=run.host_port, bind=run.bind,
            workdir=self._workdir_of(deployment) if handle.runtime == "process" else None,
            **self._limits(run),
        )

    def _workdir_of(self, deployment: Deployment) -> Path:
        if deployment.server != LOCAL:
            return remote_release_dir(deployment.release_from or deployment.id)
        return self.config.releases_dir / deployment.id

    async def stop_application(self, name: str) -> Application:
        # NotFound first: an unknown name must leave no state behind.
        await self.store.get_application(name)
        if self.is_locked(name):
            raise Conflict(f"a deployment of {name} is being put into service; try again when it is done")
        async with self.lock(name):
            app = await self.store.get_application(name)
            if app.state != "running":
                raise Conflict(f"application {name} is already stopped", code="already_stopped")
            deployment = await self.store.get(app.deployment_id)
            if deployment.release is not None:
                handle = ReleaseHandle.from_dict(deployment.release)
                runtime = await self.runtime_of(handle.runtime, deployment.server)
                await runtime.stop_release(handle, self.config.agent.kill_grace_s)
            await self.store.update(deployment.id, pid=None)
            logger.info("application stopped", application=name, deployment_id=deployment.id)
            return await self.store.set_application(name, deployment.id, "stopped")

    async def start_application(self, name: str) -> Application:
        await self.store.get_application(name)
        if self.is_locked(name):
            raise Conflict(f"a deployment of {name} is being put into service; try again when it is done")
        async with self.lock(name):
            app = await self.store.get_application(name)
            if app.state == "running":
                raise Conflict(f"application {name} is already running", code="already_running")
            deployment = await self.store.get(app.deployment_id)
            if deployment.release is None:
                raise Conflict(f"application {name} has no release to start")
            await self.resume(deployment, ReleaseHandle.from_dict(deployment.release))
            logger.info("application started", application=name, deployment_id=deployment.id)
            return await self.store.set_application(name, deployment.id, "running")

    async def application_json(self, app: Application) -> dict[str, Any]:
        deployment = await self.store.get(app.deployment_id)
        running = app.state == "running"
        return {
            "name": app.name,
            "current_deployment_id": app.deployment_id,
            "state": app.state,
            "url": deployment.url if running else None,
            "since": app.since,
            "runtime": deployment.spec.run.runtime if deployment.spec.run else None,
            "container_id": deployment.container_id,
            "pid": deployment.pid if running else None,
            "updated_at": app.updated_at,
        }

    # --- rollback and retention ------------------------------------------------------------

    async def check_rollback_target(self, target: Deployment) -> None:
        """Raises Conflict unless `target` left a release that can be brought back."""
        if target.status != "succeeded" or target.spec.run is None or target.release is None:
            raise Conflict(
                f"deployment {target.id} never put a release into service ({target.status}); nothing to roll back to",
                code="no_release",
            )
        pruned = Conflict(
            f"the release of {target.id} was pruned (retention keeps the last "
            f"{self.config.releases.retention} releases of {target.application}); it cannot be rolled back to",
            code="release_pruned",
        )
        image = target.release_image
        origin = target.release_from or target.id
        if target.spec.run.runtime == "process" and target.server != LOCAL:
            remote = self.servers.remote_processes(target.server)
            if not await remote.has_dir(str(remote_release_dir(origin))):
                raise pruned
            return
        containers = await self.servers.containers(target.server)
        if target.spec.run.runtime == "container":
            if image is None or not await containers.image_exists(image):
                raise pruned
            return
        has_image = image is not None and image.startswith("deploy-agent/") and await containers.image_exists(image)
        if not has_image and not (self.config.releases_dir / origin).is_dir():
            raise pruned

    async def prune(
        self,
        application: str,
        log: DeploymentLog | None = None,
        *,
        newest: tuple[Deployment, str | None] | None = None,
        server: str = LOCAL,
    ) -> list[str]:
        """Keeps the release images (and process workspaces) of the last N succeeded releases.

        `newest` is (deployment, image) of a release being promoted right now, counted
        first although its status is not `succeeded` yet.
        """
        releases = [
            _Kept(d.id, d.release_image, d.server, d.release_from or d.id)
            for d in await self.store.succeeded_releases(application)
        ]
        if newest is not None:
            latest, image = newest
            releases = [_Kept(latest.id, image, latest.server, latest.release_from or latest.id)] + [
                r for r in releases if r.id != latest.id
            ]
        keep = releases[: self.config.releases.retention]
        try:
            current = (await self.store.get_application(application)).deployment_id
        except NotFound:
            current = None
        kept_images = {d.release_image for d in keep if d.release_image}
        kept_images |= {d.release_image for d in releases if d.id == current and d.release_image}
        removed: list[str] = []
        # A remote server serving only host processes may have no Docker engine to ask.
        if server == LOCAL or any(d.release_image for d in releases):
            containers = await self.servers.containers(server)
            for image in await containers.list_release_images(application):
                if image not in kept_images and await containers.remove_image(image):
                    removed.append(image)
        kept_ids = {d.id for d in keep} | {current}
        # A remote rollback runs in its target's directory: that directory stays while either is kept.
        kept_dirs = {d.origin for d in releases if d.id in kept_ids}
        for deployment in releases[len(keep):]:
            if deployment.id in kept_ids:
                continue
            if deployment.server == LOCAL:
                await remove_workspace(self.config.releases_dir / deployment.id)
            elif deployment.origin not in kept_dirs:
                await self.servers.remote_processes(deployment.server).remove_dir(
                    str(remote_release_dir(deployment.origin))
                )
        if removed and log is not None:
            log.agent(STAGE, f"pruned {len(removed)} old release image(s): {', '.join(removed)}")
        return removed

    # --- after a restart -------------------------------------------------------------------

    async def reconcile(self, interrupted: list[Deployment]) -> None:
        """Removes releases of interrupted deployments and makes sure current releases serve.

        Local releases are settled here; those on remote servers in the background, because a
        server may be unreachable for a while and must not hold up this host's deployments.
        """
        remote_apps: list[str] = []
        for deployment in interrupted:
            if deployment.release is None:
                continue
            handle = ReleaseHandle.from_dict(deployment.release)
            try:
                await (await self.runtime_of(handle.runtime, deployment.server)).remove_release(handle, 0)
            except AgentError as exc:
                if deployment.server == LOCAL:
                    raise  # Docker down here: reconciliation is retried as a whole
                logger.warning("could not remove the release of an interrupted deployment",
                               deployment_id=deployment.id, server=deployment.server, error=exc.message)
        current_ids: set[str] = set()
        for app in await self.store.list_applications():
            current_ids.add(app.deployment_id)
            deployment = await self.store.get(app.deployment_id)
            if app.state != "running" or deployment.release is None:
                continue
            if deployment.server != LOCAL:
                remote_apps.append(app.name)
                continue
            await self._settle_current(deployment)
        await self.containers.remove_copy_containers()
        for container in await self.containers.list_release_containers():
            if container.deployment_id not in current_ids:
                orphan = ReleaseHandle(
                    runtime="container", deployment_id=container.deployment_id, application=container.application,
                    host="127.0.0.1", container_id=container.container_id,
                )
                await self.containers.remove_release(orphan, 0)
                logger.info("removed an orphan release container", deployment_id=container.deployment_id)
        if remote_apps and self._remote_reconciler is None:
            self._remote_reconciler = asyncio.create_task(self._reconcile_remote(remote_apps), name="remote-reconcile")

    async def _reconcile_remote(self, applications: list[str]) -> None:
        """Settles the current release of each remote application, retrying those whose server is away."""
        delay = REMOTE_RETRY_S
        pending = list(applications)
        while pending:
            failed: list[str] = []
            for name in pending:
                try:
                    async with self.lock(name):
                        app = await self.store.get_application(name)
                        deployment = await self.store.get(app.deployment_id)
                        if app.state == "running" and deployment.release is not None:
                            await self._settle_current(deployment)
                except AgentError as exc:
                    logger.warning("could not check a remote release; retrying", application=name,
                                   error=exc.message, retry_in_s=delay)
                    failed.append(name)
            pending = failed
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_REMOTE_RETRY_S)

    async def _settle_current(self, deployment: Deployment) -> None:
        """Starts a current release that is not running again, or follows its output once more."""
        handle = ReleaseHandle.from_dict(deployment.release or {})
        runtime = await self.runtime_of(handle.runtime, deployment.server)
        state = await runtime.release_state(handle)
        if not state.running:
            logger.warning("current release is not running; starting it again", application=deployment.application)
            await self.resume(deployment, handle)
            return
        if handle.runtime == "process":
            if deployment.server != LOCAL:
                self.servers.remote_processes(deployment.server).follow_release(
                    handle, Path(deployment.log_path), self._log_policy(deployment)
                )
            return
        containers = await self.servers.containers(deployment.server)
        # Docker gives a restarted container new ephemeral ports and a new pid.
        refreshed = await containers.refresh_release(handle)
        if refreshed is not None and refreshed != handle:
            port = deployment.spec.run.port if deployment.spec.run else None
            await self.store.update(
                deployment.id, release=refreshed.to_dict(), pid=refreshed.pid,
                url=_url_of(refreshed, port, self._address(deployment, refreshed)),
            )
            handle = refreshed
        await containers.attach_release_output(handle, Path(deployment.log_path), self._log_policy(deployment))

    async def close(self) -> None:
        """Stops the background reconciliation of remote releases."""
        if self._remote_reconciler is not None:
            self._remote_reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remote_reconciler
            self._remote_reconciler = None


@dataclass
class _HeldLock:
    """An application's lock and how many tasks hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True)
class _Kept:
    id: str
    release_image: str | None
    server: str
    origin: str  # the deployment whose (remote) release directory this release runs in


def remote_release_dir(deployment_id: str) -> Path:
    """Where a remote process release lives on its server, relative to the SSH user's home."""
    return Path(".deploy-agent") / "releases" / deployment_id


def _url_of(handle: ReleaseHandle, port: int | None, address: str) -> str | None:
    if port is None or port not in handle.ports:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{handle.ports[port]}"





def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
