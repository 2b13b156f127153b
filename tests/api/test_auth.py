"""Bearer-token authentication and scopes (unit level, plus the middleware on a tiny app)."""

from __future__ import annotations

import hmac
from types import SimpleNamespace
from typing import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api import auth
from agent.api.app import error_middleware
from agent.metrics import Metrics
from agent.api.auth import (
    ADMIN_SCOPE,
    READ_SCOPE,
    WRITE_SCOPE,
    auth_middleware,
    authenticate,
    authorize,
    find_token,
    has_scope,
    optional_token,
    required_scope,
    requires,
)
from agent.api.context import ENGINE, TOKEN_NAME, TOKEN_SCOPES
from agent.config import Config, TokenConfig, hash_token
from agent.errors import Forbidden, Unauthorized

READER = TokenConfig("reader", hash_token("reader-secret-0123456789"), frozenset({READ_SCOPE}))
WRITER = TokenConfig("writer", hash_token("writer-secret-0123456789"), frozenset({WRITE_SCOPE}))
ADMIN = TokenConfig("root", hash_token("admin-secret-0123456789"), frozenset({ADMIN_SCOPE}))
TOKENS = (READER, WRITER, ADMIN)


def test_find_token_matches_by_sha256_digest() -> None:
    """A presented token matches the configured entry whose digest is its SHA-256."""
    assert find_token("writer-secret-0123456789", TOKENS) is WRITER
    assert find_token("admin-secret-0123456789", TOKENS) is ADMIN
    assert find_token("writer-secret-012345678", TOKENS) is None
    assert find_token("", TOKENS) is None
    assert find_token("anything", ()) is None


def test_find_token_accepts_uppercase_configured_digests() -> None:
    """A digest configured in upper-case hex still matches."""
    upper = TokenConfig("upper", hash_token("upper-secret-0123456789").upper(), frozenset({READ_SCOPE}))
    assert find_token("upper-secret-0123456789", (upper,)) is upper


@pytest.mark.parametrize("presented", ["reader-secret-0123456789", "admin-secret-0123456789", "unknown-token"])
def test_find_token_compares_every_digest_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    """Every configured digest goes through hmac.compare_digest, whether the first, last or none matches."""
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting_compare)
    find_token(presented, TOKENS)
    assert len(calls) == len(TOKENS)
    assert all(presented.encode() not in a + b for a, b in calls), "only digests are compared"


@pytest.mark.parametrize(
    "headers, code",
    [
        ([], "missing_token"),
        (["Bearer"], "malformed_token"),
        (["Bearer "], "malformed_token"),
        (["Basic cmVhZGVyOnNlY3JldA=="], "malformed_token"),
        (["Bearer two words"], "malformed_token"),
        (["Bearer reader-secret-0123456789", "Bearer reader-secret-0123456789"], "malformed_token"),
        (["Bearer not-configured"], "invalid_token"),
    ],
)
def test_authenticate_refuses_missing_malformed_and_unknown(headers: list[str], code: str) -> None:
    """Missing, malformed and unknown credentials are Unauthorized with a code saying which."""
    with pytest.raises(Unauthorized) as caught:
        authenticate(headers, TOKENS)
    assert caught.value.status == 401
    assert caught.value.code == code
    assert "secret" not in caught.value.message


def test_authenticate_accepts_bearer_in_any_case_and_spacing() -> None:
    """The scheme is case-insensitive and surrounding whitespace is ignored."""
    assert authenticate(["bearer reader-secret-0123456789"], TOKENS) is READER
    assert authenticate(["  BEARER   reader-secret-0123456789  "], TOKENS) is READER


