"""The daemon's lifecycle in three visible phases: startup, main loop, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import resource
import secrets
import signal
import stat
import sys
import tomllib
from pathlib import Path

import structlog
from aiohttp import web

from agent import __version__, systemd
from agent.api import create_app
from agent.api.server import GuardedAppRunner, bound_address
from agent.config import Config, TokenConfig, hash_token
from agent.engine import Engine
from agent.metrics import Metrics
from agent.releases import ReleaseManager
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.servers import Servers
from agent.ssh import SshConnections
from agent.store import Store
from agent.targets.resolver import Targets

logger = structlog.get_logger("agent.daemon")

GENERATED_TOKEN_NAME = "local-admin"
SWITCH_INTERVAL_S = 0.001
# Whatever the agent creates under state_dir is its user's alone (directories 0700, files 0600).
PRIVATE_UMASK = 0o077
# File descriptors beyond the client connections: store, logs, Docker and SSH connections, pipes.
SPARE_DESCRIPTORS = 512


class Daemon:
    """Makes, wires and closes the agent's parts; `handle_signals=False` lets tests embed it.

    It owns the store, the SSH connections, this host's runtimes, the targets, the release
    manager, the engine and the HTTP server: each is opened in `startup` and closed in
    `shutdown`, in the reverse order.
    """

    def __init__(self, config: Config, *, handle_signals: bool = True) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.engine: Engine | None = None
        self._store: Store | None = None
        self._ssh: SshConnections | None = None
        self._containers: ContainerRuntime | None = None
        self._targets: Targets | None = None
        self._releases: ReleaseManager | None = None
        self._runner: web.AppRunner | None = None
        self._previous_umask: int | None = None
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
        # Before anything is created: the store, its WAL, the logs and the token file inherit it.
        self._previous_umask = os.umask(PRIVATE_UMASK)
        make_state_dir_private(config.agent.state_dir)
        warn_about_readable_secrets(config)
        raise_descriptor_limit(config.agent.max_connections + SPARE_DESCRIPTORS)
        self.config = config = ensure_token(config)
        self._store = Store(config.database_path)
        await self._store.open()
        self.engine = self._wire(config, self._store)
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
        if self.handle_signals:
            self._install_signal_handlers()
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
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        logger.info("agent stopping")
        counts: dict[str, int] = {}
        if self.engine is not None:
            self.engine.accepting = False
            grace = 0.0 if self.force_exit else self.config.agent.shutdown_grace_s
            counts = await self.engine.shutdown(grace)
        if self._releases is not None:
            await self._releases.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._targets is not None:
            await self._targets.close()
        if self._ssh is not None:
            await self._ssh.close()
        if self._containers is not None:
            await self._containers.close()
        if self._store is not None:
            await self._store.close()
        if self._previous_umask is not None:
            os.umask(self._previous_umask)  # the daemon may be embedded (tests)
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


def make_state_dir_private(state_dir: Path) -> None:
    """Creates `state_dir` 0700 and takes group and other bits off what an older version left in it.

    The state dir and two levels below it (logs/*.log, run/<id>, ...) are fixed; deeper entries
    are out of reach once their directories are 0700.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    for entry in _entries(state_dir):
        _make_private(entry)
        if entry.is_dir(follow_symlinks=False):
            for child in _entries(Path(entry.path)):
                _make_private(child)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _make_private(entry: os.DirEntry[str]) -> None:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode) or not mode & 0o077:
            return  # a link's mode means nothing; a socket's is the API's own choice
        os.chmod(entry.path, stat.S_IMODE(mode) & 0o700)
    except OSError as exc:
        logger.warning("cannot make a state file private", path=entry.path, error=exc.strerror or str(exc))


def warn_about_readable_secrets(config: Config) -> None:
    """Logs a warning for each file of secrets the agent reads that its group or others may read too."""
    for path in _secret_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue  # a missing identity file is reported when the server is used
        if mode & 0o077:
            logger.warning(
                "secret file readable by others", path=str(path), mode=f"{mode:04o}",
                hint=f"chmod 600 {path}",
            )


def _secret_files(config: Config) -> list[Path]:
    files: list[Path] = []
    if config.path is not None and _has_plain_tokens(config.path):
        files.append(config.path)
    for server in config.servers.values():
        if server.identity_file:
            files.append(Path(server.identity_file))
    return files


def _has_plain_tokens(path: Path) -> bool:
    """Whether the config file holds a token itself (`token =`) rather than only its digest."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    tokens = data.get("auth", {}).get("tokens", []) if isinstance(data.get("auth"), dict) else []
    return any(isinstance(entry, dict) and "token" in entry for entry in tokens if isinstance(tokens, list))


def raise_descriptor_limit(wanted: int) -> None:
    """Raises the soft limit on open files to the hard limit; warns when that is below `wanted`."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        if soft != resource.RLIM_INFINITY and target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError) as exc:
        logger.warning("cannot raise the open file limit", error=str(exc))
        return
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "open file limit is low for agent.max_connections", limit=soft, wanted=wanted,
            hint="raise LimitNOFILE (systemd) or ulimit -n, or lower agent.max_connections",
        )


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
