"""The schedules part of the OpenAPI document: `/v1/schedules` and the schedule object.

The request schemas come from the declarations that validate them (agent.schedule_specs);
a template is a deployment request without `application`.
"""

from __future__ import annotations

import copy
import json

from agent.api.openapi_parts import (
    READ,
    SCHEMAS,
    TEXT,
    TIME,
    WRITE,
    Json,
    error_responses,
    json_answer,
    json_body,
    nullable,
    object_schema,
    operation,
    parameter,
    path_parameter,
    query_parameter,
    ref,
)
from agent.api.params import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from agent.schedule_specs import schedule_patch_schema, schedule_request_schema

PARAMETERS: Json = {"ScheduleId": path_parameter("id", "A schedule id (`sch_...`).")}
_LOCATION = {"Location": {"description": "The path of the new object.", "schema": TEXT}}
_EXAMPLE = {
    "name": "nightly-report",
    "application": "reports",
    "schedule": {"type": "cron", "expression": "0 9 * * *", "timezone": "Asia/Shanghai"},
    "template": {"build": {"image": "local/busybox", "command": "echo report > /workspace/report.txt"}},
    "config": {"max_concurrent": 1, "max_retries": 2, "timeout_s": 300, "pause_after_failures": 5, "missed": "skip"},
}
_LINKS = {
    name: {"operationId": operation_id, "parameters": {"id": "$response.body#/id"}}
    for name, operation_id in (
        ("get", "getSchedule"), ("patch", "patchSchedule"), ("pause", "pauseSchedule"), ("resume", "resumeSchedule"),
        ("trigger", "triggerSchedule"), ("runs", "listScheduleRuns"), ("archive", "archiveSchedule"),
    )
}


def _template_schema(deployment_request: Json) -> Json:
    """A deployment request without `application`: what a schedule starts as each run."""
    template = copy.deepcopy(deployment_request)
    template["properties"].pop("application", None)
    template["required"] = [name for name in template.get("required", []) if name != "application"]
    if not template["required"]:
        del template["required"]
    template["title"] = "DeploymentTemplate"
    template["description"] = "The body of POST /v1/deployments without `application`."
    return template


def _lifted(schema: Json, name: str, template: Json) -> Json:
    """A request schema with its `$defs` as components and its template as DeploymentTemplate."""
    schema = copy.deepcopy(schema)
    parts = schema.pop("$defs", {})
    schema["properties"]["template"] = ref("DeploymentTemplate") if "template" in schema["properties"] else None
    if name == "SchedulePatch":
        schema["properties"]["template"] = nullable(ref("DeploymentTemplate"))
    text = json.dumps({**parts, name: schema}).replace('"#/$defs/', f'"{SCHEMAS}')
    return {**json.loads(text), "DeploymentTemplate": template}


def schemas(deployment_request: Json) -> Json:
    template = _template_schema(deployment_request)
    stats = object_schema(
        {
            "total_runs": {"type": "integer"},
            "total_failures": {"type": "integer"},
            "consecutive_failures": {"type": "integer"},
            "skipped_runs": {"type": "integer"},
            "missed_runs": {"type": "integer"},
            "last_run_at": nullable(TIME),
            "last_status": nullable(TEXT),
            "last_run_id": nullable(TEXT),
            "next_trigger_at": nullable(TIME),
        },
        ["total_runs", "total_failures", "consecutive_failures", "skipped_runs", "last_run_at", "last_status",
         "next_trigger_at"],
    )
    schedule = object_schema(
        {
            "id": {"type": "string", "pattern": "^sch_"},
            "name": TEXT,
            "application": TEXT,
            "schedule": {"type": "object"},
            "template": {"type": "object", "description": "The template as accepted, env values shown as `***`."},
            "config": {"type": "object"},
            "metadata": {"type": "object"},
            "status": {"type": "string", "enum": ["active", "paused"]},
            "paused_reason": nullable(TEXT),
            "paused_at": nullable(TIME),
            "upcoming_runs_at": {"type": "array", "items": TIME, "maxItems": 5},
            "stats": ref("ScheduleStats"),
            "created_at": TIME,
            "updated_at": TIME,
            "archived_at": nullable(TIME),
        },
        ["id", "name", "application", "schedule", "template", "config", "metadata", "status", "paused_reason",
         "upcoming_runs_at", "stats", "created_at", "updated_at", "archived_at"],
        description="A schedule; more fields may appear.",
    )
    return {
        **_lifted(schedule_request_schema(), "ScheduleRequest", template),
        **_lifted(schedule_patch_schema(), "SchedulePatch", template),
        "Schedule": schedule,
        "ScheduleStats": stats,
        "SchedulePage": object_schema(
            {"data": {"type": "array", "items": ref("Schedule")}, "next_cursor": nullable(TEXT)}, ["data", "next_cursor"]
        ),
    }


