"""The daemon's lifecycle in three visible phases: startup, main loop, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import secrets
import signal
import sys
from pathlib import Path

import structlog
from aiohttp import web

from agent import __version__
from agent.config import Config, TokenConfig, hash_token
from agent.engine import Engine
from agent.metrics import Metrics
from agent.runtimes.container import ContainerRuntime
from agent.store import Store
from agent import systemd

logger = structlog.get_logger("agent.daemon")

GENERATED_TOKEN_NAME = "local-admin"
SWITCH_INTERVAL_S = 0.001


class Daemon:
    """Owns the store, runtime, engine and HTTP server; `handle_signals=False` lets tests embed it."""

    def __init__(self, config: Config, *, handle_signals: bool = True) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.engine: Engine | None = None
        self._store: Store | None = None
        self._runtime: ContainerRuntime | None = None
        self._runner: web.AppRunner | None = None
        self.bound_address: str | None = None

    async def run(self) -> int:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    async def startup(self) -> None:
        # Log-stream threads hold the GIL in bursts; a short switch interval hands it back
        # to the event loop quickly, so the API stays responsive while builds stream.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        config = self.config
        config.agent.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = config = ensure_token(config)
        self._store = Store(config.database_path)
        await self._store.open()
        self._runtime = ContainerRuntime(
            config.docker,
            max_streams=config.agent.max_concurrent,
            kill_grace_s=config.agent.kill_grace_s,
            instance=instance_label(config),
        )
        self.engine = Engine(config, self._store, self._runtime, Metrics(), instance=instance_label(config))
        await self.engine.start()

        from agent.api.app import create_app  # the api depends on the engine, never the other way

        app = create_app(self.engine)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        listen = config.agent.listen
        if listen.unix_path:
            Path(listen.unix_path).parent.mkdir(parents=True, exist_ok=True)
            site: web.BaseSite = web.UnixSite(self._runner, listen.unix_path)
        else:
            site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        self.bound_address = _bound_address(self._runner, listen.unix_path)
        if listen.unix_path:
            os.chmod(listen.unix_path, 0o660)
        if self.handle_signals:
            self._install_signal_handlers()
        systemd.notify("READY=1")
        logger.info(
            "agent started", version=__version__, listen=self.bound_address, state_dir=str(config.agent.state_dir)
        )

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        logger.info("agent stopping")
        counts: dict[str, int] = {}
        if self.engine is not None:
            self.engine.accepting = False
            grace = 0.0 if self.force_exit else self.config.agent.shutdown_grace_s
            counts = await self.engine.shutdown(grace)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.engine is not None:
            await self.engine.servers.close()
        if self._runtime is not None:
            await self._runtime.close()
        if self._store is not None:
            await self._store.close()
        logger.info("agent stopped", **counts)

    def request_exit(self, sig: int | None = None) -> None:
        """Signal handler body: only sets state. A second SIGINT forces a fast exit."""
        if self.should_exit.is_set() and sig == signal.SIGINT:
            self.force_exit = True
            logger.warning("second interrupt: stopping running deployments now")
            if self.engine is not None:
                asyncio.ensure_future(self.engine.shutdown(0))
        self.should_exit.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_exit, sig)


def ensure_token(config: Config) -> Config:
    """With no configured token, uses (or creates) a random admin token in <state_dir>/token."""
    if config.tokens:
        return config
    path = config.agent.state_dir / "token"
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        created = False
    else:
        token = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        created = True
    os.chmod(path, 0o600)
    logger.info("no token configured: using a generated admin token", token_file=str(path.resolve()), created=created)
    generated = TokenConfig(name=GENERATED_TOKEN_NAME, token_sha256=hash_token(token), scopes=frozenset({"admin"}))
    return dataclasses.replace(config, tokens=(generated,))


def instance_label(config: Config) -> str:
    """Names this agent's containers, so that agents sharing one Docker engine never touch each other's."""
    resolved = str(config.agent.state_dir.resolve())
    return hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:16]


def _bound_address(runner: web.AppRunner, unix_path: str | None) -> str:
    if unix_path:
        return f"unix:{unix_path}"
    for server in runner.sites:
        sockets = getattr(getattr(server, "_server", None), "sockets", None) or []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return ""


def serve(config: Config) -> int:
    """Runs the daemon in the foreground until SIGTERM or SIGINT; returns the exit code."""
    from agent.structured_logging import configure_logging

    configure_logging(config.agent.log_level)
    try:
        return asyncio.run(Daemon(config).run())
    except OSError as exc:
        logger.error("agent could not start", error=str(exc))
        return 1
