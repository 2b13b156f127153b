"""The engine: the durable queue, its scheduling, and the requests on deployments.

Scheduling is event-driven: a submit, a finished deployment or a kill wakes the
scheduler, which starts the oldest queued deployment of every application that
is not already running, up to `max_concurrent`. A worker (agent.worker) carries
each one out; after a restart, `reconcile` hands it back what was left running.

It runs past 400 lines because the requests, the lifecycle (start, reconcile, detach,
shutdown) and the scheduler share the one table of running deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.changes import ChangeFeed
from agent.config import Config
from agent.disk import free_bytes
from agent.errors import AgentError, Conflict, DiskFull, NotFound, Unavailable
from agent.metrics import Metrics
from agent.models import Deployment, DeploymentFilter, DeploymentSpec, new_deployment_id, utc_now
from agent.policy import authorize_spec
from agent.releases import ReleaseManager
from agent.schedules import Schedules
from agent.servers import Servers
from agent.store import Application, Store
from agent.targets.base import workspace_of
from agent.targets.resolver import Targets
from agent.worker import RunningDeployment, Worker
from agent.workspace import remove_workspace

logger = structlog.get_logger("agent.engine")
# How long reconcile waits for re-adopted builds to find their containers before it sweeps leftovers.
ADOPTION_WAIT_S = 30.0


@dataclass(frozen=True)
class ApplicationView:
    """An application as clients see it: its current release, whether it runs, where, since when."""

    name: str
    deployment_id: str
    state: str
    url: str | None
    since: str
    runtime: str | None
    container_id: str | None
    pid: int | None
    updated_at: str
    # Swarm applications: replicas desired, running and healthy, and the nodes their tasks run on.
    replicas: dict[str, int] | None = None
    nodes: tuple[str, ...] | None = None


class Engine:
    """Accepts deployments, schedules them, runs them, and stops them on request.

    Its parts are the daemon's, which makes, wires and closes them.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        targets: Targets,
        releases: ReleaseManager,
        servers: Servers,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.targets = targets
        self.releases = releases
        self.servers = servers
        self.metrics = metrics or Metrics()
        self.worker = Worker(config, store, targets, releases, self.metrics)
        self.accepting = False
        self._running: dict[str, RunningDeployment] = {}
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._reconciled = False
        # Schedules put their runs into this queue (their config is always the one in force).
        self.schedules = Schedules(store, lambda: self.config, self._new_record, self._wakeup.set)

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
        except Unavailable as exc:
            # Docker is not up yet (at boot, say): deployments are accepted and wait for it.
            logger.warning("waiting for the Docker engine before taking back the previous run's work; "
                           "deployments are accepted and wait", error=exc.message)
        except AgentError as exc:
            logger.error("reconciliation failed; retrying in the background", error=exc.message)
        self.accepting = True
        self._scheduler = asyncio.create_task(self._reconcile_then_schedule(), name="scheduler")
        self._wakeup.set()
        self.schedules.start()

    async def _reconcile_then_schedule(self) -> None:
        # Docker may be down at boot: accept (durably) and answer 503 on /healthz until it is back.
        delay = 1.0
        while not self._reconciled:
            try:
                await self.reconcile()
                self._reconciled = True
            except Unavailable as exc:
                logger.info("still waiting for the Docker engine", error=exc.message, retry_in_s=delay)
            except AgentError as exc:
                logger.error("reconciliation failed; retrying", error=exc.message, retry_in_s=delay)
            else:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        await self._schedule_forever()

    async def reconcile(self) -> None:
        """Takes back the builds a previous run left running; ends its other interrupted deployments and removes their work.

        A build whose target re-adopts builds goes on in the worker (`Worker.resume`), counted in
        `_running` like any running deployment; one that cannot be taken back is stopped and fails
        `agent_restarted`, as is a deployment left `deploying` (unless its release was already in service).
        """
        interrupted = await self.store.with_status("building", "deploying")
        # A rollout its orchestrator carries on alone (a swarm update) is watched to its end, not undone.
        rolling = {d.id for d in interrupted if d.status == "deploying" and d.release is not None
                   and self.targets.for_deployment(d).checks_health_itself}
        reconciled = await self.releases.reconcile(
            [d for d in interrupted if d.status == "deploying" and d.id not in rolling]
        )
        adopted: list[RunningDeployment] = []
        for deployment in interrupted:
            if deployment.id in self._running:
                continue  # taken back by an earlier pass that failed later
            if deployment.id in rolling or (
                deployment.status == "building" and self.targets.for_deployment(deployment).reattaches_builds
            ):
                adopted.append(self._start(deployment, resume=True))
                continue
            with structlog.contextvars.bound_contextvars(deployment_id=deployment.id):
                if deployment.id in reconciled.promoted:
                    # Already in service when the agent stopped: the release manager finished it.
                    await self.worker.set_status(deployment.id, "succeeded", **reconciled.promoted[deployment.id])
                    await remove_workspace(workspace_of(self.config, deployment.id))
                    continue
                removed = await self._stop_leftovers(deployment)
                message = (
                    f"the agent stopped while this deployment was {deployment.status}; "
                    f"its work was stopped after the restart ({removed} container(s) removed)"
                )
                with self.worker.open_log(deployment) as log:
                    log.agent("recovery", message)
                await self.worker.end(deployment.id, "failed", "agent_restarted", message)
                await remove_workspace(workspace_of(self.config, deployment.id))
        # The sweep spares the containers of builds taken back: it runs once they are found again.
        await _await_work_known(adopted)
        orphans = await self.targets.remove_leftovers(reconciled.current)
        logger.info("reconciled", interrupted=len(interrupted), readopted=len(adopted), orphan_containers=orphans)

    async def _stop_leftovers(self, deployment: Deployment) -> int:
        """Stops what an interrupted deployment left running; a remote server may be unreachable."""
        try:
            return await self.targets.for_deployment(deployment).stop_interrupted(deployment)
        except AgentError as exc:
            logger.warning("could not stop the leftovers of an interrupted deployment", error=exc.message)
            return 0

    async def detach(self) -> dict[str, int]:
        """Stops intake and scheduling, and leaves running deployments exactly as they are.

        Their builds and releases keep running and their status stays building/deploying, for
        the next start to re-adopt. Their tasks are neither cancelled nor told to stop: either
        would run their cleanup (the build container removed, the release rolled back, the
        workspace deleted). The daemon ends the process with them suspended instead, as a
        SIGKILL would; every status and log line they wrote is already on disk.
        """
        await self._stop_scheduling()
        counts = {"detached": len(self._running)}
        logger.info("engine detached", **counts)
        return counts

    def is_scheduling(self) -> bool:
        """Whether the scheduler task is alive (the systemd watchdog pings only while it is)."""
        return self._scheduler is not None and not self._scheduler.done()

    def wake_scheduler(self) -> None:
        """Runs a scheduling pass now (after a reload that may have raised max_concurrent)."""
        self._wakeup.set()

    async def _stop_scheduling(self) -> None:
        self.accepting = False
        await self.schedules.stop()
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler

    async def shutdown(self, grace_s: float) -> dict[str, int]:
        """Stops intake, lets running deployments finish within `grace_s`, stops the rest."""
        await self._stop_scheduling()
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
            await asyncio.gather(*(self.worker.stop(r, "shutdown") for r in leftovers))
        stopped = len(running) - drained
        counts = {"drained": drained, "stopped": stopped}
        logger.info("engine stopped", **counts)
        return counts

    # --- requests --------------------------------------------------------------------------

    async def submit(
        self, spec: DeploymentSpec, *, idempotency_key: str | None = None, request_hash: str = ""
    ) -> tuple[Deployment, bool]:
        """Records a deployment durably and wakes the scheduler; returns (deployment, created)."""
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new deployments", code="shutting_down")
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
            log_path=os.path.join(_resolved(self.config.logs_dir), f"{deployment_id}.log"),
            spec=spec,
            **fields,
        )

    @property
    def changes(self) -> ChangeFeed:
        """Counts every change of a deployment; long polls wait on it."""
        return self.store.changes

    async def get(self, deployment_id: str) -> Deployment:
        return await self.store.get(deployment_id)

    async def list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        """A page of deployments and the seq to continue after (None at the end)."""
        return await self.store.list(query)

    async def kill(self, deployment_id: str) -> Deployment:
        """Cancels a queued deployment, or stops a running one's containers and ends it `cancelled`."""
        deployment = await self.store.get(deployment_id)
        if deployment.is_final:
            raise Conflict(f"deployment {deployment_id} is already {deployment.status}", code="already_final")
        running = self._running.get(deployment_id)
        if running is None and deployment.status == "queued":
            try:
                return await self.worker.end(deployment_id, "cancelled", "cancelled", "killed before it started")
            except Conflict:
                # The scheduler started it in the meantime: stop it like a running one.
                running = self._running.get(deployment_id)
        if running is not None:
            await self.worker.stop(running, "kill")
            if (await self.store.get(deployment_id)).status == "queued":
                # It was waiting for disk room: nothing of it ran, and its task is gone.
                with contextlib.suppress(Conflict):
                    await self.worker.end(deployment_id, "cancelled", "cancelled", "killed before it started")
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
        await remove_workspace(workspace_of(self.config, deployment_id))
        logger.info("deployment deleted", deployment_id=deployment_id)

    async def set_metadata(self, deployment_id: str, metadata: dict[str, Any]) -> Deployment:
        """Replaces a deployment's metadata, whatever its status (a control plane's own ids)."""
        return await self.store.set_metadata(deployment_id, metadata)

    async def rollback(
        self, deployment_id: str, *, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> tuple[Deployment, bool]:
        """Queues a new deployment that brings back the release of `deployment_id` (no build); (it, created).

        With an Idempotency-Key already used for the same rollback, the earlier deployment comes
        back (created False), whatever became of the release meanwhile.
        """
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new deployments", code="shutting_down")
        await self._raise_if_disk_low()
        target = await self.store.get(deployment_id)
        if idempotency_key is not None:
            earlier = await self.store.by_idempotency_key(idempotency_key, request_hash)
            if earlier is not None:
                return earlier, False
        await self.releases.check_rollback_target(target)
        record = self._new_record(
            dataclasses.replace(target.spec, source=None, build=None),
            rollback_of=target.id,
            release_image=target.release_image,
            release_from=target.release_from or target.id,
        )
        deployment, created = await self.store.insert(
            record, idempotency_key=idempotency_key, request_hash=request_hash, max_queued=self.config.agent.max_queued
        )
        if created:
            logger.info("rollback queued", deployment_id=deployment.id, rollback_of=target.id)
            self._wakeup.set()
        return deployment, created

    async def pending_callbacks(self) -> int:
        """Status callbacks in the outbox that wait to be delivered."""
        return await self.store.pending_callbacks()

    def servers_connected(self) -> dict[str, bool]:
        return self.servers.connected()

    async def list_applications(self) -> list[ApplicationView]:
        return [await self._view(app) for app in await self.store.list_applications()]

    async def get_application(self, name: str) -> ApplicationView:
        return await self._view(await self.store.get_application(name))

    async def stop_application(self, name: str) -> ApplicationView:
        return await self._view(await self.releases.stop_application(name))

    async def start_application(self, name: str, scopes: frozenset[str] | None = None) -> ApplicationView:
        """Brings the current release back; a host-process one needs what submitting it did (403)."""
        current = await self.store.get((await self.store.get_application(name)).deployment_id)
        runtime_only = dataclasses.replace(current.spec, source=None, build=None)
        await asyncio.to_thread(authorize_spec, runtime_only, self.config, scopes)
        return await self._view(await self.releases.start_application(name))

    async def scale_application(self, name: str, replicas: int) -> ApplicationView:
        """Changes how many tasks a swarm application's service runs (409 for other applications)."""
        app = await self.store.get_application(name)
        current = await self.store.get(app.deployment_id)
        if current.spec.run is None or current.spec.run.runtime != "swarm":
            raise Conflict(f"application {name} is not a swarm application: only a service has replicas",
                           code="not_swarm")
        await self.targets.swarm().scale(name, replicas)
        logger.info("application scaled", application=name, replicas=replicas)
        return await self._view(app)

    async def _view(self, app: Application) -> ApplicationView:
        deployment = await self.store.get(app.deployment_id)
        running = app.state == "running"
        if deployment.spec.run is not None and deployment.spec.run.runtime == "swarm":
            service = await self.targets.swarm().service(app.name)
            return ApplicationView(
                name=app.name, deployment_id=app.deployment_id, state=app.state,
                url=deployment.url if running else None, since=app.since, runtime="swarm", container_id=None,
                pid=None, updated_at=app.updated_at,
                replicas={"desired": service.desired, "running": service.running, "healthy": service.running},
                nodes=service.nodes,
            )
        return ApplicationView(
            name=app.name,
            deployment_id=app.deployment_id,
            state=app.state,
            url=deployment.url if running else None,
            since=app.since,
            runtime=deployment.spec.run.runtime if deployment.spec.run else None,
            container_id=deployment.container_id,
            pid=deployment.pid if running else None,
            updated_at=app.updated_at,
        )

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
        free = await asyncio.to_thread(free_bytes, self.config.agent.state_dir)
        if free is not None and free < minimum:
            raise DiskFull(
                f"only {free} bytes are free in the state directory, below agent.min_free_bytes ({minimum}); "
                "free some space: deployments are accepted again as soon as there is room",
                details={"free_bytes": free, "min_free_bytes": minimum},
            )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            version = await asyncio.wait_for(self.targets.ping(), timeout=3)
        except (AgentError, asyncio.TimeoutError) as exc:
            return False, {"reason": f"Docker engine unreachable: {getattr(exc, 'message', None) or 'timed out'}"}
        if not self._reconciled:
            return False, {"reason": "recovering the deployments of the previous run"}
        try:
            await self._raise_if_disk_low()
        except DiskFull as exc:
            return False, {"reason": exc.message}
        kept = self.store.pending_statuses()
        if kept:
            # Even with min_free_bytes = 0: the store cannot write, whatever the free space says.
            return False, {"reason": f"the disk is full: {len(kept)} final status(es) wait to be written"}
        # Shown to token holders only: how host-process releases are kept together (and killed).
        isolation = await self.targets.process_isolation()
        return True, {"docker": version, "running": len(self._running), "process_isolation": isolation}

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
        # An application whose oldest deployment is running or waiting blocks its later ones:
        # only the heads of the others are candidates, read a page at a time.
        blocked = {running.application for running in self._running.values()}
        after_seq, page = 0, capacity + 16
        while capacity > 0:
            heads = await self.store.queue_heads(frozenset(blocked), after_seq, page)
            for deployment in heads:
                if capacity <= 0:
                    break
                blocked.add(deployment.application)
                if deployment.id in self._running:
                    continue  # waiting for disk room: still queued, already ours
                if not await self.targets.ready(deployment, on_ready=self._wakeup.set):
                    continue  # its Docker engine is unreachable: it waits, and the gate wakes us when it is back
                self._start(deployment)
                capacity -= 1
            if len(heads) < page:
                break
            after_seq = heads[-1].seq

    def _start(self, deployment: Deployment, *, resume: bool = False) -> RunningDeployment:
        """Runs the deployment (`resume`: its interrupted build taken back) as a task counted in `_running`.

        A re-adopted deployment counts against max_concurrent and blocks its application's
        queue like any other running one.
        """
        running = RunningDeployment(deployment.id, deployment.application)
        self._running[deployment.id] = running
        running.task = asyncio.create_task(self._run(deployment, running, resume), name=f"deployment-{deployment.id}")
        return running

    async def _run(self, deployment: Deployment, running: RunningDeployment, resume: bool = False) -> None:
        with structlog.contextvars.bound_contextvars(deployment_id=deployment.id, application=deployment.application):
            try:
                if resume:
                    await self.worker.resume(deployment, running)
                else:
                    await self.worker.carry_out(deployment, running)
            finally:
                self._running.pop(deployment.id, None)
                running.done.set()
                self._wakeup.set()

async def _await_work_known(adopted: list[RunningDeployment]) -> None:
    """Waits until each re-adopted deployment has found its build's work again or ended (at most ADOPTION_WAIT_S)."""

    async def one(running: RunningDeployment) -> None:
        waiters = {asyncio.ensure_future(running.work_known.wait()), asyncio.ensure_future(running.done.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    if adopted:
        await asyncio.wait([asyncio.ensure_future(one(running)) for running in adopted], timeout=ADOPTION_WAIT_S)


@functools.lru_cache(maxsize=8)
def _resolved(directory: Path) -> str:
    """The logs directory with its symlinks resolved, once: resolving costs a syscall per path component."""
    return str(directory.resolve())


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
