"""The error hierarchy: one status and one `error.type` per error, and what a failed deployment reports."""

from __future__ import annotations

from http import HTTPStatus
from typing import get_args

import pytest

from agent.errors import (
    AgentError,
    Conflict,
    ErrorType,
    HttpStatusError,
    ReleaseExited,
    ReleaseUnhealthy,
    as_agent_error,
)


@pytest.mark.parametrize("status", [400, 404, 405, 408, 413, 431, 500, 501, 503, 504, 505])
def test_a_status_aiohttp_answers_by_itself_is_named_after_its_phrase(status: int) -> None:
    """HttpStatusError: the type is the HTTP phrase in snake case, and one of ErrorType."""
    error = HttpStatusError(status)
    assert error.status == status and error.message == HTTPStatus(status).phrase
    assert error.error_type == HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    assert error.error_type in get_args(ErrorType)


def test_an_unlisted_status_is_an_http_error() -> None:
    error = HttpStatusError(418, "teapot")
    assert (error.status, error.error_type, error.message) == (418, "http_error", "teapot")


def test_a_failed_deployment_reports_what_its_error_knows() -> None:
    """An AgentError reports type and message; a release failure also its exit code and smoke test."""
    assert Conflict("busy").failure_fields() == {"error": {"type": "conflict", "message": "busy"}}
    died = ReleaseExited("exited with code 1", exit_code=1, smoke_test={"passed": False})
    told = died.with_message("exited with code 1; last output: oops")
    assert type(told) is ReleaseExited and told.died and told.exit_code == 1
    assert told.failure_fields()["error"] == {"type": "release_exited", "message": "exited with code 1; last output: oops"}
    assert not ReleaseUnhealthy("no answer").died


def test_a_surprise_becomes_an_internal_error_naming_it() -> None:
    error = as_agent_error(KeyError("x"))
    assert type(error) is AgentError and error.error_type == "internal_error" and error.message == "internal error: 'x'"
    conflict = Conflict("c")
    assert as_agent_error(conflict) is conflict