def test_scopes_and_admin() -> None:
    """A token has exactly its scopes, except admin which has all of them."""
    assert has_scope(READER, READ_SCOPE) and not has_scope(READER, WRITE_SCOPE)
    assert has_scope(WRITER, WRITE_SCOPE) and not has_scope(WRITER, READ_SCOPE)
    assert all(has_scope(ADMIN, scope) for scope in (READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE))
    authorize(ADMIN, WRITE_SCOPE)
    with pytest.raises(Forbidden) as caught:
        authorize(READER, WRITE_SCOPE)
    assert caught.value.status == 403
    assert WRITE_SCOPE in caught.value.message
    assert caught.value.details == {"required_scope": WRITE_SCOPE}


def test_unmarked_handlers_need_admin() -> None:
    """A handler without @requires needs admin, so a forgotten mark fails closed."""

    async def unmarked(request: web.Request) -> web.Response:
        return web.Response()

    assert required_scope(unmarked) == ADMIN_SCOPE
    assert required_scope(requires(READ_SCOPE)(unmarked)) == READ_SCOPE
    assert required_scope(requires(None)(unmarked)) is None


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    """A tiny app with one public, one read, one write and one unmarked route behind the real middlewares."""

    @requires(None)
    async def public(request: web.Request) -> web.Response:
        return web.json_response({"token": request.get(TOKEN_NAME)})

    @requires(None)
    async def optional(request: web.Request) -> web.Response:
        token = optional_token(request)
        scopes = sorted(request.get(TOKEN_SCOPES, ()))
        return web.json_response({"token": token.name if token else None, "scopes": scopes})

    @requires(READ_SCOPE)
    async def read(request: web.Request) -> web.Response:
        return web.json_response({"token": request[TOKEN_NAME], "scopes": sorted(request[TOKEN_SCOPES])})

    @requires(WRITE_SCOPE)
    async def write(request: web.Request) -> web.Response:
        return web.json_response({"token": request[TOKEN_NAME]})

    async def unmarked(request: web.Request) -> web.Response:
        return web.json_response({"token": request[TOKEN_NAME]})

    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[ENGINE] = SimpleNamespace(config=Config(tokens=TOKENS), metrics=Metrics())  # type: ignore[assignment]
    app.router.add_get("/public", public)
    app.router.add_get("/optional", optional)
    app.router.add_get("/read", read)
    app.router.add_post("/write", write)
    app.router.add_get("/unmarked", unmarked)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_public_route_needs_no_token(client: TestClient) -> None:
    """A route marked requires(None) answers without any Authorization header."""
    response = await client.get("/public")
    assert response.status == 200
    assert await response.json() == {"token": None}


async def test_middleware_attaches_the_token_name(client: TestClient) -> None:
    """The authenticated token's name (not its secret) is on the request for handlers and logs."""
    response = await client.get("/read", headers=bearer("reader-secret-0123456789"))
    assert await response.json() == {"token": "reader", "scopes": [READ_SCOPE]}
    response = await client.post("/write", headers=bearer("admin-secret-0123456789"))
    assert await response.json() == {"token": "root"}


async def test_middleware_maps_failures_to_401_and_403(client: TestClient) -> None:
    """No token is 401 with WWW-Authenticate; a token without the scope is 403."""
    response = await client.get("/read")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert (await response.json())["error"]["type"] == "unauthorized"
    response = await client.post("/write", headers=bearer("reader-secret-0123456789"))
    assert response.status == 403
    assert (await response.json())["error"]["type"] == "forbidden"
    response = await client.get("/unmarked", headers=bearer("writer-secret-0123456789"))
    assert response.status == 403
    response = await client.get("/unmarked", headers=bearer("admin-secret-0123456789"))
    assert response.status == 200


async def test_optional_token_on_a_public_route(client: TestClient) -> None:
    """A public route may read the token: a valid one is known with its scopes, a bad or missing one is anonymous."""
    response = await client.get("/optional", headers=bearer("admin-secret-0123456789"))
    assert await response.json() == {"token": "root", "scopes": [ADMIN_SCOPE]}
    for headers in ({}, bearer("wrong-secret"), {"Authorization": "Basic eDp5"}):
        response = await client.get("/optional", headers=headers)
        assert response.status == 200
        assert await response.json() == {"token": None, "scopes": []}
