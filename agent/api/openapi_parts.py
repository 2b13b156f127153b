"""The pieces the OpenAPI document is written with: references, answers, errors, parameters, operations."""

from __future__ import annotations

from typing import Any

SCHEMAS = "#/components/schemas/"
Json = dict[str, Any]


def ref(name: str) -> Json:
    return {"$ref": SCHEMAS + name}


def nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


TIME = {"type": "string", "format": "date-time"}
TEXT = {"type": "string"}
INTEGER = {"type": "integer"}

# --- responses ---------------------------------------------------------------------------

ERROR_STATUSES = {
    400: "Malformed JSON, query string or header (`error.code` says which).",
    401: "Missing, malformed or unknown token.",
    403: "The token lacks the scope, or the config forbids what the request asks for.",
    404: "No such deployment, application, server or schedule.",
    409: "The request conflicts with the state of the deployment or schedule, or reuses an Idempotency-Key for another request.",
    413: "The body is over `agent.max_body_bytes`.",
    415: "A body that is not `application/json` (UTF-8).",
    422: "A well-formed request that fails validation: `error.details` lists each bad field and what is wrong.",
    429: "The queue is full (`agent.max_queued`), or too many log followers; retry after `Retry-After`.",
    503: "The agent cannot serve: shutting down, Docker unreachable, or the disk full; retry after `Retry-After`.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": INTEGER}}
ETAG = {"ETag": {"description": "Changes whenever anything in the answer would.", "schema": TEXT}}


def error_responses(*statuses: int, public: bool = False) -> Json:
    """The errors of an operation: those of every authenticated request, and `statuses`."""
    responses: Json = {}
    for status in sorted({503, *statuses} if public else {400, 401, 403, 503, *statuses}):
        response: Json = {
            "description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": ref("Error")}},
        }
        if status in (429, 503):
            response["headers"] = RETRY_AFTER
        responses[str(status)] = response
    return responses


def json_answer(description: str, schema: Json, headers: Json | None = None) -> Json:
    response: Json = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


# --- parameters and schemas ----------------------------------------------------------------


def path_parameter(name: str, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": TEXT}


def query_parameter(name: str, description: str, schema: Json) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def parameter(name: str) -> Json:
    return {"$ref": "#/components/parameters/" + name}


def object_schema(properties: Json, required: list[str] | None = None, *, extra: bool = True, description: str = "") -> Json:
    schema: Json = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


# --- operations ----------------------------------------------------------------------------


def operation(summary: str, scope: str | None, responses: Json, **more: Any) -> Json:
    described: Json = {"summary": summary, "responses": responses, **more}
    if scope is None:
        described["security"] = []
    else:
        described["description"] = f"Needs the scope `{scope}` (or `admin`). " + described.get("description", "")
    return described


def json_body(schema: Json, example: Json | None = None) -> Json:
    media: Json = {"schema": schema} if example is None else {"schema": schema, "example": example}
    return {"required": True, "content": {"application/json": media}}


READ, WRITE = "deployments:read", "deployments:write"
