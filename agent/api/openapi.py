"""`GET /v1/openapi.json`: the API described as OpenAPI 3.1.

The deployment request's schema is not written here: it comes from the declaration that
validates requests (agent.deployment_request), so the document cannot drift from what the
agent accepts. Responses are described here, next to the list of routes they belong to;
tests/api/test_openapi.py checks that every route the app serves is in the document.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any, get_args

from agent import __version__
from agent.api.openapi_parts import (
    ETAG,
    INTEGER,
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
from agent.api import openapi_schedules
from agent.api.params import DEFAULT_LIST_LIMIT, MAX_IDEMPOTENCY_KEY_LENGTH, MAX_LIST_LIMIT, MAX_WAIT_S
from agent.deployment_request import deployment_request_schema
from agent.errors import ErrorType
from agent.models import STATUSES

# Where a new deployment's id leads (OpenAPI links: clients and fuzzers can follow them).
_DEPLOYMENT_LINKS = {
    name: {"operationId": operation_id, "parameters": {"id": "$response.body#/id"}}
    for name, operation_id in (
        ("get", "getDeployment"),
        ("logs", "getDeploymentLogs"),
        ("kill", "killDeployment"),
        ("rollback", "rollbackDeployment"),
        ("patch", "patchDeployment"),
        ("delete", "deleteDeployment"),
    )
}
_EXAMPLE_REQUEST = {
    "application": "web",
    "build": {"image": "local/busybox", "command": ["sh", "-c", "echo building > /workspace/index.html"]},
    "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080},
    "health_check": {"type": "http", "path": "/"},
    "metadata": {"commit": "abc123"},
}
_LOCATION = {"Location": {"description": "The path of the deployment.", "schema": TEXT}}
_NOT_MODIFIED = {"description": "The client's If-None-Match tag is current: no body.", "headers": ETAG}

_PARAMETERS: Json = {
    "DeploymentId": path_parameter("id", "A deployment id (`dep_...`)."),
    "ApplicationName": path_parameter("name", "An application name."),
    "ServerName": path_parameter("name", "A server name from `[servers.*]`."),
    "Wait": query_parameter(
        "wait",
        "Long poll: where the answer would be a 304 or an empty `data`, hold the request up to this many "
        "seconds until that changes.",
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S},
    ),
    "IfNoneMatch": {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "An ETag from an earlier answer: 304 while it is still current.",
        "schema": TEXT,
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Repeating a request with the same key and body answers 200 with the same object; "
        "the same key with another request is 409.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH, "pattern": "^[ -~]+$"},
    },
}


_LIST_QUERY = [
    query_parameter("application", "Only this application's deployments.", TEXT),
    query_parameter("server", "Only deployments on this server.", TEXT),
    query_parameter("status", "Only deployments in this status.", {"type": "string", "enum": list(STATUSES)}),
    query_parameter("updated_since", "Only deployments updated at or after this RFC 3339 time.", TIME),
    query_parameter("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": DEFAULT_LIST_LIMIT}),
    query_parameter("cursor", "The `next_cursor` of the page before.", TEXT),
    query_parameter("schedule_id", "Only the runs of this schedule.", TEXT),
    {
        "name": "metadata",
        "in": "query",
        "required": False,
        "description": "`metadata.KEY=VALUE` (repeatable): only deployments whose metadata has these string values.",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "style": "form",
        "explode": True,
    },
]
_LOG_QUERY = [
    query_parameter("follow", "Keep the response open and stream new lines until the deployment is final.", {"type": "boolean"}),
    query_parameter("tail", "Only the last N lines.", {"type": "integer", "minimum": 0}),
    query_parameter("offset", "From this byte on (not with `tail`).", {"type": "integer", "minimum": 0}),
]

# --- schemas -------------------------------------------------------------------------------


def _response_schemas() -> Json:
    deployment = object_schema(
        {
            "id": {"type": "string", "pattern": "^dep_"},
            "application": TEXT,
            "server": TEXT,
            "status": {"type": "string", "enum": list(STATUSES)},
            "created_at": TIME,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
            "updated_at": TIME,
            "pid": nullable(INTEGER),
            "container_id": nullable(TEXT),
            "log_path": TEXT,
            "exit_code": nullable(INTEGER),
            "url": nullable(TEXT),
            "smoke_test": nullable(ref("SmokeTest")),
            "rollback_of": nullable(TEXT),
            "schedule_id": nullable(TEXT),
            "retry_of": nullable(TEXT),
            "schedule_run": nullable(object_schema({
                "reason": {"type": "string", "enum": ["schedule", "missed", "manual", "retry"]},
                "attempt": INTEGER,
                "scheduled_for": nullable(TIME),
                "timeout_s": nullable({"type": "number"}),
            })),
            "error": nullable(object_schema({"type": ref("ErrorType"), "message": TEXT}, ["type", "message"])),
            "metadata": {"type": "object"},
            "stage": nullable(TEXT),
            "callbacks": nullable(ref("CallbackDelivery")),
            "spec": {"type": "object", "description": "The request as accepted, env values shown as `***`."},
        },
        ["id", "application", "server", "status", "created_at", "started_at", "finished_at", "updated_at", "pid",
         "container_id", "log_path", "exit_code", "url", "smoke_test", "rollback_of", "error", "metadata"],
        description="A deployment; more fields may appear.",
    )
    application = object_schema(
        {
            "name": TEXT,
            "current_deployment_id": nullable(TEXT),
            "state": {"type": "string", "enum": ["running", "stopped"]},
            "url": nullable(TEXT),
            "since": nullable(TIME),
            "runtime": nullable(TEXT),
            "container_id": nullable(TEXT),
            "pid": nullable(INTEGER),
            "updated_at": nullable(TIME),
            "replicas": object_schema(
                {"desired": INTEGER, "running": INTEGER, "healthy": INTEGER}, ["desired", "running", "healthy"],
                description="Swarm applications only.",
            ),
            "nodes": {"type": "array", "items": TEXT, "description": "Swarm applications only: where its tasks run."},
        },
        ["name", "current_deployment_id", "state", "url", "since"],
    )
    server = object_schema(
        {
            "name": TEXT,
            "host": TEXT,
            "port": INTEGER,
            "reachable": {"type": "boolean"},
            "latency_ms": nullable({"type": "number"}),
            "docker_version": nullable(TEXT),
            "error": nullable(TEXT),
        },
        ["name", "host", "reachable"],
    )
    return {
        "Deployment": deployment,
        "DeploymentPage": object_schema(
            {"data": {"type": "array", "items": ref("Deployment")}, "next_cursor": nullable(TEXT)},
            ["data", "next_cursor"],
        ),
        "MetadataPatch": object_schema({"metadata": {"type": "object"}}, ["metadata"], extra=False),
        "SmokeTest": object_schema(
            {
                "passed": {"type": "boolean"},
                "url": nullable(TEXT),
                "errors": {"type": "array", "items": TEXT},
                "duration_ms": INTEGER,
                "tested_at": TIME,
            },
            ["passed", "errors"],
        ),
        "CallbackDelivery": object_schema(
            {
                "state": {"type": "string", "enum": ["delivered", "pending", "failing", "failed"]},
                "delivered": INTEGER,
                "pending": INTEGER,
                "failed": INTEGER,
                "attempts": INTEGER,
                "last_error": nullable(TEXT),
                "last_attempt_at": nullable(TIME),
            },
            ["state"],
        ),
        "Application": application,
        "ApplicationList": object_schema({"data": {"type": "array", "items": ref("Application")}}, ["data"]),
        "Server": server,
        "ServerList": object_schema({"data": {"type": "array", "items": ref("Server")}}, ["data"]),
        "Health": object_schema({"status": {"type": "string", "const": "ok"}}, ["status"]),
        "ErrorType": {"type": "string", "enum": list(get_args(ErrorType))},
        "Error": object_schema(
            {
                "success": {"type": "boolean", "const": False},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "error": object_schema(
                    {
                        "type": ref("ErrorType"),
                        "message": TEXT,
                        "code": nullable(TEXT),
                        "details": {"description": "null, an object, or (422) a list of `{field, message}`."},
                    },
                    ["type", "message", "code", "details"],
                    extra=False,
                ),
            },
            ["success", "status", "error"],
            extra=False,
            description="Every error, 400 to 503; see docs/api.md for each type and code.",
        ),
    }


def _request_schemas() -> Json:
    """The deployment request and its parts, from the validating declaration."""
    schema = copy.deepcopy(deployment_request_schema())
    parts = schema.pop("$defs", {})
    text = json.dumps({**parts, "DeploymentRequest": schema}).replace('"#/$defs/', f'"{SCHEMAS}')
    return json.loads(text)


# --- paths ---------------------------------------------------------------------------------



def _paths() -> Json:
    deployment = ref("Deployment")
    application = ref("Application")
    created = {
        "201": {**json_answer("Created.", deployment, _LOCATION), "links": _DEPLOYMENT_LINKS},
        "200": json_answer("An Idempotency-Key repeated an earlier request: the object it made.", deployment, _LOCATION),
    }
    return {
        "/v1/deployments": {
            "post": operation(
                "Submit a deployment",
                WRITE,
                {**created, **error_responses(409, 413, 415, 422, 429)},
                operationId="submitDeployment",
                parameters=[parameter("IdempotencyKey")],
                requestBody=json_body(ref("DeploymentRequest"), example=_EXAMPLE_REQUEST),
            ),
            "get": operation(
                "List deployments, newest first",
                READ,
                {"200": json_answer("A page.", ref("DeploymentPage"), ETAG), "304": _NOT_MODIFIED, **error_responses()},
                operationId="listDeployments",
                parameters=[*_LIST_QUERY, parameter("Wait"), parameter("IfNoneMatch")],
            ),
        },
        "/v1/deployments/{id}": {
            "parameters": [parameter("DeploymentId")],
            "get": operation(
                "Get a deployment",
                READ,
                {"200": json_answer("The deployment.", deployment, ETAG), "304": _NOT_MODIFIED, **error_responses(404)},
                operationId="getDeployment",
                parameters=[parameter("Wait"), parameter("IfNoneMatch")],
            ),
            "patch": operation(
                "Replace a deployment's metadata",
                WRITE,
                {"200": json_answer("The deployment.", deployment), **error_responses(404, 413, 415, 422)},
                operationId="patchDeployment",
                requestBody=json_body(ref("MetadataPatch")),
            ),
            "delete": operation(
                "Delete a final deployment's record and log",
                WRITE,
                {"204": {"description": "Deleted."}, **error_responses(404, 409, 413, 415)},
                operationId="deleteDeployment",
            ),
        },
        "/v1/deployments/{id}/logs": {
            "parameters": [parameter("DeploymentId")],
            "get": operation(
                "Read or follow a deployment's log",
                READ,
                {
                    "200": {
                        "description": "The log as text; with `follow`, streamed until the deployment is final.",
                        "headers": {"X-Log-Offset": {"description": "The byte offset to resume from.", "schema": INTEGER}},
                        "content": {"text/plain": {"schema": TEXT}},
                    },
                    **error_responses(404, 429),
                },
                operationId="getDeploymentLogs",
                parameters=_LOG_QUERY,
            ),
        },
        "/v1/deployments/{id}/kill": {
            "parameters": [parameter("DeploymentId")],
            "post": operation(
                "Kill a deployment (it ends cancelled)",
                WRITE,
                {"202": json_answer("The deployment after the kill.", deployment), **error_responses(404, 409, 413, 415)},
                operationId="killDeployment",
            ),
        },
        "/v1/deployments/{id}/rollback": {
            "parameters": [parameter("DeploymentId")],
            "post": operation(
                "Bring back the release of an earlier deployment",
                WRITE,
                {**created, **error_responses(404, 409, 413, 415, 429)},
                operationId="rollbackDeployment",
                parameters=[parameter("IdempotencyKey")],
            ),
        },
        "/v1/applications": {
            "get": operation(
                "List applications with a release",
                READ,
                {"200": json_answer("Every application.", ref("ApplicationList")), **error_responses()},
                operationId="listApplications",
            ),
        },
        "/v1/applications/{name}": {
            "parameters": [parameter("ApplicationName")],
            "get": operation(
                "Get an application's current release",
                READ,
                {"200": json_answer("The application.", application), **error_responses(404)},
                operationId="getApplication",
            ),
        },
        **{
            f"/v1/applications/{{name}}/{action}": {
                "parameters": [parameter("ApplicationName")],
                "post": operation(
                    summary,
                    WRITE,
                    {"202": json_answer("The application.", application), **error_responses(404, 409, 413, 415)},
                    operationId=f"{action}Application",
                ),
            }
            for action, summary in (
                ("stop", "Take the current release out of service"),
                ("start", "Bring the current release back into service"),
            )
        },
        "/v1/applications/{name}/scale": {
            "parameters": [parameter("ApplicationName")],
            "post": operation(
                "Change how many tasks a swarm application's service runs",
                WRITE,
                {"202": json_answer("The application.", application), **error_responses(404, 409, 413, 415, 422)},
                operationId="scaleApplication",
                requestBody=json_body(object_schema(
                    {"replicas": {"type": "integer", "minimum": 0, "maximum": 1000}}, ["replicas"], extra=False)),
            ),
        },
        "/v1/servers": {
            "get": operation(
                "List remote servers, each probed",
                READ,
                {"200": json_answer("Every server.", ref("ServerList")), **error_responses()},
                operationId="listServers",
            ),
        },
        "/v1/servers/{name}": {
            "parameters": [parameter("ServerName")],
            "get": operation(
                "Probe one server",
                READ,
                {"200": json_answer("The server.", ref("Server")), **error_responses(404)},
                operationId="checkServer",
            ),
        },
        "/v1/openapi.json": {
            "get": operation(
                "This document",
                None,
                {"200": json_answer("OpenAPI 3.1.", {"type": "object"})},
                operationId="getOpenApi",
            ),
        },
        "/healthz": {
            "get": operation(
                "Whether the agent can serve; details with a token of any scope",
                None,
                {"200": json_answer("It can.", ref("Health")), **error_responses(public=True)},
                operationId="getHealth",
            ),
        },
        "/metrics": {
            "get": operation(
                "Prometheus metrics",
                READ,
                {
                    "200": {"description": "Text exposition format.", "content": {"text/plain": {"schema": TEXT}}},
                    **error_responses(),
                },
                operationId="getMetrics",
            ),
        },
    }


@cache
def openapi_document() -> bytes:
    """The document as JSON bytes, built once: it depends on nothing but the code."""
    requests = _request_schemas()
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "deploy-agent",
            "version": __version__,
            "description": "Queues, builds, releases and health-checks deployments on this server. "
            "Every request but GET /healthz and this document needs `Authorization: Bearer <token>`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {**_paths(), **openapi_schedules.paths(_LIST_QUERY, _DEPLOYMENT_LINKS)},
        "components": {
            "schemas": {**requests, **_response_schemas(), **openapi_schedules.schemas(requests["DeploymentRequest"])},
            "parameters": {**_PARAMETERS, **openapi_schedules.PARAMETERS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return json.dumps(document, indent=1).encode("utf-8")
