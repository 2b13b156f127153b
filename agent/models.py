"""Deployment records, the status machine, ids and times.

The specs a record carries are in `agent.specs`, and their validation at the edge in
`agent.deployment_request`; both are re-exported here for the modules that import them
from `agent.models`.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

from agent.clock import format_time, parse_time, utc_now  # noqa: F401 - re-exported
from agent.deployment_request import check_source_directory, parse_deployment_request, parse_metadata  # noqa: F401
from agent.specs import (  # noqa: F401 - re-exported
    BuildSpec,
    CallbackSpec,
    DeploymentSpec,
    HealthCheckSpec,
    RunSpec,
    SourceSpec,
    is_application_name,
    is_image_reference,
    redact_url,
    REDACTED_VALUE,
)

Status = Literal["queued", "building", "deploying", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "building", "deploying", "succeeded", "failed", "cancelled")
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
IN_PROGRESS_STATUSES: frozenset[str] = frozenset({"building", "deploying"})

# The only legal moves; `failed` and `cancelled` are reachable from every non-final status.
TRANSITIONS: Mapping[str, frozenset[str]] = {
    "queued": frozenset({"building", "deploying", "succeeded", "failed", "cancelled"}),
    "building": frozenset({"deploying", "succeeded", "failed", "cancelled"}),
    "deploying": frozenset({"succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

# What a response shows in place of each env value: the keys are not secret, the values are.
REDACTED = REDACTED_VALUE
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
MAX_SQLITE_INTEGER = 2**63 - 1


def new_deployment_id() -> str:
    """A time-ordered, unguessable id: `dep_` + 10 chars of milliseconds + 16 random chars."""
    return new_id("dep_")


def new_id(prefix: str) -> str:
    """`prefix` + 10 chars of milliseconds + 16 random chars: time-ordered and unguessable."""
    millis = int(time.time() * 1000)
    stamp = "".join(_CROCKFORD[(millis >> shift) & 31] for shift in range(45, -1, -5))
    # 5 random bits per character (80 in all), from one call for all 16: secrets.choice is ten times slower.
    return prefix + stamp + "".join(_CROCKFORD[byte & 31] for byte in secrets.token_bytes(16))


# --- deployment record ---------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One deployment as the store holds it; `to_json` is the contract's object."""

    id: str
    application: str
    server: str
    status: Status
    created_at: str
    updated_at: str
    log_path: str
    spec: DeploymentSpec
    started_at: str | None = None
    finished_at: str | None = None
    pid: int | None = None
    pid_started_at: float | None = None
    container_id: str | None = None
    exit_code: int | None = None
    url: str | None = None
    smoke_test: Mapping[str, Any] | None = None
    rollback_of: str | None = None
    error: Mapping[str, str] | None = None
    stage: str | None = None
    # The started release (a ReleaseHandle as a dict), the image it runs from, and the
    # deployment whose release artifacts it uses (itself, or the target of a rollback).
    release: Mapping[str, Any] | None = None
    release_image: str | None = None
    release_from: str | None = None
    # Delivery of its status callbacks (agent.callback_outbox.summary); None without a callback.
    callbacks: Mapping[str, Any] | None = None
    # A run of a schedule: which, the run it retries, and how it came about ({"reason",
    # "attempt", "scheduled_for", "timeout_s"}: agent.schedules).
    schedule_id: str | None = None
    retry_of: str | None = None
    schedule_run: Mapping[str, Any] | None = None
    seq: int = 0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        shown = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in _NOT_SHOWN}
        return {**shown, "metadata": dict(self.spec.metadata), "spec": spec_json(self.spec)}


# Fields of a record that its JSON leaves out: the spec is shown redacted, the rest is the agent's own.
_NOT_SHOWN = frozenset({"spec", "release", "release_from", "seq"})


def spec_json(spec: DeploymentSpec) -> dict[str, Any]:
    """The spec as responses echo it: env values redacted, metadata left to the top-level field.

    Made once per spec object and kept on it (specs are immutable, and the store hands out one
    object per stored spec): it was the larger part of a list's CPU. Callers must not change it.
    """
    cached = spec.__dict__.get(_SPEC_JSON)
    if cached is None:
        cached = spec.__dict__[_SPEC_JSON] = _make_spec_json(spec)
    return cached


_SPEC_JSON = "_response_json"  # not a dataclass field: asdict and == never see it


def _make_spec_json(spec: DeploymentSpec) -> dict[str, Any]:
    data = spec.to_dict()
    del data["metadata"]
    for key in ("build", "run"):
        part = data.get(key)
        if part:
            part["env"] = {name: REDACTED for name in part["env"]}
    if data.get("callback"):
        data["callback"] = {"url": redact_url(data["callback"]["url"])}
    return data


# --- listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentFilter:
    """A page request of `GET /v1/deployments`; newest first, `after_seq` from the cursor."""

    application: str | None = None
    server: str | None = None
    status: str | None = None
    updated_since: str | None = None  # normalised with format_time, so it compares as text
    limit: int = 50
    after_seq: int | None = None
    # (key, value) pairs that the deployment's metadata must all hold, as strings.
    metadata: tuple[tuple[str, str], ...] = ()
    schedule_id: str | None = None

