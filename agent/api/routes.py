"""Route handlers: parse the request, call the engine, serialise the answer."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from agent.api.auth import READ_SCOPE, WRITE_SCOPE, optional_token, requires
from agent.api.context import TOKEN_SCOPES, engine_of
from agent.api.intake import accept_request
from agent.api.log_stream import get_logs
from agent.api.openapi import openapi_document
from agent.api.params import idempotency_key, parse_metadata_patch, parse_replicas, read_json, refuse_body, request_hash
from agent.api.polling import answer_deployment, answer_list
from agent.api.schedule_routes import add_schedule_routes
from agent.errors import Unavailable
from agent.metrics import CONTENT_TYPE_LATEST
from agent.policy import authorize_spec

if TYPE_CHECKING:
    from agent.engine import ApplicationView

logger = structlog.get_logger("agent.api")


def add_routes(app: web.Application) -> None:
    """Registers every route of the contract. HEAD is only answered where it is useful (/healthz)."""
    router = app.router
    router.add_post("/v1/deployments", submit_deployment)
    router.add_get("/v1/deployments", list_deployments, allow_head=False)
    router.add_get("/v1/deployments/{id}", get_deployment, allow_head=False)
    router.add_delete("/v1/deployments/{id}", delete_deployment)
    router.add_patch("/v1/deployments/{id}", patch_deployment)
    router.add_get("/v1/deployments/{id}/logs", get_logs, allow_head=False)
    router.add_post("/v1/deployments/{id}/kill", kill_deployment)
    router.add_post("/v1/deployments/{id}/rollback", rollback_deployment)
    router.add_get("/v1/applications", list_applications, allow_head=False)
    router.add_get("/v1/applications/{name}", get_application, allow_head=False)
    router.add_post("/v1/applications/{name}/stop", stop_application)
    router.add_post("/v1/applications/{name}/start", start_application)
    router.add_post("/v1/applications/{name}/scale", scale_application)
    router.add_get("/v1/servers", list_servers, allow_head=False)
    router.add_get("/v1/servers/{name}", check_server, allow_head=False)
    router.add_get("/v1/openapi.json", get_openapi, allow_head=False)
    router.add_get("/healthz", healthz)
    router.add_get("/metrics", metrics, allow_head=False)
    add_schedule_routes(router)


@requires(WRITE_SCOPE)
async def submit_deployment(request: web.Request) -> web.Response:
    """201 + the new deployment; 200 + the earlier one when an Idempotency-Key repeats a request."""
    engine = engine_of(request)
    config = engine.config  # one config for the whole request, even if a reload swaps it meanwhile
    body = await read_json(request, config.agent.max_body_bytes)
    key = idempotency_key(request)
    # Policy and validation stat source paths: keep even that off the event loop.
    spec = await asyncio.to_thread(accept_request, body, config, engine.server_names(), request[TOKEN_SCOPES])
    deployment, created = await engine.submit(spec, idempotency_key=key, request_hash=request_hash(body))
    return web.json_response(
        deployment.to_json(),
        status=201 if created else 200,
        headers={"Location": f"/v1/deployments/{deployment.id}"},
    )


@requires(READ_SCOPE)
async def list_deployments(request: web.Request) -> web.Response:
    """A page of deployments, newest first, with the cursor of the next page."""
    engine = engine_of(request)
    return await answer_list(request, engine.changes, engine.list)


@requires(READ_SCOPE)
async def get_deployment(request: web.Request) -> web.Response:
    engine = engine_of(request)
    return await answer_deployment(request, engine.changes, engine.get)


@requires(WRITE_SCOPE)
async def kill_deployment(request: web.Request) -> web.Response:
    """202 + the deployment as it is after the kill (cancelled)."""
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    deployment = await engine_of(request).kill(request.match_info["id"])
    return web.json_response(deployment.to_json(), status=202)


@requires(WRITE_SCOPE)
async def rollback_deployment(request: web.Request) -> web.Response:
    """201 + a new deployment that brings back the release of {id}; 200 + the same when an Idempotency-Key repeats."""
    engine = engine_of(request)
    await refuse_body(request, engine.config.agent.max_body_bytes)
    key = idempotency_key(request)
    target = await engine.get(request.match_info["id"])
    # A rollback starts the target's release again: a host process needs the scope it needed at submit.
    authorize_spec(dataclasses.replace(target.spec, source=None, build=None), engine.config, request[TOKEN_SCOPES])
    # The key names this request: a rollback of this target (a submit's hash is of its body).
    deployment, created = await engine.rollback(
        target.id, idempotency_key=key, request_hash=request_hash({"rollback_of": target.id})
    )
    return web.json_response(
        deployment.to_json(), status=201 if created else 200, headers={"Location": f"/v1/deployments/{deployment.id}"}
    )


@requires(WRITE_SCOPE)
async def patch_deployment(request: web.Request) -> web.Response:
    """200 + the deployment with its metadata replaced; any other field is 422."""
    engine = engine_of(request)
    body = await read_json(request, engine.config.agent.max_body_bytes)
    metadata = parse_metadata_patch(body)
    return web.json_response((await engine.set_metadata(request.match_info["id"], metadata)).to_json())


@requires(READ_SCOPE)
async def list_applications(request: web.Request) -> web.Response:
    """Every application with a release: its current deployment, url, and since when."""
    applications = await engine_of(request).list_applications()
    return web.json_response({"data": [application_json(app) for app in applications]})


@requires(READ_SCOPE)
async def get_application(request: web.Request) -> web.Response:
    return web.json_response(application_json(await engine_of(request).get_application(request.match_info["name"])))


@requires(WRITE_SCOPE)
async def stop_application(request: web.Request) -> web.Response:
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    stopped = await engine_of(request).stop_application(request.match_info["name"])
    return web.json_response(application_json(stopped), status=202)


@requires(WRITE_SCOPE)
async def start_application(request: web.Request) -> web.Response:
    """202; starting a host-process release again needs what submitting it did (403 otherwise)."""
    engine = engine_of(request)
    await refuse_body(request, engine.config.agent.max_body_bytes)
    started = await engine.start_application(request.match_info["name"], scopes=request[TOKEN_SCOPES])
    return web.json_response(application_json(started), status=202)


@requires(WRITE_SCOPE)
async def scale_application(request: web.Request) -> web.Response:
    """202 + the application: `{"replicas": N}` tasks of a swarm application's service."""
    engine = engine_of(request)
    replicas = parse_replicas(await read_json(request, engine.config.agent.max_body_bytes))
    scaled = await engine.scale_application(request.match_info["name"], replicas)
    return web.json_response(application_json(scaled), status=202)


