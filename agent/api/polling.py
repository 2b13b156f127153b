"""Cheap polling of deployments: ETag / If-None-Match / 304, and `?wait=` long polls.

A tag is known before the store is read (agent.changes): a poll whose tag still matches costs
no query and no body. It is taken before the read, so that a body is never older than its tag;
and a body read under a tag that is still current is the answer again (RenderedBodies).
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from typing import Awaitable, Callable

from aiohttp import web

from agent.api.cursor import encode_cursor
from agent.api.params import parse_list_query, parse_wait, single_values
from agent.changes import ChangeFeed
from agent.models import Deployment, DeploymentFilter

Page = tuple[list[Deployment], int | None]
# The bodies kept for unchanged answers (RenderedBodies), in all.
RENDERED_BYTES = 8 * 1024 * 1024
# Distinct list query strings kept parsed (list_query).
LIST_QUERIES_KEPT = 256
_LIST_QUERIES: OrderedDict[str, tuple[DeploymentFilter, str]] = OrderedDict()


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
    cached = cached_body(changes, f"deployment/{deployment_id}", tag)
    if cached is not None:
        return cached
    deployment = await read(deployment_id)
    response = web.json_response(deployment.to_json(), headers={"ETag": tag})
    keep_body(changes, f"deployment/{deployment_id}", tag, response)
    return response


async def answer_list(
    request: web.Request, changes: ChangeFeed, read: Callable[[DeploymentFilter], Awaitable[Page]]
) -> web.Response:
    """`GET /v1/deployments`: 304 while the client's tag is current; held up to `wait` while it is, or while
    the page is empty (a poller's `updated_since` newer than everything)."""
    query, key = list_query(request)
    wait_s = parse_wait(request.query)
    deadline = time.monotonic() + (wait_s or 0.0)
    while True:
        tag = changes.list_tag(key)
        if matches(request, tag):
            if wait_s is None or time.monotonic() >= deadline or changes.closed:
                return not_modified(tag)
            await changes.wait(deadline - time.monotonic())
            continue
        cached = cached_body(changes, f"list?{key}", tag)
        if cached is not None:
            return cached
        page, next_seq = await read(query)
        if page or wait_s is None or time.monotonic() >= deadline or changes.closed:
            break
        await changes.wait(deadline - time.monotonic())
    data = [deployment.to_json() for deployment in page]
    response = web.json_response({"data": data, "next_cursor": encode_cursor(next_seq)}, headers={"ETag": tag})
    if page:
        keep_body(changes, f"list?{key}", tag, response)
    return response


def list_query(request: web.Request) -> tuple[DeploymentFilter, str]:
    """The filter of a list request and its normalised query (without `wait`), the key of its tag.

    Parsed once per distinct query string: a control plane asks the same few queries over and
    over. Only queries that parsed are kept (a bad one raises each time).
    """
    raw = request.query_string
    known = _LIST_QUERIES.get(raw)
    if known is None:
        query = parse_list_query(request.query)
        key = "&".join(f"{name}={value}" for name, value in sorted(request.query.items()) if name != "wait")
        known = _LIST_QUERIES[raw] = (query, key)
        if len(_LIST_QUERIES) > LIST_QUERIES_KEPT:
            _LIST_QUERIES.popitem(last=False)
    return known


def cached_body(changes: ChangeFeed, key: str, tag: str) -> web.Response | None:
    """The body last rendered under `key`, while its tag is still current (nothing in it changed since)."""
    body = _rendered(changes).get(key, tag)
    if body is None:
        return None
    return web.Response(body=body, content_type="application/json", charset="utf-8", headers={"ETag": tag})


def keep_body(changes: ChangeFeed, key: str, tag: str, response: web.Response) -> None:
    if isinstance(response.body, bytes):
        _rendered(changes).keep(key, tag, response.body)


class RenderedBodies:
    """The last body of recent answers (a list query, a deployment), by the tag it was read under.

    A tag changes whenever anything in its answer would (agent.changes), so while the current
    tag is the one a body was read under, that body is the answer: a control plane polling
    without If-None-Match costs no query and no JSON. Bounded in bytes: the least recently used
    go first.
    """

    def __init__(self, max_bytes: int = RENDERED_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._bodies: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def get(self, key: str, tag: str) -> bytes | None:
        entry = self._bodies.get(key)
        if entry is None or entry[0] != tag:
            return None
        self._bodies.move_to_end(key)
        return entry[1]

    def keep(self, key: str, tag: str, body: bytes) -> None:
        if len(body) > self._max_bytes // 16:
            return  # a very large page (a high `limit`) is rendered each time
        previous = self._bodies.pop(key, None)
        if previous is not None:
            self._bytes -= len(previous[1])
        self._bodies[key] = (tag, body)
        self._bytes += len(body)
        while self._bytes > self._max_bytes:
            _, (_, dropped) = self._bodies.popitem(last=False)
            self._bytes -= len(dropped)


_RENDERED: weakref.WeakKeyDictionary[ChangeFeed, RenderedBodies] = weakref.WeakKeyDictionary()


def _rendered(changes: ChangeFeed) -> RenderedBodies:
    rendered = _RENDERED.get(changes)
    if rendered is None:
        rendered = _RENDERED[changes] = RenderedBodies()
    return rendered
