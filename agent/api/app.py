"""The aiohttp application: routes, auth, and the one error envelope every failure answers with."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from agent.api.auth import Handler, auth_middleware
from agent.api.context import CLOSING, ENGINE, STREAMING, TOKEN_NAME, engine_of
from agent.api.params import too_large_message
from agent.api.routes import add_routes
from agent.errors import AgentError, DiskFull, HttpStatusError, MethodNotAllowed, NotFound, PayloadTooLarge

if TYPE_CHECKING:
    from agent.engine import Engine

logger = structlog.get_logger("agent.api")
_STDLIB_LOGGER = logging.getLogger("agent.api")
RETRY_AFTER_S = 5


def create_app(engine: "Engine") -> web.Application:
    """The API in front of `engine`; the caller runs it (AppRunner) and owns its lifecycle."""
    app = web.Application(
        client_max_size=engine.config.agent.max_body_bytes,
        middlewares=[error_middleware, auth_middleware],
    )
    app[ENGINE] = engine
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_end_streams)
    add_routes(app)
    return app


async def _end_streams(app: web.Application) -> None:
    app[CLOSING].set()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure into the contract's envelope and logs each request once."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or request.get(STREAMING):
            raise
        response = error_response(_from_http_exception(request, exc), headers=_kept_headers(exc))
    except Exception as exc:
        if request.get(STREAMING):
            # Headers and part of the body are out: aiohttp can only cut the connection now.
            logger.exception("stream failed", method=request.method, path=request.path)
            raise
        if isinstance(exc, AgentError):
            if exc.status == 500:
                # An agent error without a client-facing status (e.g. RuntimeFailure): a server fault.
                logger.error("request failed", method=request.method, path=request.path, exc_info=True)
            response = error_response(exc)
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk is the operator's to fix, not a server fault: 503 with Retry-After.
            logger.warning("request failed: the disk is full", method=request.method, path=request.path, error=str(exc))
            response = error_response(DiskFull(f"the disk of the state directory is full ({exc.strerror})"))
        else:
            logger.exception(
                "unhandled error", method=request.method, path=request.path, token=request.get(TOKEN_NAME)
            )
            response = error_response(AgentError("internal error; the agent's log has the details"))
    _log_request(request, response.status, started)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"  # any path: a label per path would grow
    engine_of(request).metrics.observe_request(route, request.method, response.status, time.monotonic() - started)
    return response


def error_response(error: AgentError, headers: dict[str, str] | None = None) -> web.Response:
    """The envelope of `error` as a JSON response with its status."""
    headers = dict(headers or {})
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if error.status in (429, 503):
        # Pollers back off by it instead of hammering an agent that cannot take work now.
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return web.json_response(error.to_envelope(), status=error.status, headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> AgentError:
    """The AgentError for a routing or protocol failure that aiohttp raised itself."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"no such path: {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"method {request.method} is not allowed on {request.path}; allowed: {allowed}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(too_large_message(engine_of(request).config.agent.max_body_bytes))
    return HttpStatusError(exc.status, exc.reason or None)


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {name: exc.headers[name] for name in ("Allow", "Retry-After") if name in exc.headers}


def _log_request(request: web.Request, status: int, started: float) -> None:
    # Reads are frequent (pollers, followers): debug; writes and failures: info.
    if request.method in ("GET", "HEAD") and status < 400:
        if not _STDLIB_LOGGER.isEnabledFor(logging.DEBUG):
            return  # structlog would build the event and bind a logger only for its level filter to drop it
        log = logger.debug
    else:
        log = logger.info
    log(
        "http request",
        method=request.method,
        path=request.path,
        status=status,
        token=request.get(TOKEN_NAME),
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
