"""The agent's error hierarchy; each error maps to exactly one HTTP status and type."""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base of every error the agent raises on purpose.

    `status` and `error_type` are the one place an error is mapped to HTTP.
    """

    status: int = 500
    error_type: str = "internal_error"

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
    """A build or release command that ended badly."""

    error_type = "runtime_failure"

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
