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
from agent.api.params import DEFAULT_LIST_LIMIT, MAX_IDEMPOTENCY_KEY_LENGTH, MAX_LIST_LIMIT, MAX_WAIT_S
from agent.deployment_request import deployment_request_schema
from agent.errors import ErrorType
from agent.models import STATUSES

SCHEMAS = "#/components/schemas/"
Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": SCHEMAS + name}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


_TIME = {"type": "string", "format": "date-time"}
_TEXT = {"type": "string"}
_INTEGER = {"type": "integer"}

# --- responses ---------------------------------------------------------------------------

_ERROR_STATUSES = {
    400: "Malformed JSON, query string or header (`error.code` says which).",
    401: "Missing, malformed or unknown token.",
    403: "The token lacks the scope, or the config forbids what the request asks for.",
    404: "No such deployment, application or server.",
    409: "The request conflicts with the deployment's state, or reuses an Idempotency-Key for another request.",
    413: "The body is over `agent.max_body_bytes`.",
    415: "A body that is not `application/json` (UTF-8).",
    422: "A well-formed request that fails validation: `error.details` lists each bad field and what is wrong.",
    429: "The queue is full (`agent.max_queued`), or too many log followers; retry after `Retry-After`.",
    503: "The agent cannot serve: shutting down, Docker unreachable, or the disk full; retry after `Retry-After`.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": _INTEGER}}
_ETAG = {"ETag": {"description": "Changes whenever anything in the answer would.", "schema": _TEXT}}


