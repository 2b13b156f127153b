"""A deployment request body validated into a `DeploymentSpec`, or one 422 naming every bad field."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from agent.errors import ValidationFailed
from agent.specs import DEFAULT_BIND, DeploymentSpec, Metadata, source_directory_problem
from agent.validation import UNKNOWN, Location, dotted, problems_of

UNKNOWN_FIELD = "unknown field"
# How pydantic's own checks are worded in a 422; the schema's rules word their problems themselves.
MESSAGES = {
    "missing": "is required",
    UNKNOWN: UNKNOWN_FIELD,
    "string_type": "must be a non-empty string",
    "string_too_short": "must be a non-empty string",
    "string_too_long": "must be at most {max_length} characters",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "dataclass_type": "must be an object",
    "literal_error": "must be {expected}",
}


@cache
def _adapter(schema: Any) -> TypeAdapter[Any]:
    """Built on first use: building a validator takes tens of milliseconds that CLI commands need not pay."""
    return TypeAdapter(schema)


def deployment_request_schema() -> dict[str, Any]:
    """The JSON Schema of a deployment request body, from the same declaration that validates it."""
    return _adapter(DeploymentSpec).json_schema()


def parse_deployment_request(
    body: Any,
    *,
    servers: frozenset[str] = frozenset(),
    default_build_timeout_s: float = 600.0,
    bind_addresses: tuple[str, ...] = (DEFAULT_BIND,),
    check_source: bool = True,
    callbacks_enabled: bool = False,
    default_callback_url: str | None = None,
    registry: bool = False,
) -> DeploymentSpec:
    """Validates a deployment request body; raises ValidationFailed naming every bad field.

    `servers` are the names a request may give as `server` besides "local"; `bind_addresses`
    the host addresses `run.bind` may name (`docker.bind_addresses`). `check_source=False`
    leaves the source directory to `check_source_directory`, for a caller that must first
    decide whether the path may be looked at at all. A `callback` is refused unless
    `callbacks_enabled` (a secret to sign with is configured); without one the request gets
    `default_callback_url`. A swarm release needs a `registry` (`[registry]` in the config).
    """
    if not isinstance(body, dict):
        problem = {"field": "", "message": "must be an object"}
        raise ValidationFailed([problem], "the request body must be a JSON object")
    context = {
        "servers": servers,
        "default_build_timeout_s": default_build_timeout_s,
        "bind_addresses": bind_addresses,
        "check_source": check_source,
        "callbacks_enabled": callbacks_enabled,
        "default_callback_url": default_callback_url if callbacks_enabled else None,
        "registry": registry,
    }
    nul_problems, nul_locations = find_nul(body)
    try:
        spec: DeploymentSpec = _adapter(DeploymentSpec).validate_python(body, context=context)
    except ValidationError as error:
        problems = [
            {"field": dotted(location), "message": message}
            for location, message in problems_of(error, MESSAGES)
            if message == UNKNOWN_FIELD or not _under_any(location, nul_locations)
        ]
        raise ValidationFailed(nul_problems + problems) from None
    if nul_problems:
        raise ValidationFailed(nul_problems)
    return spec


def parse_metadata(value: Any) -> dict[str, Any]:
    """A client's metadata object (at most 16 KiB of JSON, no NUL); raises ValidationFailed."""
    nul_problems, _ = find_nul({"metadata": value})
    if nul_problems:
        raise ValidationFailed(nul_problems)
    try:
        return dict(_adapter(Metadata).validate_python(value))
    except ValidationError as error:
        raise ValidationFailed(
            [{"field": "metadata", "message": message} for _, message in problems_of(error, MESSAGES)]
        ) from None


def check_source_directory(spec: DeploymentSpec) -> None:
    """Raises ValidationFailed when the spec's path source is not a directory on the agent's host."""
    if spec.source is not None and spec.source.type == "path" and spec.source.path is not None:
        if not os.path.isdir(spec.source.path):
            raise ValidationFailed([{"field": "source.path", "message": source_directory_problem(spec.source.path)}])


def find_nul(body: Any) -> tuple[list[dict[str, str]], list[Location]]:
    """Every string, key or value, anywhere in `body` that holds a NUL: no later step could pass it on.

    Returns the problems, and where the NULs are: the schema's own verdict on those places
    would only repeat the news (a name with a NUL does not match its pattern either).
    """
    problems: list[dict[str, str]] = []
    locations: list[Location] = []
    stack: list[tuple[Any, Location]] = [(body, ())]
    while stack:
        value, location = stack.pop()
        path = dotted(location) or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    message = f"key '{dotted((key,))}' must not contain a NUL character"
                    problems.append({"field": path, "message": message})
                    locations.append((*location, key))
                stack.append((item, (*location, key)))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    stack.append((item, (*location, index)))
                elif "\x00" in item:
                    # Named by the list's field: a command is one field, whichever element is bad.
                    problems.append({"field": path, "message": f"element {index} must not contain a NUL character"})
                    locations.append(location)
        elif isinstance(value, str) and "\x00" in value:
            problems.append({"field": path, "message": "must not contain a NUL character"})
            locations.append(location)
    return problems, locations


def _under_any(location: Location, prefixes: list[Location]) -> bool:
    return any(location[: len(prefix)] == prefix for prefix in prefixes)

