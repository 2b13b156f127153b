"""The agent's error hierarchy; each error maps to exactly one HTTP status and `error.type`.

Requests fail with an `AgentError` (its status and type are the envelope's). A deployment
fails with one too: a `DeploymentFailure` (its build or release went wrong) also carries
the exit code and smoke test its status reports; any other AgentError reports its type and
message alone. Stopping a deployment (kill, shutdown) is control flow, not an error:
`StopRequested` stays outside the hierarchy.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Literal

ErrorType = Literal[
    # Requests
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "payload_too_large",
    "unsupported_media_type",
    "validation_failed",
    "queue_full",
    "too_many_followers",
    "unavailable",
    "disk_full",
    "internal_error",
    "config_error",
    # Deployments
    "build_failed",
    "timeout",
    "release_exited",
    "health_check_failed",
    "runtime_failure",
    "cancelled",
    "agent_shutdown",
    "agent_restarted",
    "lost",
    "docker_unavailable",
    # Servers (agent.ssh)
    "server_unreachable",
    "host_key_rejected",
    "ssh_auth_failed",
    "remote_command_failed",
    # Answered by aiohttp itself (HttpStatusError): the status's own name
    "request_timeout",
    "length_required",
    "request_entity_too_large",
    "request_uri_too_long",
    "expectation_failed",
    "request_header_fields_too_large",
    "internal_server_error",
    "not_implemented",
    "service_unavailable",
    "gateway_timeout",
    "http_version_not_supported",
    "http_error",
]
"""Every `error.type` the agent reports, in envelopes and in a deployment's `error`."""


def error_object(error_type: ErrorType, message: str) -> dict[str, str]:
    """A deployment's `error` field."""
    return {"type": error_type, "message": message}


class AgentError(Exception):
    """Base of every error the agent raises on purpose.

    `status` and `error_type` are the one place an error is mapped to HTTP.
    """

    status: int = 500
    error_type: ErrorType = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    def to_envelope(self) -> dict[str, Any]:
        return {
            "success": False,
            "status": self.status,
            "error": {
                "type": self.error_type,
                "message": self.message,
                "code": self.code,
                "details": self.details,
            },
        }

    def failure_fields(self) -> dict[str, Any]:
        """The fields of a deployment this error failed."""
        return {"error": error_object(self.error_type, self.message)}


class BadRequest(AgentError):
    status, error_type = 400, "bad_request"


class Unauthorized(AgentError):
    status, error_type = 401, "unauthorized"


class Forbidden(AgentError):
    status, error_type = 403, "forbidden"


class NotFound(AgentError):
    status, error_type = 404, "not_found"


class MethodNotAllowed(AgentError):
    status, error_type = 405, "method_not_allowed"


class Conflict(AgentError):
    status, error_type = 409, "conflict"


class PayloadTooLarge(AgentError):
    status, error_type = 413, "payload_too_large"


class UnsupportedMediaType(AgentError):
    status, error_type = 415, "unsupported_media_type"


class ValidationFailed(AgentError):
    """A well-formed request that fails validation; `details` lists each bad field."""

    status, error_type = 422, "validation_failed"

    def __init__(self, problems: list[dict[str, str]], message: str | None = None) -> None:
        summary = message or "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        super().__init__(summary, details=problems)
        self.problems = problems


class QueueFull(AgentError):
    status, error_type = 429, "queue_full"


class TooManyFollowers(AgentError):
    """A log follow stream beyond agent.max_log_followers (in all, or of one token)."""

    status, error_type = 429, "too_many_followers"


class Unavailable(AgentError):
    status, error_type = 503, "unavailable"


# The statuses aiohttp may answer with by itself, named after their HTTP phrase; any other is "http_error".
_HTTP_ERROR_TYPES: dict[int, ErrorType] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 411: "length_required", 413: "request_entity_too_large",
    414: "request_uri_too_long", 415: "unsupported_media_type", 417: "expectation_failed",
    431: "request_header_fields_too_large", 500: "internal_server_error", 501: "not_implemented",
    503: "service_unavailable", 504: "gateway_timeout", 505: "http_version_not_supported",
}


class HttpStatusError(AgentError):
    """A failure aiohttp or its parser answered itself, typed by its HTTP status."""

    def __init__(self, status: int, message: str | None = None) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "HTTP error"
        super().__init__(message or phrase)
        self.status = status
        self.error_type = _HTTP_ERROR_TYPES.get(status, "http_error")


class DiskFull(Unavailable):
    """Free space in state_dir is below agent.min_free_bytes: nothing new is accepted until there is room."""

    error_type = "disk_full"


class ConfigError(AgentError):
    """An invalid config file; `problems` holds one line per bad key."""

    error_type = "config_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RuntimeFailure(AgentError):
    """A runtime operation that ended badly (a command, a container, a transfer)."""

    error_type = "runtime_failure"

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- why a deployment failed -------------------------------------------------------------------


class DeploymentFailure(AgentError):
    """A deployment's build or release went wrong; its status also reports the exit code and smoke test."""

    def __init__(
        self, message: str, *, exit_code: int | None = None, smoke_test: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.smoke_test = smoke_test

    def failure_fields(self) -> dict[str, Any]:
        return {**super().failure_fields(), "exit_code": self.exit_code, "smoke_test": self.smoke_test}


class BuildFailed(DeploymentFailure):
    """The build command exited with a code other than 0."""

    error_type = "build_failed"


class BuildTimedOut(DeploymentFailure):
    """The build ran past its timeout and was killed."""

    error_type = "timeout"


class WorkLost(AgentError):
    """After a restart: the container or process of an interrupted deployment vanished while the agent was away."""

    error_type = "lost"


class DockerUnavailable(DeploymentFailure):
    """The Docker engine went away during the build and the build's container did not survive."""

    error_type = "docker_unavailable"


class ReleaseUnhealthy(DeploymentFailure):
    """The new release ran but did not pass its health check; `smoke_test` says how."""

    error_type = "health_check_failed"
    died = False  # it exited or restarted, rather than running without answering

    def with_message(self, message: str) -> "ReleaseUnhealthy":
        """The same failure, told differently (with the release's last output, masked)."""
        return type(self)(message, exit_code=self.exit_code, smoke_test=self.smoke_test)


class ReleaseExited(ReleaseUnhealthy):
    """The new release exited, or crashed and was restarted, before it was found healthy."""

    error_type = "release_exited"
    died = True


def as_agent_error(exc: Exception) -> AgentError:
    """`exc` when the agent raised it on purpose; any other exception as an internal error naming it."""
    if isinstance(exc, AgentError):
        return exc
    return AgentError(f"internal error: {exc}")


# --- control flow, not errors ------------------------------------------------------------------


class StopRequested(Exception):
    """The deployment was asked to stop (kill or shutdown) and its work has ended or is ending."""
