"""Typed keys for what the API keeps on the application and on each request."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from agent.engine import Engine

ENGINE: web.AppKey["Engine"] = web.AppKey("engine")
# Set when the HTTP server shuts down, so that followed log streams end instead of holding it open.
CLOSING = web.AppKey("closing", asyncio.Event)
# The name (never the secret) of the token that authenticated the request, for logs.
TOKEN_NAME = web.RequestKey("token_name", str)
# The scopes of that token: what the request may ask for beyond its route's scope (host processes).
TOKEN_SCOPES = web.RequestKey("token_scopes", frozenset)
# True once a streamed response has sent its headers: an error can no longer become an envelope.
STREAMING = web.RequestKey("streaming", bool)


def engine_of(request: web.Request) -> "Engine":
    return request.app[ENGINE]