def application_json(app: ApplicationView) -> dict[str, Any]:
    """The contract's application object (with `replicas` and `nodes` for a swarm application)."""
    if app.replicas is not None:
        return {**_application_fields(app), "replicas": dict(app.replicas), "nodes": list(app.nodes or ())}
    return _application_fields(app)


def _application_fields(app: ApplicationView) -> dict[str, Any]:
    return {
        "name": app.name,
        "current_deployment_id": app.deployment_id,
        "state": app.state,
        "url": app.url,
        "since": app.since,
        "runtime": app.runtime,
        "container_id": app.container_id,
        "pid": app.pid,
        "updated_at": app.updated_at,
    }


@requires(WRITE_SCOPE)
async def delete_deployment(request: web.Request) -> web.Response:
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    await engine_of(request).delete(request.match_info["id"])
    return web.Response(status=204)


@requires(READ_SCOPE)
async def list_servers(request: web.Request) -> web.Response:
    """Remote servers with their reachability, latency and Docker version (each is probed)."""
    return web.json_response({"data": await engine_of(request).list_servers()})


@requires(READ_SCOPE)
async def check_server(request: web.Request) -> web.Response:
    return web.json_response(await engine_of(request).check_server(request.match_info["name"]))


@requires(None)
async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API; public, as it says nothing about this agent's state."""
    return web.Response(body=openapi_document(), content_type="application/json")


@requires(None)
async def healthz(request: web.Request) -> web.Response:
    """200 while the agent can serve; 503 with the reason (shutting down, Docker unreachable) otherwise.

    Anonymous callers learn only the status; a valid token of any scope also gets the details
    (Docker version, running deployments, `process_isolation`: "cgroup" or "process_group").
    """
    engine = engine_of(request)
    token = optional_token(request)
    if not engine.accepting:
        raise Unavailable("the agent is shutting down", code="shutting_down")
    try:
        ok, details = await engine.health()
    except Exception as exc:  # noqa: BLE001 - a failing probe is an unhealthy agent, not a 500
        logger.warning("health check failed", exc_info=True)
        raise Unavailable(f"health check failed: {exc}", code="health_check_failed") from None
    if not ok:
        raise Unavailable(str(details.get("reason") or "the agent cannot serve"), code="unhealthy")
    if token is None:
        return web.json_response({"status": "ok"})
    return web.json_response({**details, "status": "ok"})


@requires(READ_SCOPE)
async def metrics(request: web.Request) -> web.Response:
    engine = engine_of(request)
    counts = await engine.status_counts()
    text = engine.metrics.render(
        counts,
        queue_depth=counts.get("queued", 0),
        running=engine.running_count(),
        callback_depth=await engine.pending_callbacks(),
        servers_connected=engine.servers_connected(),
    )
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
