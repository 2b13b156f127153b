"""Bearer tokens: who is calling (401) and whether their token may do this (403)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Awaitable, Callable, Iterable, TypeVar

from aiohttp import web

from agent.api.context import TOKEN_NAME, TOKEN_SCOPES, engine_of
from agent.config import TokenConfig
from agent.errors import Forbidden, Unauthorized

READ_SCOPE = "deployments:read"
WRITE_SCOPE = "deployments:write"
ADMIN_SCOPE = "admin"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_H = TypeVar("_H", bound=Handler)
_SCOPE_ATTRIBUTE = "required_scope"


def requires(scope: str | None) -> Callable[[_H], _H]:
    """Marks a route handler with the scope its caller's token needs; None makes the route public."""

    def mark(handler: _H) -> _H:
        setattr(handler, _SCOPE_ATTRIBUTE, scope)
        return handler

    return mark


def required_scope(handler: Handler) -> str | None:
    """The scope a handler was marked with; an unmarked handler needs `admin`, so a forgotten mark fails closed."""
    return getattr(handler, _SCOPE_ATTRIBUTE, ADMIN_SCOPE)


def find_token(presented: str, tokens: Iterable[TokenConfig]) -> TokenConfig | None:
    """The configured token whose digest matches `presented`, in time independent of which one (or none) does."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest().encode("ascii")
    found: TokenConfig | None = None
    for candidate in tokens:
        # Compare against every digest, with no early exit, so timing tells nothing about the tokens.
        matches = hmac.compare_digest(digest, candidate.token_sha256.lower().encode("utf-8"))
        if matches and found is None:
            found = candidate
    return found


def authenticate(authorization: list[str], tokens: Iterable[TokenConfig]) -> TokenConfig:
    """The token named by the request's Authorization header(s); raises Unauthorized."""
    if not authorization:
        raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <token>'", code="missing_token")
    if len(authorization) > 1:
        raise Unauthorized("more than one Authorization header", code="malformed_token")
    scheme, _, presented = authorization[0].strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented or any(c.isspace() for c in presented):
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'", code="malformed_token")
    token = find_token(presented, tokens)
    if token is None:
        raise Unauthorized("unknown token", code="invalid_token")
    return token


def has_scope(token: TokenConfig, scope: str) -> bool:
    return ADMIN_SCOPE in token.scopes or scope in token.scopes


def authorize(token: TokenConfig, scope: str) -> None:
    """Raises Forbidden, naming the scope, when `token` does not grant it."""
    if not has_scope(token, scope):
        raise Forbidden(
            f"token {token.name!r} lacks the scope {scope!r} needed here",
            code="missing_scope",
            details={"required_scope": scope},
        )


def optional_token(request: web.Request) -> TokenConfig | None:
    """The request's token on a public route, or None: a missing or invalid token there is just anonymous."""
    try:
        token = authenticate(request.headers.getall("Authorization", []), engine_of(request).config.tokens)
    except Unauthorized:
        return None
    remember_token(request, token)
    return token


def remember_token(request: web.Request, token: TokenConfig) -> None:
    """Keeps the token's name (for logs) and scopes (for policy) on the request; never the secret."""
    request[TOKEN_NAME] = token.name
    request[TOKEN_SCOPES] = token.scopes


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticates every request except public routes, then checks the route's scope.

    A request for an unknown path or method needs a valid token too (the contract exempts
    only GET /healthz), so that an anonymous caller learns nothing about the API's shape.
    """
    match_info = request.match_info
    routing_failed = match_info.http_exception is not None
    scope = None if routing_failed else required_scope(match_info.handler)
    if not routing_failed and scope is None:
        return await handler(request)
    token = authenticate(request.headers.getall("Authorization", []), engine_of(request).config.tokens)
    remember_token(request, token)
    if scope is not None:
        authorize(token, scope)
    return await handler(request)
