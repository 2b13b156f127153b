"""The daemon's lifecycle in three visible phases: startup, main loop, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import resource
import secrets
import signal
import stat
import sys
import tomllib
from http import HTTPStatus
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent import __version__
from agent.config import Config, TokenConfig, hash_token
from agent.engine import Engine
from agent.errors import AgentError, BadRequest, Unavailable
from agent.metrics import Metrics
from agent.runtimes.container import ContainerRuntime
from agent.store import Store
from agent import systemd

logger = structlog.get_logger("agent.daemon")

GENERATED_TOKEN_NAME = "local-admin"
SWITCH_INTERVAL_S = 0.001
# Whatever the agent creates under state_dir is its user's alone (directories 0700, files 0600).
PRIVATE_UMASK = 0o077
# File descriptors beyond the client connections: store, logs, Docker and SSH connections, pipes.
SPARE_DESCRIPTORS = 512
# A refused connection drains its input this long before it closes, at most this many at once.
REFUSAL_LINGER_S = 0.5
MAX_LINGERING_REFUSALS = 64


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


# --- the HTTP server: connection cap, protocol errors -----------------------------------------


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server caps open connections and answers protocol errors with the envelope."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the application, as AppRunner does
        return GuardedServer(server, self.max_connections)


class GuardedServer(web.Server):
    """aiohttp's low-level server with at most `max_connections` client connections open.

    At the cap a new connection closes the oldest idle one (no request in progress: a socket
    that sent nothing, or a keep-alive between requests), so idle sockets can never lock
    out a health check; only when every connection is busy is the new one refused with 503.
    """

    def __init__(self, app_server: web.Server, max_connections: int) -> None:
        # The application's handler and factory, and the handler options it was made with.
        super().__init__(
            app_server.request_handler,
            request_factory=app_server.request_factory,
            handler_cancellation=app_server.handler_cancellation,
            **app_server._kwargs,
        )
        self.max_connections = max_connections
        self._open: dict[RequestHandler, None] = {}  # oldest first
        self._busy: set[RequestHandler] = set()
        self._refused: set[RequestHandler] = set()  # answered 503, draining their input
        self.request_handler = self._track_busy(app_server.request_handler)

    def _track_busy(self, handle: Any) -> Any:
        async def handle_tracked(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            self._busy.add(protocol)
            try:
                return await handle(request)
            finally:
                self._busy.discard(protocol)

        return handle_tracked

    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._open) >= self.max_connections and not self._close_oldest_idle():
            self._refuse(handler, transport)
            return
        self._open[handler] = None
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)
        self._busy.discard(handler)
        self._refused.discard(handler)
        super().connection_lost(handler, exc)

    def _refuse(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Answers 503 and closes; the connection never counts against the cap."""
        logger.warning("connection refused: every connection is busy", max_connections=self.max_connections)
        transport.write(_REFUSED_RESPONSE)
        if len(self._refused) >= MAX_LINGERING_REFUSALS or not transport.can_write_eof():
            handler.force_close()
            return
        # Closing with the client's request unread would reset the connection and lose the 503:
        # stop parsing, send FIN, and drain the input for a moment before closing.
        handler.close()
        transport.write_eof()
        self._refused.add(handler)
        self._loop.call_later(REFUSAL_LINGER_S, handler.force_close)

    def _close_oldest_idle(self) -> bool:
        for handler in self._open:
            if handler not in self._busy:
                del self._open[handler]
                handler.force_close()
                logger.debug("closed the oldest idle connection", max_connections=self.max_connections)
                return True
        return False


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with the contract's envelope for errors it answers itself.

    These are requests the application never sees: a bad request line, an unknown method,
    an oversized header line, too many headers (aiohttp's parser answers all of them 400).
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = _protocol_error(status, exc, message)
        if status >= 500:
            logger.error("http request failed", status=status, error=error.message, exc_info=exc)
        else:
            logger.info("malformed http request", status=status, error=error.message, peer=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the response is already partly sent; no error response can follow")
        response = web.json_response(error.to_envelope(), status=error.status)
        response.force_close()
        return response


def _protocol_error(status: int, exc: BaseException | None, message: str | None) -> AgentError:
    if status == 400:
        # llhttp's reasons carry the offending bytes and a caret on further lines.
        reason = str(getattr(exc, "message", None) or message or "").strip()
        first_line = reason.splitlines()[0].rstrip(": ") if reason else "cannot parse it"
        # An oversized line is quoted back in the reason: the size is enough.
        first_line = first_line.split(": b'", 1)[0].split(': b"', 1)[0]
        return BadRequest(f"malformed HTTP request: {first_line}")
    if status == 500:
        return AgentError("internal error; the agent's log has the details")
    return _status_error(status)


def _status_error(status: int) -> AgentError:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "HTTP error"
    error = AgentError(phrase)
    error.status = status
    error.error_type = phrase.lower().replace(" ", "_").replace("-", "_")
    return error


def _refusal() -> bytes:
    envelope = Unavailable("too many open connections; retry shortly").to_envelope()
    body = json.dumps(envelope).encode("utf-8")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REFUSED_RESPONSE = _refusal()


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
