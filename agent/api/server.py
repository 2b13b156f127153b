"""The HTTP server around the API: a cap on open connections, and the envelope for protocol errors.

aiohttp's own server answers requests the application never sees (a malformed request
line, too many headers); here those get the contract's error envelope too, and a
connection beyond `agent.max_connections` closes an idle one or is refused with 503.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent.errors import AgentError, BadRequest, HttpStatusError, Unavailable

logger = structlog.get_logger("agent.daemon")

# A refused connection drains its input this long before it closes, at most this many at once.
REFUSAL_LINGER_S = 0.5
MAX_LINGERING_REFUSALS = 64


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
    return HttpStatusError(status)


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


def bound_address(runner: web.AppRunner, unix_path: str | None) -> str:
    if unix_path:
        return f"unix:{unix_path}"
    for server in runner.sites:
        sockets = getattr(getattr(server, "_server", None), "sockets", None) or []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return ""
