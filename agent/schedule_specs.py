"""What a client may ask of a schedule: the request and patch bodies, whose annotations are their schema.

The `template` is a deployment request without `application`; it is validated as one by
`agent.deployment_request` (with the schedule's application), so that a schedule can only
hold what `POST /v1/deployments` would accept. The parse functions raise one 422 naming
every bad field, as a deployment request does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, ConfigDict, Discriminator, Field, PlainValidator, Strict, ValidationError

from agent.deployment_request import MESSAGES, _adapter, find_nul
from agent.errors import ValidationFailed
from agent.schedule_times import cron_problem, timezone_problem
from agent.specs import APPLICATION_PATTERN, Metadata, RequestObject, _check_application
from agent.validation import Between, dotted, invalid, problems_of

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,127}")
MAX_EVERY_S = 366 * 86400


def _check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        invalid("must be 1 to 128 letters, digits, spaces or '_.:/-', starting with a letter or digit")
    return name


def _check_expression(expression: str) -> str:
    problem = cron_problem(expression)
    if problem is not None:
        invalid(problem)
    return expression


def _check_timezone(name: str) -> str:
    problem = timezone_problem(name)
    if problem is not None:
        invalid(problem)
    return name


def _read_template(value: Any) -> dict[str, Any]:
    # Its members are checked as a deployment request's (parse_schedule_request).
    if not isinstance(value, dict):
        invalid("must be an object: the body of POST /v1/deployments without application")
    return value


Name = Annotated[str, Strict(), Field(min_length=1, max_length=128), AfterValidator(_check_name)]
Template = Annotated[Mapping[str, Any], PlainValidator(_read_template, json_schema_input_type=dict[str, Any])]


@dataclass(frozen=True)
class CronSchedule(RequestObject):
    type: Literal["cron"]
    expression: Annotated[str, Strict(), Field(min_length=1, max_length=256), AfterValidator(_check_expression)]
    timezone: Annotated[str, Strict(), Field(min_length=1, max_length=64), AfterValidator(_check_timezone)] = "UTC"


@dataclass(frozen=True)
class IntervalSchedule(RequestObject):
    type: Literal["interval"]
    every_s: Annotated[int, Strict(), Between(1, MAX_EVERY_S)]


Timing = Annotated[CronSchedule | IntervalSchedule, Discriminator("type")]


@dataclass(frozen=True)
class ScheduleConfig(RequestObject):
    max_concurrent: Annotated[int, Strict(), Between(1, 1000)] = 1
    max_retries: Annotated[int, Strict(), Between(0, 100)] = 0
    timeout_s: Annotated[float, Strict(), Between(1, 7 * 86400)] | None = None
    pause_after_failures: Annotated[int, Strict(), Between(0, 10000)] = 0
    missed: Literal["skip", "run_once"] = "skip"
    # The first retry waits this long; each later one twice as long as the one before (at most an hour).
    retry_backoff_s: Annotated[float, Strict(), Between(0.1, 3600)] = 5.0


@dataclass(frozen=True)
class ScheduleRequest(RequestObject):
    """The body of `POST /v1/schedules`."""

    application: Annotated[
        str,
        Strict(),
        Field(min_length=1, max_length=63, json_schema_extra={"pattern": f"^{APPLICATION_PATTERN.pattern}$"}),
        AfterValidator(_check_application),
    ]
    schedule: Timing
    template: Template
    name: Name | None = None
    config: ScheduleConfig = field(default_factory=ScheduleConfig)
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulePatch(RequestObject):
    """The body of `PATCH /v1/schedules/{id}`: what it names is replaced; `config` members are merged."""

    name: Name | None = None
    schedule: Timing | None = None
    template: Template | None = None
    config: Mapping[str, Any] | None = None
    metadata: Metadata | None = None


def parse_schedule_request(body: Any) -> ScheduleRequest:
    """The validated body of a create (its template still to be checked as a deployment); 422 otherwise."""
    return _parse(ScheduleRequest, body)


def parse_schedule_patch(body: Any) -> SchedulePatch:
    patch = _parse(SchedulePatch, body)
    if not any(value is not None for value in asdict(patch).values()):
        raise ValidationFailed(
            [{"field": "", "message": "name at least one of name, schedule, template, config, metadata"}]
        )
    return patch


def parse_schedule_config(current: Mapping[str, Any], changes: Mapping[str, Any]) -> ScheduleConfig:
    """`current` with `changes` merged in, validated (problems named under `config.`)."""
    try:
        return _parse(ScheduleConfig, {**current, **changes})
    except ValidationFailed as failure:
        raise ValidationFailed([_under("config", problem) for problem in failure.problems]) from None


def _parse(schema: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        raise ValidationFailed([{"field": "", "message": "must be an object"}], "the request body must be a JSON object")
    nul_problems, _ = find_nul(body)
    if nul_problems:
        raise ValidationFailed(nul_problems)
    try:
        return _adapter(schema).validate_python(body)
    except ValidationError as error:
        problems = []
        for location, message in problems_of(error, {**MESSAGES, **_TIMING_MESSAGES}):
            if location[:1] == ("schedule",) and message in _TIMING_MESSAGES.values():
                location = ("schedule", "type")
            elif location[:1] == ("schedule",) and location[1:2] in (("cron",), ("interval",)):
                location = ("schedule", *location[2:])  # pydantic names the union member it tried
            problems.append({"field": dotted(location), "message": message})
        raise ValidationFailed(problems) from None


_TIMING_MESSAGES = {
    "union_tag_invalid": "must be 'cron' or 'interval'",
    "union_tag_not_found": "is required: 'cron' or 'interval'",
}


def _under(prefix: str, problem: Mapping[str, Any]) -> dict[str, Any]:
    inner = problem.get("field") or ""
    return {**problem, "field": f"{prefix}.{inner}" if inner else prefix}


def template_problems(failure: ValidationFailed) -> ValidationFailed:
    """A template's 422 as a deployment request's, with every field named under `template.`."""
    return ValidationFailed([_under("template", problem) for problem in failure.problems])


def schedule_request_schema() -> dict[str, Any]:
    return _adapter(ScheduleRequest).json_schema()


def schedule_patch_schema() -> dict[str, Any]:
    return _adapter(SchedulePatch).json_schema()


def timing_dict(timing: CronSchedule | IntervalSchedule) -> dict[str, Any]:
    return asdict(timing)
