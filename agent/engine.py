"""The engine: the durable queue, its workers, and what happens to each deployment.

Scheduling is event-driven: a submit, a finished deployment or a kill wakes the
scheduler, which starts the oldest queued deployment of every application that
is not already running, up to `max_concurrent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import structlog

from agent.config import Config
from agent.errors import AgentError, Conflict, DiskFull, Forbidden, NotFound, RuntimeFailure, Unavailable
from agent.logs import DeploymentLog, LogPolicy
from agent.metrics import Metrics
from agent.policy import authorize_spec
from agent.models import (
    FINAL_STATUSES,
    Deployment,
    DeploymentFilter,
    DeploymentSpec,
    encode_cursor,
    new_deployment_id,
    utc_now,
)
from agent.releases import ReleaseFailed, ReleaseManager, remote_release_dir
from agent.runtimes.container import BuildJob, ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.remote_process import RemoteBuildJob
from agent.servers import LOCAL, Servers
from agent.ssh import SshConnections
from agent.store import Store
from agent.workspace import prepare_workspace, remove_workspace

logger = structlog.get_logger("agent.engine")


@dataclass
class RunningDeployment:
    """A deployment a worker is carrying out right now."""

    deployment_id: str
    application: str
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "kill" or "shutdown" once someone asked it to stop
    phase: str = "queued"
    # Stops the build's work wherever it runs (containers here or there, a remote process group).
    stop_work: Callable[[float], Awaitable[Any]] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    """Accepts deployments, schedules them, runs them, and stops them on request."""

    def __init__(
        self,
        config: Config,
        store: Store,
        runtime: ContainerRuntime,
        metrics: Metrics | None = None,
        processes: ProcessRuntime | None = None,
        instance: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.processes = processes or ProcessRuntime(config.run_dir, kill_grace_s=config.agent.kill_grace_s)
        self.servers = Servers(config, SshConnections(config.servers), runtime, self.processes, instance=instance)
        self.releases = ReleaseManager(config, store, self.servers)
        self.metrics = metrics or Metrics()
        self.accepting = False
        self._running: dict[str, RunningDeployment] = {}
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._reconciled = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Reconciles what a previous run left behind, then starts scheduling."""
        self.config.logs_dir.mkdir(parents=True, exist_ok=True)
        self.config.workspaces_dir.mkdir(parents=True, exist_ok=True)
        self.config.releases_dir.mkdir(parents=True, exist_ok=True)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self.reconcile()
            self._reconciled = True
        except AgentError as exc:
            logger.error("reconciliation failed; retrying in the background", error=exc.message)
        self.accepting = True
        self._scheduler = asyncio.create_task(self._reconcile_then_schedule(), name="scheduler")
        self._wakeup.set()

    async def _reconcile_then_schedule(self) -> None:
        # Docker may be down at boot: accept (durably) and answer 503 on /healthz until it is back.
        delay = 1.0
        while not self._reconciled:
            try:
                await self.reconcile()
                self._reconciled = True
            except AgentError as exc:
                logger.error("reconciliation failed; retrying", error=exc.message, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        await self._schedule_forever()

    async def reconcile(self) -> None:
        """Ends deployments a previous run left in progress and removes their containers."""
        interrupted = await self.store.with_status("building", "deploying")
        await self.releases.reconcile([d for d in interrupted if d.status == "deploying"])
        for deployment in interrupted:
            with structlog.contextvars.bound_contextvars(deployment_id=deployment.id):
                removed = await self._stop_leftovers(deployment)
                message = (
                    f"the agent stopped while this deployment was {deployment.status}; "
                    f"its work was stopped after the restart ({removed} container(s) removed)"
                )
                policy = LogPolicy.for_spec(deployment.spec, self.config.agent.max_log_bytes)
                with DeploymentLog(Path(deployment.log_path), policy) as log:
                    log.agent("recovery", message)
                await self._set_status(
                    deployment.id, "failed", error={"type": "agent_restarted", "message": message}
                )
                await remove_workspace(self._workspace_of(deployment.id))
        # Build containers with no live deployment behind them (e.g. crash between create and record).
        orphans = await self.runtime.remove_build_containers(keep=lambda _deployment_id: False)
        logger.info("reconciled", interrupted=len(interrupted), orphan_containers=len(orphans))

    async def _stop_leftovers(self, deployment: Deployment) -> int:
        """Stops what an interrupted deployment left running; a remote server may be unreachable."""
        try:
            containers = await self.servers.containers(deployment.server)
            removed = await containers.stop_deployment(deployment.id, grace_s=0)
            build = deployment.spec.build
            if deployment.server != LOCAL and build is not None and build.runtime == "process" and deployment.pid:
                remote = self.servers.remote_processes(deployment.server)
                removed += int(await remote.kill_group(deployment.pid, deployment.pid_started_at or 0, 0))
            run = deployment.spec.run
            if deployment.server != LOCAL and (build is not None and build.runtime == "process"
                                               or run is not None and run.runtime == "process"):
                await self._remove_remote_dir(deployment)
            return removed
        except AgentError as exc:
            logger.warning("could not stop the leftovers of an interrupted deployment", error=exc.message)
            return 0

    async def shutdown(self, grace_s: float) -> dict[str, int]:
        """Stops intake, lets running deployments finish within `grace_s`, stops the rest."""
        self.accepting = False
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        running = list(self._running.values())
        drained = 0
        if running:
            logger.info("draining", running=len(running), grace_s=grace_s)
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(r.done.wait()) for r in running], timeout=grace_s
            )
            for waiter in pending:
                waiter.cancel()
            drained = len(done)
            leftovers = [r for r in running if not r.done.is_set()]
            await asyncio.gather(*(self._stop_running(r, "shutdown") for r in leftovers))
        stopped = len(running) - drained
        await self.releases.close()
        counts = {"drained": drained, "stopped": stopped}
        logger.info("engine stopped", **counts)
        return counts

    # --- requests --------------------------------------------------------------------------

    async def submit(
        self, spec: DeploymentSpec, *, idempotency_key: str | None = None, request_hash: str = ""
    ) -> tuple[Deployment, bool]:
        """Records a deployment durably and wakes the scheduler; returns (deployment, created)."""
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new deployments")
        await self._raise_if_disk_low()
        record = self._new_record(spec)
        deployment, created = await self.store.insert(
            record,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            max_queued=self.config.agent.max_queued,
        )
        if created:
            logger.info("deployment queued", deployment_id=deployment.id, application=deployment.application)
            self._wakeup.set()
        return deployment, created

    def _new_record(self, spec: DeploymentSpec, **fields: Any) -> Deployment:
        """A queued deployment of `spec`, not yet stored."""
        deployment_id = new_deployment_id()
        now = utc_now()
        return Deployment(
            id=deployment_id,
            application=spec.application,
            server=spec.server,
            status="queued",
            created_at=now,
            updated_at=now,
            log_path=str((self.config.logs_dir / f"{deployment_id}.log").resolve()),
            spec=spec,
            **fields,
        )

    async def get(self, deployment_id: str) -> Deployment:
        return await self.store.get(deployment_id)

    async def list(self, query: DeploymentFilter) -> tuple[list[Deployment], str | None]:
        page, next_seq = await self.store.list(query)
        return page, encode_cursor(next_seq) if next_seq is not None else None

    async def kill(self, deployment_id: str) -> Deployment:
        """Cancels a queued deployment, or stops a running one's containers and ends it `cancelled`."""
        deployment = await self.store.get(deployment_id)
        if deployment.is_final:
            raise Conflict(f"deployment {deployment_id} is already {deployment.status}", code="already_final")
        running = self._running.get(deployment_id)
        if running is None and deployment.status == "queued":
            try:
                return await self._set_status(
                    deployment_id, "cancelled", error={"type": "cancelled", "message": "killed before it started"}
                )
            except Conflict:
                # The scheduler started it in the meantime: stop it like a running one.
                running = self._running.get(deployment_id)
        if running is not None:
            await self._stop_running(running, "kill")
        return await self.store.get(deployment_id)

    async def delete(self, deployment_id: str) -> None:
        """Removes a deployment's record, log file and workspace (not a running application)."""
        if deployment_id in self._running:
            raise Conflict(f"deployment {deployment_id} is in progress; kill it before deleting it", code="in_progress")
        target = await self.store.get(deployment_id)
        if target.release is not None:
            try:
                app = await self.store.get_application(target.application)
            except NotFound:
                app = None
            if app is not None and app.deployment_id == deployment_id:
                raise Conflict(
                    f"deployment {deployment_id} is the current release of {target.application}; "
                    "deploy another release first, or its running application would no longer be tracked",
                    code="current_release",
                )
        deployment = await self.store.delete(deployment_id)
        await asyncio.to_thread(_unlink, Path(deployment.log_path))
        await remove_workspace(self._workspace_of(deployment_id))
        logger.info("deployment deleted", deployment_id=deployment_id)

    async def rollback(self, deployment_id: str) -> Deployment:
        """Queues a new deployment that brings back the release of `deployment_id` (no build)."""
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new deployments")
        await self._raise_if_disk_low()
        target = await self.store.get(deployment_id)
        await self.releases.check_rollback_target(target)
        record = self._new_record(
            dataclasses.replace(target.spec, source=None, build=None),
            rollback_of=target.id,
            release_image=target.release_image,
            release_from=target.release_from or target.id,
        )
        deployment, _ = await self.store.insert(record, max_queued=self.config.agent.max_queued)
        logger.info("rollback queued", deployment_id=deployment.id, rollback_of=target.id)
        self._wakeup.set()
        return deployment

    async def list_applications(self) -> list[dict[str, Any]]:
        return [await self.releases.application_json(app) for app in await self.store.list_applications()]

    async def get_application(self, name: str) -> dict[str, Any]:
        return await self.releases.application_json(await self.store.get_application(name))

    async def stop_application(self, name: str) -> dict[str, Any]:
        return await self.releases.application_json(await self.releases.stop_application(name))

    async def start_application(self, name: str, scopes: frozenset[str] | None = None) -> dict[str, Any]:
        """Brings the current release back; a host-process one needs what submitting it did (403)."""
        current = await self.store.get((await self.store.get_application(name)).deployment_id)
        runtime_only = dataclasses.replace(current.spec, source=None, build=None)
        await asyncio.to_thread(authorize_spec, runtime_only, self.config, scopes)
        return await self.releases.application_json(await self.releases.start_application(name))

    async def list_servers(self) -> list[dict[str, Any]]:
        """Configured remote servers with reachability, latency and Docker version."""
        return await self.servers.describe()

    async def check_server(self, name: str) -> dict[str, Any]:
        if name not in self.config.servers:
            raise NotFound(f"server {name} is not configured (no [servers.{name}] in the config)")
        return await self.servers.check(name)

    async def _raise_if_disk_low(self) -> None:
        """DiskFull while free space in state_dir is below agent.min_free_bytes (checked on every intake)."""
        minimum = self.config.agent.min_free_bytes
        if not minimum:
            return
        free = await asyncio.to_thread(_free_bytes, self.config.agent.state_dir)
        if free is not None and free < minimum:
            raise DiskFull(
                f"only {free} bytes are free in the state directory, below agent.min_free_bytes ({minimum}); "
                "free some space: deployments are accepted again as soon as there is room",
                details={"free_bytes": free, "min_free_bytes": minimum},
            )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            version = await asyncio.wait_for(self.runtime.ping(), timeout=3)
        except (AgentError, asyncio.TimeoutError) as exc:
            return False, {"reason": f"Docker engine unreachable: {getattr(exc, 'message', None) or 'timed out'}"}
        if not self._reconciled:
            return False, {"reason": "recovering the deployments of the previous run"}
        try:
            await self._raise_if_disk_low()
        except DiskFull as exc:
            return False, {"reason": exc.message}
        return True, {"docker": version, "running": len(self._running)}

    async def status_counts(self) -> dict[str, int]:
        return await self.store.status_counts()

    def running_count(self) -> int:
        return len(self._running)

    def server_names(self) -> frozenset[str]:
        return frozenset(self.config.servers)

    # --- scheduling ------------------------------------------------------------------------

    async def _schedule_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._schedule_once()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one bad pass
                logger.exception("scheduling pass failed")
                await asyncio.sleep(1)
                self._wakeup.set()

    async def _schedule_once(self) -> None:
        capacity = self.config.agent.max_concurrent - len(self._running)
        if capacity <= 0:
            return
        # An application whose oldest deployment is running or waiting blocks its later ones.
        blocked = {running.application for running in self._running.values()}
        for deployment in await self.store.with_status("queued"):
            if capacity <= 0:
                break
            if deployment.application in blocked or deployment.id in self._running:
                blocked.add(deployment.application)
                continue
            blocked.add(deployment.application)
            running = RunningDeployment(deployment.id, deployment.application)
            self._running[deployment.id] = running
            running.task = asyncio.create_task(self._run(deployment, running), name=f"deployment-{deployment.id}")
            capacity -= 1

    # --- carrying out one deployment -------------------------------------------------------

    async def _run(self, deployment: Deployment, running: RunningDeployment) -> None:
        with structlog.contextvars.bound_contextvars(deployment_id=deployment.id, application=deployment.application):
            try:
                await self._carry_out(deployment, running)
            finally:
                self._running.pop(deployment.id, None)
                running.done.set()
                self._wakeup.set()

    async def _carry_out(self, deployment: Deployment, running: RunningDeployment) -> None:
        spec = deployment.spec
        try:
            # The config in force now decides, not the one the request was accepted under.
            await asyncio.to_thread(authorize_spec, spec, self.config, None)
        except Forbidden as refusal:
            policy = LogPolicy.for_spec(spec, self.config.agent.max_log_bytes)
            with DeploymentLog(Path(deployment.log_path), policy) as refused_log:
                refused_log.agent("done", f"deployment refused by the agent's policy: {refusal.message}")
            error = {"type": refusal.error_type, "message": refusal.message}
            with contextlib.suppress(Conflict, NotFound):
                await self._set_status(deployment.id, "failed", error=error)
            return
        first = "building" if spec.build else ("deploying" if spec.run else "succeeded")
        try:
            await self._set_status(deployment.id, first, stage="source" if spec.build else ("release" if spec.run else None))
        except (Conflict, NotFound):
            # Killed or deleted between the scheduler's read and now: nothing to run.
            return
        if first == "succeeded":
            return
        log = DeploymentLog(Path(deployment.log_path), LogPolicy.for_spec(spec, self.config.agent.max_log_bytes))
        started = time.monotonic()
        outcome: str = "failed"
        pruned = False
        try:
            log.agent("queue", f"deployment {deployment.id} of {deployment.application} started")
            fields: dict[str, Any] = {"pid": None, "stage": None}
            image = deployment.release_image
            if spec.build is not None:
                running.phase = "building"
                fields, image = await self._build(deployment, running, log)
            if spec.run is not None:
                if spec.build is not None:
                    await self._set_status(deployment.id, "deploying", stage="release", pid=None)
                running.phase = "deploying"
                self._raise_if_stopped(running)
                fields = {**fields, **await self.releases.deploy(deployment, log, image)}
            if spec.run is not None:
                # Settle retention before reporting success, so a poller sees the final state.
                await self._prune_quietly(
                    deployment.application, log, newest=(deployment, fields["release_image"]),
                    server=deployment.server,
                )
                pruned = True
            outcome = "succeeded"
            log.agent("done", "deployment succeeded")
            await self._set_status(deployment.id, "succeeded", **fields)
        except asyncio.CancelledError:
            outcome = await self._end_stopped(deployment, running, log)
        except _Stopped:
            outcome = await self._end_stopped(deployment, running, log)
        except ReleaseFailed as failure:
            log.agent("done", f"deployment failed: {failure.message}")
            await self._set_status(
                deployment.id, "failed", exit_code=failure.exit_code, smoke_test=failure.smoke_test,
                error={"type": failure.error_type, "message": failure.message},
            )
        except _BuildFailed as failure:
            log.agent("done", f"deployment failed: {failure.message}")
            await self._set_status(
                deployment.id, "failed", exit_code=failure.exit_code,
                error={"type": failure.error_type, "message": failure.message},
            )
        except AgentError as exc:
            log.agent("done", f"deployment failed: {exc.message}")
            await self._set_status(deployment.id, "failed", error={"type": exc.error_type, "message": exc.message})
        except Exception as exc:  # noqa: BLE001 - any surprise still ends the deployment, never leaves it hanging
            logger.exception("deployment crashed")
            log.agent("done", f"deployment failed: internal error: {exc}")
            await self._set_status(
                deployment.id, "failed", error={"type": "internal_error", "message": f"internal error: {exc}"}
            )
        finally:
            if spec.run is not None and not pruned:
                await self._prune_quietly(deployment.application, log, server=deployment.server)
            if deployment.server != LOCAL and spec.build is not None and spec.build.runtime == "process":
                if spec.run is None or outcome != "succeeded":
                    await self._remove_remote_dir(deployment)
            log.close()
            if spec.build is not None:
                self.metrics.observe_build(time.monotonic() - started, outcome)
            await remove_workspace(self._workspace_of(deployment.id))

    async def _build(
        self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog
    ) -> tuple[dict[str, Any], str | None]:
        spec = deployment.spec
        assert spec.build is not None
        if spec.build.runtime == "process":
            return await self._build_remote_process(deployment, running, log), None
        workspace = self._workspace_of(deployment.id)
        archive: Path | None = None
        if deployment.server != LOCAL and spec.source is not None and spec.source.type == "git":
            archive = await self._clone_on_server(deployment, log)
        else:
            await prepare_workspace(spec.source, workspace, log, state_dir=self.config.agent.state_dir)
        self._raise_if_stopped(running)
        await self.store.update(deployment.id, stage="build")
        containers = await self.servers.containers(deployment.server)
        running.stop_work = lambda grace: containers.stop_deployment(deployment.id, grace)

        async def on_start(container_id: str, pid: int) -> None:
            await self.store.update(deployment.id, container_id=container_id, pid=pid or None)
            logger.info("build container started", container_id=container_id[:12], pid=pid)
            if running.stop_reason is not None:
                # Killed while the container was being created: stop it now.
                await containers.stop_deployment(deployment.id, self.config.agent.kill_grace_s)

        job = BuildJob(
            deployment_id=deployment.id,
            application=deployment.application,
            image=spec.build.image,
            command=spec.build.command,
            env=spec.build.env,
            timeout_s=spec.build.timeout_s,
            workspace=workspace,
            commit_image=f"deploy-agent/{deployment.application}:{deployment.id}" if spec.run else None,
            workspace_archive=archive,
        )
        try:
            result = await containers.run_build(job, log, on_start)
        finally:
            if archive is not None:
                await asyncio.to_thread(archive.unlink, True)
        self._raise_if_stopped(running)
        self._raise_if_build_failed(spec.build.timeout_s, result.exit_code, result.timed_out)
        if result.image is not None:
            await self.store.update(deployment.id, release_image=result.image)
        return {"exit_code": result.exit_code, "pid": None, "stage": None}, result.image

    async def _clone_on_server(self, deployment: Deployment, log: DeploymentLog) -> Path:
        """Clones a git source on the deployment's server and returns a local tar of it for the build.

        The server fetches the repository (its network, its credentials); the tar only carries the
        checkout from the server's SSH connection into a container of the server's own engine.
        """
        source = deployment.spec.source
        assert source is not None
        remote = self.servers.remote_processes(deployment.server)
        remote_dir = remote.workspace_dir(deployment.id)
        archive = self.config.workspaces_dir / f"{deployment.id}.tar"
        try:
            await remote.clone_workspace(source.url or "", source.ref, remote_dir, log)
            await remote.download_archive(remote_dir, archive)
        except BaseException:
            await asyncio.to_thread(archive.unlink, True)
            raise
        finally:
            await asyncio.shield(self._remove_remote_quietly(deployment.server, remote_dir))
        return archive

    async def _build_remote_process(
        self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog
    ) -> dict[str, Any]:
        """Runs the build as a shell command on a remote server, in the release's remote directory."""
        spec = deployment.spec
        assert spec.build is not None
        remote = self.servers.remote_processes(deployment.server)
        remote_dir = str(remote_release_dir(deployment.id))
        source = spec.source
        if source is not None and source.type == "git":
            await remote.clone_workspace(source.url or "", source.ref, remote_dir, log)
        else:
            workspace = self._workspace_of(deployment.id)
            await prepare_workspace(source, workspace, log, state_dir=self.config.agent.state_dir)
            await remote.upload_workspace(workspace, remote_dir, log)
        self._raise_if_stopped(running)
        await self.store.update(deployment.id, stage="build")

        async def on_start(pid: int, started_at: float) -> None:
            running.stop_work = lambda grace: remote.kill_group(pid, started_at, grace)
            await self.store.update(deployment.id, pid=pid, pid_started_at=started_at)
            logger.info("remote build started", server=deployment.server, pid=pid)
            if running.stop_reason is not None:
                await remote.kill_group(pid, started_at, self.config.agent.kill_grace_s)

        job = RemoteBuildJob(
            deployment_id=deployment.id,
            command=spec.build.command,
            env=spec.build.env,
            timeout_s=spec.build.timeout_s,
            remote_dir=remote_dir,
        )
        exit_code, timed_out = await remote.run_build(job, log, on_start)
        self._raise_if_stopped(running)
        self._raise_if_build_failed(spec.build.timeout_s, exit_code, timed_out)
        return {"exit_code": exit_code, "pid": None, "stage": None}

    def _raise_if_build_failed(self, timeout_s: float, exit_code: int, timed_out: bool) -> None:
        if timed_out:
            raise _BuildFailed("timeout", f"build timed out after {timeout_s:g}s and was killed", exit_code)
        if exit_code != 0:
            raise _BuildFailed("build_failed", f"build command exited with code {exit_code}", exit_code)

    async def _prune_quietly(
        self,
        application: str,
        log: DeploymentLog,
        newest: tuple[Deployment, str | None] | None = None,
        server: str = "local",
    ) -> None:
        # Retention is housekeeping: its failure must not change how the deployment ended.
        try:
            await self.releases.prune(application, log, newest=newest, server=server)
        except AgentError as exc:
            logger.warning("pruning old releases failed", application=application, error=exc.message)

    async def _end_stopped(self, deployment: Deployment, running: RunningDeployment, log: DeploymentLog) -> str:
        if running.stop_reason == "kill":
            log.agent("done", "deployment cancelled: killed on request")
            await self._set_status(
                deployment.id, "cancelled", error={"type": "cancelled", "message": "killed on request"}
            )
            return "cancelled"
        message = "the agent shut down before this deployment finished"
        log.agent("done", f"deployment failed: {message}")
        await self._set_status(deployment.id, "failed", error={"type": "agent_shutdown", "message": message})
        return "failed"

    async def _stop_running(self, running: RunningDeployment, reason: str) -> None:
        """Stops a running deployment's containers (SIGTERM, grace, SIGKILL) and waits for its worker."""
        if running.stop_reason is None:
            running.stop_reason = reason
        grace = self.config.agent.kill_grace_s
        logger.info("stopping deployment", deployment_id=running.deployment_id, reason=reason)
        if running.stop_work is not None:
            try:
                await running.stop_work(grace)
            except AgentError as exc:
                logger.warning("stopping the build's work failed", error=exc.message)
        if running.phase == "deploying" and running.task is not None and not running.done.is_set():
            # A release being checked: cancelling the work removes it and restores the previous one.
            running.task.cancel()
            await running.done.wait()
        if running.task is not None and not running.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(running.done.wait()), timeout=2)
            if not running.done.is_set():
                # Still busy outside a container (copying, cloning): cancel the work itself.
                running.task.cancel()
                await running.done.wait()

    async def _remove_remote_dir(self, deployment: Deployment) -> None:
        await self._remove_remote_quietly(deployment.server, str(remote_release_dir(deployment.id)))

    async def _remove_remote_quietly(self, server: str, remote_dir: str) -> None:
        try:
            await self.servers.remote_processes(server).remove_dir(remote_dir)
        except AgentError as exc:
            logger.warning("could not remove the remote workspace", server=server, error=exc.message)

    def _raise_if_stopped(self, running: RunningDeployment) -> None:
        if running.stop_reason is not None:
            raise _Stopped()

    async def _set_status(self, deployment_id: str, status: str, **fields: Any) -> Deployment:
        """Every status change of the engine passes here: store, metrics, daemon log."""
        deployment = await self.store.transition(deployment_id, status, **fields)
        if status in FINAL_STATUSES:
            self.metrics.count_finished(status)
        logger.info("status changed", deployment_id=deployment_id, status=status, error=fields.get("error"))
        return deployment

    def _workspace_of(self, deployment_id: str) -> Path:
        return self.config.workspaces_dir / deployment_id


class _Stopped(Exception):
    """Control flow: the deployment was asked to stop (kill or shutdown)."""


class _BuildFailed(Exception):
    def __init__(self, error_type: str, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.exit_code = exit_code


def _free_bytes(directory: Path) -> int | None:
    try:
        usage = os.statvfs(directory)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
