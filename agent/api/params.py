"""Parsing of request bodies, headers and query strings; every problem is a 400 that says what is wrong."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from aiohttp import web
from multidict import MultiDict, MultiMapping

from agent.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from agent.api.cursor import decode_cursor
from agent.schedule_models import ScheduleFilter
from agent.specs import MAX_REPLICAS
from agent.models import MAX_SQLITE_INTEGER, STATUSES, DeploymentFilter, format_time, parse_metadata, parse_time

MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_LIST_LIMIT = 500
DEFAULT_LIST_LIMIT = 50
# Deeper JSON than this is refused before it can exhaust the recursion of json.dumps or asdict.
MAX_JSON_DEPTH = 32
_DIGITS = re.compile(r"[0-9]{1,19}")
JSON_MEDIA_TYPE = "application/json"
_UTF8 = frozenset({"utf-8", "utf8"})
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


# --- bodies --------------------------------------------------------------------------------


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The request body as JSON; 413 over `max_bytes`, 415 unless declared so, 400 unless strict UTF-8 JSON."""
    # A declared length over the limit is refused first, whatever the body claims to be.
    _refuse_declared_length(request, max_bytes)
    refusal = json_content_type_refusal(request)
    if refusal is not None:
        raise UnsupportedMediaType(refusal, code="unsupported_media_type")
    raw = await _read_body(request, max_bytes)
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8", code="malformed_json") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply", code="malformed_json") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="malformed_json") from None
    _check_json(body)
    return body


async def refuse_body(request: web.Request, max_bytes: int) -> None:
    """For routes that take no body: any body they get must still be JSON (it is ignored), else 415."""
    if not request.body_exists or json_content_type_refusal(request) is None:
        return
    # A chunked body may turn out empty, which is as good as none.
    if await _read_body(request, max_bytes):
        raise UnsupportedMediaType(
            f"{request.method} {request.path} takes no body: send none, or one of type {JSON_MEDIA_TYPE}",
            code="unsupported_media_type",
        )


def json_content_type_refusal(request: web.Request) -> str | None:
    """Why the request's Content-Type is not application/json (UTF-8, the only charset read), or None."""
    given = request.headers.get("Content-Type")
    if given is None:
        return f"the request body needs the header Content-Type: {JSON_MEDIA_TYPE}"
    charset = request.charset
    if request.content_type != JSON_MEDIA_TYPE or (charset is not None and charset.lower() not in _UTF8):
        return f"the request body must be {JSON_MEDIA_TYPE} (UTF-8), not {given[:100]!r}"
    return None


async def _read_body(request: web.Request, max_bytes: int) -> bytes:
    """The raw body; 413 over `max_bytes`, 400 when it cannot be read."""
    _refuse_declared_length(request, max_bytes)
    try:
        return await request.read()  # aiohttp enforces client_max_size while reading (chunked bodies too)
    except web.RequestPayloadError as exc:
        # e.g. a Content-Encoding the body does not match, or broken chunked framing
        reason = getattr(exc.__cause__, "message", None) or str(exc)
        raise BadRequest(f"request body could not be read: {reason}", code="malformed_body") from None
    except ConnectionResetError:
        raise BadRequest("the connection closed before the request body arrived", code="malformed_body") from None


def _refuse_declared_length(request: web.Request, max_bytes: int) -> None:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(too_large_message(max_bytes))


def too_large_message(max_bytes: int) -> str:
    return f"request body is over the limit of {max_bytes} bytes"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _check_json(body: Any) -> None:
    """Refuses JSON that parses but that no later step could store: lone surrogates, extreme nesting."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            problem = {"field": path or "body", "message": f"is nested deeper than {MAX_JSON_DEPTH} levels"}
            raise ValidationFailed([problem])
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"request body holds an invalid \\u escape (a lone surrogate) at {path or 'the top level'}",
            code="malformed_json",
        ) from None


def request_hash(body: Any) -> str:
    """SHA-256 of the body's canonical JSON: the same request gives the same hash however it was spelled."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header: 1 to 255 printable ASCII characters, or absent."""
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("more than one Idempotency-Key header", code="bad_idempotency_key")
    key = values[0]
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters",
            code="bad_idempotency_key",
        )
    return key


# --- query strings -------------------------------------------------------------------------


def single_values(query: MultiMapping[str], allowed: Iterable[str]) -> dict[str, str]:
    """The query as a plain dict; 400 for parameters not in `allowed` and for repeated ones."""
    allowed = frozenset(allowed)
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown query parameter(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
            code="bad_query",
            details={"unknown": unknown},
        )
    values: dict[str, str] = {}
    for name in query:
        given = query.getall(name)
        if len(given) > 1:
            raise BadRequest(f"query parameter {name} is given more than once", code="bad_query")
        values[name] = given[0]
    return values


def parse_integer(name: str, text: str, *, minimum: int, maximum: int | None = None) -> int:
    """A decimal integer query parameter within bounds; 400 naming the parameter otherwise."""
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
    if not _DIGITS.fullmatch(text):
        raise BadRequest(f"query parameter {name} must be an integer {bounds}, got {text[:40]!r}", code="bad_query")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        raise BadRequest(f"query parameter {name} must be an integer {bounds}, got {value}", code="bad_query")
    return value


