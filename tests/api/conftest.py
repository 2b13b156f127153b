"""The API in front of a module's `engine` fixture, served by aiohttp's test server."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api.app import create_app


@pytest.fixture
async def app(engine: Any) -> web.Application:
    """The real app (routes, middlewares) around whatever fake engine the test module provides."""
    return create_app(engine)


@pytest.fixture
async def client(app: web.Application) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(app)) as test_client:
        yield test_client
