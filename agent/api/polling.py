"""Cheap polling of deployments: ETag / If-None-Match / 304, and `?wait=` long polls.

A tag is known before the store is read (agent.changes): a poll whose tag still matches costs
no query and no body. It is taken before the read, so that a body is never older than its tag.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from aiohttp import web

from agent.api.cursor import encode_cursor
from agent.api.params import parse_list_query, parse_wait, single_values
from agent.changes import ChangeFeed
from agent.models import Deployment, DeploymentFilter

Page = tuple[list[Deployment], int | None]


def matches(request: web.Request, tag: str) -> bool:
    """Whether If-None-Match names `tag` (or is `*`); weak tags compare as their strong selves."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    given = {item.strip().removeprefix("W/") for item in header.split(",")}
    return "*" in given or tag in given


def not_modified(tag: str) -> web.Response:
    return web.Response(status=304, headers={"ETag": tag})


async def answer_deployment(
    request: web.Request, changes: ChangeFeed, read: Callable[[str], Awaitable[Deployment]]
) -> web.Response:
    """`GET /v1/deployments/{id}`: 304 while the client's tag is current, held up to `wait` for a change."""
    wait_s = parse_wait(request.query)
    single_values(request.query, ("wait",))
    deployment_id = request.match_info["id"]
    tag = changes.deployment_tag(deployment_id)
    if wait_s is not None and matches(request, tag):
        await changes.wait(wait_s, deployment_id)
        tag = changes.deployment_tag(deployment_id)
    if matches(request, tag):
        return not_modified(tag)
    deployment = await read(deployment_id)
    return web.json_response(deployment.to_json(), headers={"ETag": tag})


async def answer_list(
    request: web.Request, changes: ChangeFeed, read: Callable[[DeploymentFilter], Awaitable[Page]]
) -> web.Response:
    """`GET /v1/deployments`: 304 while the client's tag is current; held up to `wait` while it is, or while
    the page is empty (a poller's `updated_since` newer than everything)."""
    query = parse_list_query(request.query)
    wait_s = parse_wait(request.query)
    key = "&".join(f"{name}={value}" for name, value in sorted(request.query.items()) if name != "wait")
    deadline = time.monotonic() + (wait_s or 0.0)
    while True:
        tag = changes.list_tag(key)
        if matches(request, tag):
            if wait_s is None or time.monotonic() >= deadline or changes.closed:
                return not_modified(tag)
            await changes.wait(deadline - time.monotonic())
            continue
        page, next_seq = await read(query)
        if page or wait_s is None or time.monotonic() >= deadline or changes.closed:
            break
        await changes.wait(deadline - time.monotonic())
    data = [deployment.to_json() for deployment in page]
    return web.json_response({"data": data, "next_cursor": encode_cursor(next_seq)}, headers={"ETag": tag})