def paths(list_query: list[Json], deployment_links: Json) -> Json:
    schedule = ref("Schedule")
    created = {
        "201": {**json_answer("Created.", schedule, _LOCATION), "links": _LINKS},
        "200": json_answer("An Idempotency-Key repeated an earlier request: the object it made.", schedule, _LOCATION),
    }
    run = ref("Deployment")

    def action(verb: str, summary: str) -> Json:
        return {
            "parameters": [parameter("ScheduleId")],
            "post": operation(
                summary, WRITE, {"200": json_answer("The schedule.", schedule), **error_responses(404, 409, 413, 415)},
                operationId=f"{verb}Schedule",
            ),
        }

    return {
        "/v1/schedules": {
            "post": operation(
                "Create a schedule",
                WRITE,
                {**created, **error_responses(409, 413, 415, 422)},
                operationId="createSchedule",
                parameters=[parameter("IdempotencyKey")],
                requestBody=json_body(ref("ScheduleRequest"), example=_EXAMPLE),
            ),
            "get": operation(
                "List schedules, newest first",
                READ,
                {"200": json_answer("A page.", ref("SchedulePage")), **error_responses()},
                operationId="listSchedules",
                parameters=[
                    query_parameter("application", "Only this application's schedules.", TEXT),
                    query_parameter(
                        "status", "Only schedules in this status; `archived` lists the archived ones (left out otherwise).",
                        {"type": "string", "enum": ["active", "paused", "archived"]},
                    ),
                    query_parameter("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                                            "default": DEFAULT_LIST_LIMIT}),
                    query_parameter("cursor", "The `next_cursor` of the page before.", TEXT),
                ],
            ),
        },
        "/v1/schedules/{id}": {
            "parameters": [parameter("ScheduleId")],
            "get": operation(
                "Get a schedule", READ, {"200": json_answer("The schedule.", schedule), **error_responses(404)},
                operationId="getSchedule",
            ),
            "patch": operation(
                "Change a schedule (what the body names is replaced; config members are merged)",
                WRITE,
                {"200": json_answer("The schedule.", schedule), **error_responses(404, 409, 413, 415, 422)},
                operationId="patchSchedule",
                requestBody=json_body(ref("SchedulePatch")),
            ),
            "delete": operation(
                "Archive a schedule: no more runs; it and its runs are kept",
                WRITE,
                {"204": {"description": "Archived."}, **error_responses(404, 413, 415)},
                operationId="archiveSchedule",
            ),
        },
        "/v1/schedules/{id}/pause": action("pause", "Pause a schedule (runs in progress go on)"),
        "/v1/schedules/{id}/resume": action("resume", "Resume a paused schedule from now on"),
        "/v1/schedules/{id}/trigger": {
            "parameters": [parameter("ScheduleId")],
            "post": operation(
                "Start a run now",
                WRITE,
                {
                    "201": {**json_answer("The run's deployment.", run, _LOCATION), "links": deployment_links},
                    "200": json_answer("An Idempotency-Key repeated an earlier trigger: its run.", run, _LOCATION),
                    **error_responses(404, 409, 413, 415, 429),
                },
                operationId="triggerSchedule",
                parameters=[parameter("IdempotencyKey")],
            ),
        },
        "/v1/schedules/{id}/runs": {
            "parameters": [parameter("ScheduleId")],
            "get": operation(
                "List a schedule's runs, newest first",
                READ,
                {"200": json_answer("A page of deployments.", ref("DeploymentPage")), **error_responses(404)},
                operationId="listScheduleRuns",
                parameters=list_query,
            ),
        },
    }
