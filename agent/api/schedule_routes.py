"""Route handlers of `/v1/schedules`: parse the request, call the engine's schedules, serialise the answer."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from agent.api.auth import READ_SCOPE, WRITE_SCOPE, requires
from agent.api.context import TOKEN_SCOPES, engine_of
from agent.api.cursor import encode_cursor
from agent.api.params import (
    idempotency_key,
    parse_list_query,
    parse_schedule_query,
    read_json,
    refuse_body,
    request_hash,
)
from agent.api.intake import accept_request
from agent.config import Config
from agent.errors import BadRequest, Forbidden, ValidationFailed
from agent.schedule_models import Schedule
from agent.schedule_specs import (
    ScheduleRequest,
    parse_schedule_patch,
    parse_schedule_request,
    template_problems,
    timing_dict,
)
from agent.specs import is_application_name


def add_schedule_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/schedules", create_schedule)
    router.add_get("/v1/schedules", list_schedules, allow_head=False)
    router.add_get("/v1/schedules/{id}", get_schedule, allow_head=False)
    router.add_patch("/v1/schedules/{id}", patch_schedule)
    router.add_delete("/v1/schedules/{id}", archive_schedule)
    router.add_post("/v1/schedules/{id}/pause", pause_schedule)
    router.add_post("/v1/schedules/{id}/resume", resume_schedule)
    router.add_post("/v1/schedules/{id}/trigger", trigger_schedule)
    router.add_get("/v1/schedules/{id}/runs", list_runs, allow_head=False)


def accept_template(
    application: str, template: Any, config: Config, servers: frozenset[str], scopes: frozenset[str]
) -> dict[str, Any]:
    """The template as a validated deployment request of `application` (422 under `template.`, 403 as a submit's)."""
    if "application" in template:
        raise ValidationFailed(
            [{"field": "template.application", "message": "is not part of a template: the schedule's application is used"}]
        )
    try:
        spec = accept_request({**template, "application": application}, config, servers, scopes)
    except ValidationFailed as failure:
        raise template_problems(failure) from None
    except Forbidden as refusal:
        raise _in_template(refusal) from None
    stored = spec.to_dict()
    del stored["application"]
    return stored


def accept_schedule(
    body: Any, config: Config, servers: frozenset[str], scopes: frozenset[str]
) -> tuple[ScheduleRequest, dict[str, Any]]:
    """A create's body and its template, validated together: one 422 names every bad field of both."""
    problems: list[dict[str, Any]] = []
    parsed: ScheduleRequest | None = None
    try:
        parsed = parse_schedule_request(body)
    except ValidationFailed as failure:
        problems = list(failure.problems)
    given = body.get("template") if isinstance(body, dict) else None
    template: dict[str, Any] = {}
    if isinstance(given, dict):
        application = parsed.application if parsed is not None else body.get("application")
        try:
            # With no valid application yet, the template is checked under a stand-in name.
            template = accept_template(application if is_application_name(str(application)) else "template",
                                       given, config, servers, scopes)
        except ValidationFailed as failure:
            problems += failure.problems
    if problems or parsed is None:
        raise ValidationFailed(problems)
    return parsed, template


def _in_template(refusal: Forbidden) -> Forbidden:
    """A template's 403, its fields named under `template.` (the message names the config key to change)."""
    details = refusal.details
    if isinstance(details, list):
        details = [{**item, "field": f"template.{item['field']}"} if isinstance(item, dict) and item.get("field")
                   else item for item in details]
    return Forbidden(f"template.{refusal.message}" if refusal.message.startswith(("run.", "build.", "source."))
                     else refusal.message, code=refusal.code, details=details)


def schedule_json(request: web.Request, schedule: Schedule) -> dict[str, Any]:
    return schedule.to_json(engine_of(request).schedules.now())


@requires(WRITE_SCOPE)
async def create_schedule(request: web.Request) -> web.Response:
    """201 + the new schedule; 200 + the earlier one when an Idempotency-Key repeats a request."""
    engine = engine_of(request)
    config = engine.config
    body = await read_json(request, config.agent.max_body_bytes)
    key = idempotency_key(request)
    parsed, template = await asyncio.to_thread(
        accept_schedule, body, config, engine.server_names(), request[TOKEN_SCOPES]
    )
    schedule, created = await engine.schedules.create(
        parsed, template, idempotency_key=key, request_hash=request_hash(body)
    )
    return web.json_response(
        schedule_json(request, schedule), status=201 if created else 200,
        headers={"Location": f"/v1/schedules/{schedule.id}"},
    )


@requires(READ_SCOPE)
async def list_schedules(request: web.Request) -> web.Response:
    """A page of schedules, newest first (archived ones only with `status=archived`)."""
    page, next_seq = await engine_of(request).schedules.list(parse_schedule_query(request.query))
    return web.json_response(
        {"data": [schedule_json(request, item) for item in page], "next_cursor": encode_cursor(next_seq)}
    )


@requires(READ_SCOPE)
async def get_schedule(request: web.Request) -> web.Response:
    return web.json_response(schedule_json(request, await engine_of(request).schedules.get(request.match_info["id"])))


@requires(WRITE_SCOPE)
async def patch_schedule(request: web.Request) -> web.Response:
    """200 + the schedule with what the body names replaced (config members merged)."""
    engine = engine_of(request)
    config = engine.config
    body = await read_json(request, config.agent.max_body_bytes)
    patch = parse_schedule_patch(body)
    schedule_id = request.match_info["id"]
    template = None
    if patch.template is not None:
        current = await engine.schedules.get(schedule_id)
        template = await asyncio.to_thread(
            accept_template, current.application, patch.template, config, engine.server_names(), request[TOKEN_SCOPES]
        )
    changed = await engine.schedules.update(
        schedule_id,
        name=patch.name,
        timing=None if patch.schedule is None else timing_dict(patch.schedule),
        template=template,
        config=patch.config,
        metadata=patch.metadata,
    )
    return web.json_response(schedule_json(request, changed))


@requires(WRITE_SCOPE)
async def archive_schedule(request: web.Request) -> web.Response:
    """204: no more runs; the schedule and its runs are kept (GET shows `archived_at`)."""
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    await engine_of(request).schedules.archive(request.match_info["id"])
    return web.Response(status=204)


@requires(WRITE_SCOPE)
async def pause_schedule(request: web.Request) -> web.Response:
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    return web.json_response(schedule_json(request, await engine_of(request).schedules.pause(request.match_info["id"])))


@requires(WRITE_SCOPE)
async def resume_schedule(request: web.Request) -> web.Response:
    await refuse_body(request, engine_of(request).config.agent.max_body_bytes)
    return web.json_response(schedule_json(request, await engine_of(request).schedules.resume(request.match_info["id"])))


@requires(WRITE_SCOPE)
async def trigger_schedule(request: web.Request) -> web.Response:
    """201 + the deployment of a run started now; 200 + the same when an Idempotency-Key repeats."""
    engine = engine_of(request)
    await refuse_body(request, engine.config.agent.max_body_bytes)
    key = idempotency_key(request)
    schedule_id = request.match_info["id"]
    run, created = await engine.schedules.trigger(
        schedule_id, idempotency_key=key, request_hash=request_hash({"trigger": schedule_id})
    )
    return web.json_response(
        run.to_json(), status=201 if created else 200, headers={"Location": f"/v1/deployments/{run.id}"}
    )


@requires(READ_SCOPE)
async def list_runs(request: web.Request) -> web.Response:
    """The schedule's runs, newest first, with the filters and cursor of the deployments list."""
    if "wait" in request.query:
        raise BadRequest("wait is not taken here; long-poll GET /v1/deployments?schedule_id=... instead", code="bad_query")
    query = parse_list_query(request.query)
    page, next_seq = await engine_of(request).schedules.runs(request.match_info["id"], query)
    return web.json_response({"data": [run.to_json() for run in page], "next_cursor": encode_cursor(next_seq)})