def parse_boolean(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest(f"query parameter {name} must be true, false, 1 or 0, got {text[:40]!r}", code="bad_query")


LIST_PARAMETERS = ("application", "server", "status", "updated_since", "limit", "cursor", "wait", "schedule_id")
METADATA_PREFIX = "metadata."
# `?wait=S`: how long a long poll may be held, in seconds.
MAX_WAIT_S = 60.0


def parse_list_query(query: MultiMapping[str]) -> DeploymentFilter:
    """The filters of `GET /v1/deployments` (`wait` is read by parse_wait)."""
    metadata = tuple((name[len(METADATA_PREFIX) :], value) for name, value in query.items() if name.startswith(METADATA_PREFIX))
    for key, _ in metadata:
        if not key:
            raise BadRequest("query parameter metadata.KEY needs a key after 'metadata.'", code="bad_query")
    plain = MultiDict((name, value) for name, value in query.items() if not name.startswith(METADATA_PREFIX))
    values = single_values(plain, LIST_PARAMETERS)
    status = values.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(
            f"query parameter status must be one of {', '.join(STATUSES)}, got {status[:40]!r}", code="bad_query"
        )
    updated_since = values.get("updated_since")
    if updated_since is not None:
        try:
            updated_since = format_time(parse_time(updated_since))
        except (ValueError, OverflowError):
            hint = " (a '+' in a query string must be sent as %2B)" if " " in updated_since else ""
            raise BadRequest(
                f"query parameter updated_since must be an RFC 3339 timestamp such as 2026-01-02T03:04:05Z, "
                f"got {updated_since[:64]!r}{hint}",
                code="bad_query",
            ) from None
    limit, after_seq = parse_page(values)
    return DeploymentFilter(
        application=values.get("application"),
        server=values.get("server"),
        status=status,
        updated_since=updated_since,
        limit=limit,
        after_seq=after_seq,
        metadata=metadata,
        schedule_id=values.get("schedule_id"),
    )


def parse_page(values: dict[str, str]) -> tuple[int, int | None]:
    """`limit` and `cursor` of a list: the page size and the seq to continue below."""
    limit = DEFAULT_LIST_LIMIT
    if "limit" in values:
        limit = parse_integer("limit", values["limit"], minimum=1, maximum=MAX_LIST_LIMIT)
    after_seq = None
    if "cursor" in values:
        try:
            after_seq = decode_cursor(values["cursor"])
        except ValueError:
            raise BadRequest("query parameter cursor is not a cursor this agent handed out", code="bad_query") from None
    return limit, after_seq


SCHEDULE_STATUSES = ("active", "paused", "archived")


def parse_schedule_query(query: MultiMapping[str]) -> ScheduleFilter:
    """The filters of `GET /v1/schedules`: `status=archived` lists the archived ones, which are otherwise left out."""
    values = single_values(query, ("application", "status", "limit", "cursor"))
    status = values.get("status")
    if status is not None and status not in SCHEDULE_STATUSES:
        raise BadRequest(
            f"query parameter status must be one of {', '.join(SCHEDULE_STATUSES)}, got {status[:40]!r}",
            code="bad_query",
        )
    limit, after_seq = parse_page(values)
    return ScheduleFilter(application=values.get("application"), status=status, limit=limit, after_seq=after_seq)


def parse_metadata_patch(body: Any) -> dict[str, Any]:
    """The metadata of `PATCH /v1/deployments/{id}`: `{"metadata": {...}}` and nothing else; 422 otherwise."""
    if not isinstance(body, dict):
        raise ValidationFailed([{"field": "", "message": "the body must be a JSON object: {\"metadata\": {...}}"}])
    problems = [
        {"field": name, "message": "only metadata can be changed on a deployment"} for name in sorted(body) if name != "metadata"
    ]
    if "metadata" not in body:
        problems.append({"field": "metadata", "message": "required: the metadata that replaces the deployment's"})
    if problems:
        raise ValidationFailed(problems)
    return parse_metadata(body["metadata"])


def parse_replicas(body: Any) -> int:
    """The body of `POST /v1/applications/{name}/scale`: `{"replicas": N}`, 0 <= N <= 1000; 422 otherwise."""
    if not isinstance(body, dict) or set(body) != {"replicas"}:
        raise ValidationFailed([{"field": "replicas", "message": "the body must be {\"replicas\": N} and nothing else"}])
    replicas = body["replicas"]
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
        raise ValidationFailed([{"field": "replicas", "message": f"must be an integer from 0 to {MAX_REPLICAS}"}])
    return replicas


def parse_wait(query: MultiMapping[str]) -> float | None:
    """`?wait=S`, a number of seconds, 0 < S <= 60; None when not given."""
    given = query.getall("wait", [])
    if not given:
        return None
    if len(given) > 1:
        raise BadRequest("query parameter wait is given more than once", code="bad_query")
    try:
        seconds = float(given[0])
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_WAIT_S):
        raise BadRequest(
            f"query parameter wait must be a number of seconds above 0 and at most {MAX_WAIT_S:g}, got {given[0][:40]!r}",
            code="bad_query",
        )
    return seconds


@dataclass(frozen=True)
class LogQuery:
    """The options of `GET /v1/deployments/{id}/logs`."""

    follow: bool = False
    tail: int | None = None
    offset: int | None = None


def parse_log_query(query: MultiMapping[str]) -> LogQuery:
    values = single_values(query, ("follow", "tail", "offset"))
    # Bounded like a file offset (a signed 64-bit integer), so that seeking can never overflow.
    tail = parse_integer("tail", values["tail"], minimum=0, maximum=MAX_SQLITE_INTEGER) if "tail" in values else None
    offset = (
        parse_integer("offset", values["offset"], minimum=0, maximum=MAX_SQLITE_INTEGER) if "offset" in values else None
    )
    if tail is not None and offset is not None:
        raise BadRequest("give tail or offset, not both", code="bad_query")
    follow = parse_boolean("follow", values["follow"]) if "follow" in values else False
    return LogQuery(follow=follow, tail=tail, offset=offset)