def _error_responses(*statuses: int, public: bool = False) -> Json:
    """The errors of an operation: those of every authenticated request, and `statuses`."""
    responses: Json = {}
    for status in sorted({503, *statuses} if public else {400, 401, 403, 503, *statuses}):
        response: Json = {
            "description": _ERROR_STATUSES[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[str(status)] = response
    return responses


def _json(description: str, schema: Json, headers: Json | None = None) -> Json:
    response: Json = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


# Where a new deployment's id leads (OpenAPI links: clients and fuzzers can follow them).
_DEPLOYMENT_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in (
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
_LOCATION = {"Location": {"description": "The path of the deployment.", "schema": _TEXT}}
_NOT_MODIFIED = {"description": "The client's If-None-Match tag is current: no body.", "headers": _ETAG}

# --- parameters ----------------------------------------------------------------------------


def _path(name: str, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _TEXT}


def _query(name: str, description: str, schema: Json) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_PARAMETERS: Json = {
    "DeploymentId": _path("id", "A deployment id (`dep_...`)."),
    "ApplicationName": _path("name", "An application name."),
    "ServerName": _path("name", "A server name from `[servers.*]`."),
    "Wait": _query(
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
        "schema": _TEXT,
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


def _param(name: str) -> Json:
    return {"$ref": "#/components/parameters/" + name}


_LIST_QUERY = [
    _query("application", "Only this application's deployments.", _TEXT),
    _query("server", "Only deployments on this server.", _TEXT),
    _query("status", "Only deployments in this status.", {"type": "string", "enum": list(STATUSES)}),
    _query("updated_since", "Only deployments updated at or after this RFC 3339 time.", _TIME),
    _query("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": DEFAULT_LIST_LIMIT}),
    _query("cursor", "The `next_cursor` of the page before.", _TEXT),
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
    _query("follow", "Keep the response open and stream new lines until the deployment is final.", {"type": "boolean"}),
    _query("tail", "Only the last N lines.", {"type": "integer", "minimum": 0}),
    _query("offset", "From this byte on (not with `tail`).", {"type": "integer", "minimum": 0}),
]

# --- schemas -------------------------------------------------------------------------------


def _object(properties: Json, required: list[str] | None = None, *, extra: bool = True, description: str = "") -> Json:
    schema: Json = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def _response_schemas() -> Json:
    deployment = _object(
        {
            "id": {"type": "string", "pattern": "^dep_"},
            "application": _TEXT,
            "server": _TEXT,
            "status": {"type": "string", "enum": list(STATUSES)},
            "created_at": _TIME,
            "started_at": _nullable(_TIME),
            "finished_at": _nullable(_TIME),
            "updated_at": _TIME,
            "pid": _nullable(_INTEGER),
            "container_id": _nullable(_TEXT),
            "log_path": _TEXT,
            "exit_code": _nullable(_INTEGER),
            "url": _nullable(_TEXT),
            "smoke_test": _nullable(_ref("SmokeTest")),
            "rollback_of": _nullable(_TEXT),
            "error": _nullable(_object({"type": _ref("ErrorType"), "message": _TEXT}, ["type", "message"])),
            "metadata": {"type": "object"},
            "stage": _nullable(_TEXT),
            "callbacks": _nullable(_ref("CallbackDelivery")),
            "spec": {"type": "object", "description": "The request as accepted, env values shown as `***`."},
        },
        ["id", "application", "server", "status", "created_at", "started_at", "finished_at", "updated_at", "pid",
         "container_id", "log_path", "exit_code", "url", "smoke_test", "rollback_of", "error", "metadata"],
        description="A deployment; more fields may appear.",
    )
    application = _object(
        {
            "name": _TEXT,
            "current_deployment_id": _nullable(_TEXT),
            "state": {"type": "string", "enum": ["running", "stopped"]},
            "url": _nullable(_TEXT),
            "since": _nullable(_TIME),
            "runtime": _nullable(_TEXT),
            "container_id": _nullable(_TEXT),
            "pid": _nullable(_INTEGER),
            "updated_at": _nullable(_TIME),
        },
        ["name", "current_deployment_id", "state", "url", "since"],
    )
    server = _object(
        {
            "name": _TEXT,
            "host": _TEXT,
            "port": _INTEGER,
            "reachable": {"type": "boolean"},
            "latency_ms": _nullable({"type": "number"}),
            "docker_version": _nullable(_TEXT),
            "error": _nullable(_TEXT),
        },
        ["name", "host", "reachable"],
    )
    return {
        "Deployment": deployment,
        "DeploymentPage": _object(
            {"data": {"type": "array", "items": _ref("Deployment")}, "next_cursor": _nullable(_TEXT)},
            ["data", "next_cursor"],
        ),
        "MetadataPatch": _object({"metadata": {"type": "object"}}, ["metadata"], extra=False),
        "SmokeTest": _object(
            {
                "passed": {"type": "boolean"},
                "url": _nullable(_TEXT),
                "errors": {"type": "array", "items": _TEXT},
                "duration_ms": _INTEGER,
                "tested_at": _TIME,
            },
            ["passed", "errors"],
        ),
        "CallbackDelivery": _object(
            {
                "state": {"type": "string", "enum": ["delivered", "pending", "failing", "failed"]},
                "delivered": _INTEGER,
                "pending": _INTEGER,
                "failed": _INTEGER,
                "attempts": _INTEGER,
                "last_error": _nullable(_TEXT),
                "last_attempt_at": _nullable(_TIME),
            },
            ["state"],
        ),
        "Application": application,
        "ApplicationList": _object({"data": {"type": "array", "items": _ref("Application")}}, ["data"]),
        "Server": server,
        "ServerList": _object({"data": {"type": "array", "items": _ref("Server")}}, ["data"]),
        "Health": _object({"status": {"type": "string", "const": "ok"}}, ["status"]),
        "ErrorType": {"type": "string", "enum": list(get_args(ErrorType))},
        "Error": _object(
            {
                "success": {"type": "boolean", "const": False},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "error": _object(
                    {
                        "type": _ref("ErrorType"),
                        "message": _TEXT,
                        "code": _nullable(_TEXT),
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


def _operation(summary: str, scope: str | None, responses: Json, **more: Any) -> Json:
    operation: Json = {"summary": summary, "responses": responses, **more}
    if scope is None:
        operation["security"] = []
    else:
        operation["description"] = f"Needs the scope `{scope}` (or `admin`). " + operation.get("description", "")
    return operation


def _body(schema: Json, example: Json | None = None) -> Json:
    media: Json = {"schema": schema} if example is None else {"schema": schema, "example": example}
    return {"required": True, "content": {"application/json": media}}


READ, WRITE = "deployments:read", "deployments:write"


def _paths() -> Json:
    deployment = _ref("Deployment")
    application = _ref("Application")
    created = {
        "201": {**_json("Created.", deployment, _LOCATION), "links": _DEPLOYMENT_LINKS},
        "200": _json("An Idempotency-Key repeated an earlier request: the object it made.", deployment, _LOCATION),
    }
    return {
        "/v1/deployments": {
            "post": _operation(
                "Submit a deployment",
                WRITE,
                {**created, **_error_responses(409, 413, 415, 422, 429)},
                operationId="submitDeployment",
                parameters=[_param("IdempotencyKey")],
                requestBody=_body(_ref("DeploymentRequest"), example=_EXAMPLE_REQUEST),
            ),
            "get": _operation(
                "List deployments, newest first",
                READ,
                {"200": _json("A page.", _ref("DeploymentPage"), _ETAG), "304": _NOT_MODIFIED, **_error_responses()},
                operationId="listDeployments",
                parameters=[*_LIST_QUERY, _param("Wait"), _param("IfNoneMatch")],
            ),
        },
        "/v1/deployments/{id}": {
            "parameters": [_param("DeploymentId")],
            "get": _operation(
                "Get a deployment",
                READ,
                {"200": _json("The deployment.", deployment, _ETAG), "304": _NOT_MODIFIED, **_error_responses(404)},
                operationId="getDeployment",
                parameters=[_param("Wait"), _param("IfNoneMatch")],
            ),
            "patch": _operation(
                "Replace a deployment's metadata",
                WRITE,
                {"200": _json("The deployment.", deployment), **_error_responses(404, 413, 415, 422)},
                operationId="patchDeployment",
                requestBody=_body(_ref("MetadataPatch")),
            ),
            "delete": _operation(
                "Delete a final deployment's record and log",
                WRITE,
                {"204": {"description": "Deleted."}, **_error_responses(404, 409, 413, 415)},
                operationId="deleteDeployment",
            ),
        },
        "/v1/deployments/{id}/logs": {
            "parameters": [_param("DeploymentId")],
            "get": _operation(
                "Read or follow a deployment's log",
                READ,
                {
                    "200": {
                        "description": "The log as text; with `follow`, streamed until the deployment is final.",
                        "headers": {"X-Log-Offset": {"description": "The byte offset to resume from.", "schema": _INTEGER}},
                        "content": {"text/plain": {"schema": _TEXT}},
                    },
                    **_error_responses(404, 429),
                },
                operationId="getDeploymentLogs",
                parameters=_LOG_QUERY,
            ),
        },
        "/v1/deployments/{id}/kill": {
            "parameters": [_param("DeploymentId")],
            "post": _operation(
                "Kill a deployment (it ends cancelled)",
                WRITE,
                {"202": _json("The deployment after the kill.", deployment), **_error_responses(404, 409, 413, 415)},
                operationId="killDeployment",
            ),
        },
        "/v1/deployments/{id}/rollback": {
            "parameters": [_param("DeploymentId")],
            "post": _operation(
                "Bring back the release of an earlier deployment",
                WRITE,
                {**created, **_error_responses(404, 409, 413, 415, 429)},
                operationId="rollbackDeployment",
                parameters=[_param("IdempotencyKey")],
            ),
        },
        "/v1/applications": {
            "get": _operation(
                "List applications with a release",
                READ,
                {"200": _json("Every application.", _ref("ApplicationList")), **_error_responses()},
                operationId="listApplications",
            ),
        },
        "/v1/applications/{name}": {
            "parameters": [_param("ApplicationName")],
            "get": _operation(
                "Get an application's current release",
                READ,
                {"200": _json("The application.", application), **_error_responses(404)},
                operationId="getApplication",
            ),
        },
        **{
            f"/v1/applications/{{name}}/{action}": {
                "parameters": [_param("ApplicationName")],
                "post": _operation(
                    summary,
                    WRITE,
                    {"202": _json("The application.", application), **_error_responses(404, 409, 413, 415)},
                    operationId=f"{action}Application",
                ),
            }
            for action, summary in (
                ("stop", "Take the current release out of service"),
                ("start", "Bring the current release back into service"),
            )
        },
        "/v1/servers": {
            "get": _operation(
                "List remote servers, each probed",
                READ,
                {"200": _json("Every server.", _ref("ServerList")), **_error_responses()},
                operationId="listServers",
            ),
        },
        "/v1/servers/{name}": {
            "parameters": [_param("ServerName")],
            "get": _operation(
                "Probe one server",
                READ,
                {"200": _json("The server.", _ref("Server")), **_error_responses(404)},
                operationId="checkServer",
            ),
        },
        "/v1/openapi.json": {
            "get": _operation(
                "This document",
                None,
                {"200": _json("OpenAPI 3.1.", {"type": "object"})},
                operationId="getOpenApi",
            ),
        },
        "/healthz": {
            "get": _operation(
                "Whether the agent can serve; details with a token of any scope",
                None,
                {"200": _json("It can.", _ref("Health")), **_error_responses(public=True)},
                operationId="getHealth",
            ),
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                READ,
                {
                    "200": {"description": "Text exposition format.", "content": {"text/plain": {"schema": _TEXT}}},
                    **_error_responses(),
                },
                operationId="getMetrics",
            ),
        },
    }


@cache
def openapi_document() -> bytes:
    """The document as JSON bytes, built once: it depends on nothing but the code."""
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
        "paths": _paths(),
        "components": {
            "schemas": {**_request_schemas(), **_response_schemas()},
            "parameters": _PARAMETERS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return json.dumps(document, indent=1).encode("utf-8")
