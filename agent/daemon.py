"""The daemon's lifecycle in three visible phases: startup, main loop (with reloads), shutdown.

What a reload may change lives in `agent.reload`; the state dir's privacy and the generated
token in `agent.state_dir`; the warnings about the host in `agent.startup_checks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import structlog
from aiohttp import web

from agent import __version__, systemd
from agent.api import create_app
from agent.api.server import GuardedAppRunner, bound_address
from agent.callbacks import CallbackSender
from agent.config import Config
from agent.engine import Engine
from agent.metrics import Metrics
from agent.releases import ReleaseManager
from agent.reload import reload_config, with_departed_servers
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.servers import Servers
from agent.ssh import SshConnections
from agent.startup_checks import raise_descriptor_limit, warn_about_readable_secrets
from agent.state_dir import PRIVATE_UMASK, ensure_token, make_state_dir_private
from agent.store import Store
from agent.structured_logging import set_log_level
from agent.targets.resolver import Targets

logger = structlog.get_logger("agent.daemon")

SWITCH_INTERVAL_S = 0.001
# File descriptors beyond the client connections: store, logs, Docker and SSH connections, pipes.
SPARE_DESCRIPTORS = 512
FORCED_EXIT_CODE = 130  # a second SIGINT, as a shell reports an interrupted command
# Detaching must exit within 10 s: requests in flight get this long to finish.
API_CLOSE_TIMEOUT_S = 3.0


class Daemon:
    """Makes, wires and closes the agent's parts; `handle_signals=False` lets tests embed it.

    It owns the store, the SSH connections, this host's runtimes, the targets, the release
    manager, the engine and the HTTP server: each is opened in `startup` and closed in
    `shutdown`, in the reverse order. Detaching (agent.on_stop = "detach", or a second SIGINT)
    closes only the API: the rest is left as it is and the process ends (`exit_on_detach`,
    on by default with `handle_signals`), so that no cleanup of a deployment's task stops
    the work it leaves running.
    """

    def __init__(self, config: Config, *, handle_signals: bool = True, exit_on_detach: bool | None = None) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.exit_on_detach = handle_signals if exit_on_detach is None else exit_on_detach
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.detached = False
        self.engine: Engine | None = None
        self._forced = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._store: Store | None = None
        self._callbacks: CallbackSender | None = None
        self._ssh: SshConnections | None = None
        self._containers: ContainerRuntime | None = None
        self._targets: Targets | None = None
        self._releases: ReleaseManager | None = None
        self._runner: web.AppRunner | None = None
        self._heartbeat: systemd.Heartbeat | None = None
        self._previous_umask: int | None = None
        self.bound_address: str | None = None

    async def run(self) -> int:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self._shutdown_unless_forced()
        if self.detached and self.exit_on_detach:
            exit_now(FORCED_EXIT_CODE if self.force_exit else 0)
        return 0

    async def startup(self) -> None:
        if self.handle_signals:
            # First: a SIGHUP's default action (ending the process) must not apply during startup.
            self._install_signal_handlers()
        # Log-stream threads hold the GIL in bursts; a short switch interval hands it back
        # to the event loop quickly, so the API stays responsive while builds stream.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        config = self.config
        # Before anything is created: the store, its WAL, the logs and the token file inherit it.
        self._previous_umask = os.umask(PRIVATE_UMASK)
        make_state_dir_private(config.agent.state_dir)
        warn_about_readable_secrets(config)
        raise_descriptor_limit(config.agent.max_connections + SPARE_DESCRIPTORS)
        self.config = config = ensure_token(config)
        self._store = Store(config.database_path)
        await self._store.open()
        self.engine = self._wire(config, self._store)
        # Before the engine: what reconciliation changes is reported too. The sender reads the
        # daemon's config per event, so a reload's secret applies at once.
        self._callbacks = CallbackSender(self._store, lambda: self.config.callbacks)
        self._store.on_callback_event = self._callbacks.wake
        self._callbacks.start()
        await self.engine.start()

        app = create_app(self.engine)
        self._runner = GuardedAppRunner(
            app,
            max_connections=config.agent.max_connections,
            access_log=None,
            handle_signals=False,
            # aiohttp closes a connection that is idle this long, including one that has not
            # sent a complete request head since it opened or since its last response.
            keepalive_timeout=config.agent.header_timeout_s,
        )
        await self._runner.setup()
        listen = config.agent.listen
        if listen.unix_path:
            socket_dir = Path(listen.unix_path).parent
            if not socket_dir.exists():
                socket_dir.mkdir(parents=True)
                socket_dir.chmod(0o755)  # the private umask must not lock the socket's group out
            site: web.BaseSite = web.UnixSite(self._runner, listen.unix_path)
        else:
            site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        self.bound_address = bound_address(self._runner, listen.unix_path)
        if listen.unix_path:
            os.chmod(listen.unix_path, 0o660)
        self._heartbeat = systemd.Heartbeat(self._probe, self._status)
        self._heartbeat.start()
        systemd.notify("READY=1")
        logger.info(
            "agent started", version=__version__, listen=self.bound_address, state_dir=str(config.agent.state_dir)
        )

    def _wire(self, config: Config, store: Store) -> Engine:
        """Makes the parts the engine works with; each reads the settings it needs here, once."""
        instance = instance_label(config)
        kill_grace_s = config.agent.kill_grace_s
        self._ssh = SshConnections(config.servers)
        self._containers = ContainerRuntime(
            config.docker, max_streams=config.agent.max_concurrent, kill_grace_s=kill_grace_s, instance=instance
        )
        processes = ProcessRuntime(config.run_dir, kill_grace_s=kill_grace_s)
        self._targets = Targets(config, self._ssh, self._containers, processes, instance=instance)
        self._releases = ReleaseManager(config, store, self._targets)
        servers = Servers(config, self._ssh)
        return Engine(config, store, self._targets, self._releases, servers, Metrics())

    async def main_loop(self) -> None:
        """Waits for a stop, reloading the config file on each SIGHUP meanwhile."""
        while not self.should_exit.is_set():
            waiters = [asyncio.ensure_future(self.should_exit.wait()), asyncio.ensure_future(self._reload_requested.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if self._reload_requested.is_set() and not self.should_exit.is_set():
                self._reload_requested.clear()
                await self.reload()

    async def _shutdown_unless_forced(self) -> None:
        """Runs `shutdown`; a second SIGINT meanwhile abandons it and detaches at once."""
        stopping = asyncio.ensure_future(self.shutdown())
        forced = asyncio.ensure_future(self._forced.wait())
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if stopping.done():
            stopping.result()
            return
        self.detached = True
        if self.exit_on_detach:
            flush_output()
            return  # run() ends the process, with the shutdown where it was
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)

    async def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        on_stop = self.config.agent.on_stop
        logger.info("agent stopping", on_stop=on_stop)
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        if self.engine is not None:
            self.engine.accepting = False  # POST answers 503 with Retry-After from here on
            self.engine.changes.close()  # long polls answer now rather than hold the exit
        if on_stop == "detach" and self.engine is not None:
            counts = await self.engine.detach()
            await self._close_api()
            self.detached = True
            if self.exit_on_detach:
                logger.info("agent stopped: builds and releases keep running for the next start", **counts)
                flush_output()
                return
        counts = {} if self.engine is None or self.detached else await self.engine.shutdown(self.config.agent.shutdown_grace_s)
        await self._close_parts()
        logger.info("agent stopped", **counts)

    async def _close_api(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                # Bounded: a followed log stream must not hold the exit past its 10 s.
                await asyncio.wait_for(runner.cleanup(), API_CLOSE_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("the API did not close in time", timeout_s=API_CLOSE_TIMEOUT_S)

    async def _close_parts(self) -> None:
        if self._releases is not None:
            await self._releases.close()
        await self._close_api()
        if self._targets is not None:
            await self._targets.close()
        if self._ssh is not None:
            await self._ssh.close()
        if self._containers is not None:
            await self._containers.close()
        if self._callbacks is not None:
            await self._callbacks.close()
        if self._store is not None:
            await self._store.close()
        if self._previous_umask is not None:
            os.umask(self._previous_umask)  # the daemon may be embedded (tests)

    # --- reload ----------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Reads the config file again and applies it; an invalid file changes nothing (see agent.reload)."""
        return await reload_config(self.config, self._apply)

    def _apply(self, config: Config) -> None:
        """Hands the new config to each part that reads settings while it runs."""
        previous, self.config = self.config, config
        if config.agent.log_level != previous.agent.log_level:
            set_log_level(config.agent.log_level)
        # Work in progress on a server that left the file still needs its address and keys.
        operating = with_departed_servers(config, previous)
        if self._ssh is not None:
            self._ssh.update_servers(operating.servers)
        if self._targets is not None:
            self._targets.config = operating
        if self._releases is not None:
            self._releases.config = operating
        if self.engine is not None:
            # The API (tokens, limits, servers one may deploy to) reads the engine's config per request.
            self.engine.config = self.engine.worker.config = self.engine.servers.config = config
            self.engine.wake_scheduler()  # max_concurrent may have grown

    # --- systemd ---------------------------------------------------------------------------

    async def _probe(self) -> bool:
        """The watchdog's health check: the scheduler runs and the store answers a query."""
        if self.engine is None or not self.engine.is_scheduling():
            return False
        await self.engine.status_counts()
        return True

    async def _status(self) -> str:
        assert self.engine is not None
        queued = (await self.engine.status_counts()).get("queued", 0)
        return f"{queued} queued, {self.engine.running_count()} running"

    # --- signals ---------------------------------------------------------------------------

    def request_exit(self, sig: int | None = None) -> None:
        """Signal handler body: only sets state. A second SIGINT forces an exit at once."""
        if self.should_exit.is_set() and sig == signal.SIGINT:
            self.force_exit = True
            logger.warning("second interrupt: exiting now; running builds and releases are left running")
            self._forced.set()
        self.should_exit.set()

    def request_reload(self) -> None:
        """SIGHUP's handler body: the main loop reloads the config file."""
        self._reload_requested.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)


def flush_output() -> None:
    """Flushes the log handlers and standard streams (before an exit that skips Python's own)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_now(code: int) -> NoReturn:
    """Ends the process without unwinding the event loop's tasks.

    asyncio.run would cancel every deployment's task on the way out, and their cleanup would
    remove the very build containers and releases that detaching leaves running.
    """
    flush_output()
    os._exit(code)



def instance_label(config: Config) -> str:
    """Names this agent's containers, so that agents sharing one Docker engine never touch each other's."""
    resolved = str(config.agent.state_dir.resolve())
    return hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:16]


def serve(config: Config) -> int:
    """Runs the daemon in the foreground until SIGTERM or SIGINT; returns the exit code."""
    from agent.structured_logging import configure_logging

    configure_logging(config.agent.log_level)
    try:
        return asyncio.run(Daemon(config).run())
    except OSError as exc:
        logger.error("agent could not start", error=str(exc))
        return 1
