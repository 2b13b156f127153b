"""Deployment specs (validated once at the edge), deployment records and the status machine."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from agent.config import parse_size
from agent.errors import ValidationFailed

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

# Every pattern is applied with fullmatch: `$` would let a trailing newline through.
APPLICATION_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Docker's reference grammar (distribution/reference). Its separator `[._]|__|[-]*` may be
# empty, which makes the literal regex backtrack exponentially in Python; `-+` with the
# empty case folded into the run of alphanumerics accepts the same language.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_IMAGE_NAME = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_IMAGE_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_IMAGE_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII)
APPLICATION_COMPONENT = re.compile(_PATH_COMPONENT)
MAX_IMAGE_NAME_LENGTH = 255
MAX_METADATA_BYTES = 16 * 1024
MIN_RELEASE_MEMORY_BYTES = 4 * 1024**2
MAX_RELEASE_MEMORY_BYTES = 1024**4
MAX_RELEASE_PIDS = 1_000_000
DEFAULT_BIND = "127.0.0.1"
# What a response shows in place of each env value: the keys are not secret, the values are.
REDACTED = "***"
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_CURSOR = re.compile(r"c[0-9a-f]{1,16}")
MAX_SQLITE_INTEGER = 2**63 - 1


def utc_now() -> str:
    """The current time as RFC 3339 with milliseconds and a Z, the format of every stored timestamp."""
    return format_time(dt.datetime.now(dt.timezone.utc))


def format_time(moment: dt.datetime) -> str:
    moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> dt.datetime:
    """Parses an RFC 3339 timestamp; raises ValueError when it is not one or has no offset."""
    candidate = text.strip()
    if candidate.endswith(("Z", "z")):
        candidate = candidate[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(candidate)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no timezone offset")
    return moment


def new_deployment_id() -> str:
    """A time-ordered, unguessable id: `dep_` + 10 chars of milliseconds + 16 random chars."""
    millis = int(time.time() * 1000)
    stamp = "".join(_CROCKFORD[(millis >> shift) & 31] for shift in range(45, -1, -5))
    return "dep_" + stamp + "".join(secrets.choice(_CROCKFORD) for _ in range(16))


# --- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    type: Literal["path", "git"]
    path: str | None = None
    url: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class BuildSpec:
    image: str | None
    command: tuple[str, ...] | str
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    # "process" runs the command as a shell command on a remote server that has no Docker.
    runtime: Literal["container", "process"] = "container"


@dataclass(frozen=True)
class RunSpec:
    runtime: Literal["container", "process"] = "container"
    image: str | None = None
    command: tuple[str, ...] | str | None = None
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    host_port: int | None = None
    bind: str = "127.0.0.1"
    # Limits of the release container; None takes the [docker] release_* default.
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class HealthCheckSpec:
    type: Literal["http", "tcp"] = "http"
    path: str = "/"
    port: int | None = None
    interval_s: float = 1.0
    timeout_s: float = 2.0
    retries: int = 30
    start_period_s: float = 0.0
    stable_s: float = 5.0


@dataclass(frozen=True)
class DeploymentSpec:
    """What a client asked for, validated; the rest of the agent trusts it."""

    application: str
    server: str = "local"
    source: SourceSpec | None = None
    build: BuildSpec | None = None
    run: RunSpec | None = None
    health_check: HealthCheckSpec | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("build", "run"):
            part = data.get(key)
            if part and isinstance(part.get("command"), tuple):
                part["command"] = list(part["command"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeploymentSpec":
        """Rebuilds a spec that was validated before (read back from the store)."""

        def command(value: Any) -> tuple[str, ...] | str | None:
            return tuple(value) if isinstance(value, list) else value

        source = data.get("source")
        build = data.get("build")
        run = data.get("run")
        health = data.get("health_check")
        return cls(
            application=data["application"],
            server=data.get("server", "local"),
            source=SourceSpec(**source) if source else None,
            build=BuildSpec(**{**build, "command": command(build["command"])}) if build else None,
            run=RunSpec(**{**run, "command": command(run.get("command"))}) if run else None,
            health_check=HealthCheckSpec(**health) if health else None,
            metadata=data.get("metadata") or {},
        )


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
    seq: int = 0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "application": self.application,
            "server": self.server,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "pid": self.pid,
            "pid_started_at": self.pid_started_at,
            "container_id": self.container_id,
            "log_path": self.log_path,
            "exit_code": self.exit_code,
            "url": self.url,
            "smoke_test": self.smoke_test,
            "rollback_of": self.rollback_of,
            "error": self.error,
            "metadata": dict(self.spec.metadata),
            "stage": self.stage,
            "release_image": self.release_image,
            "spec": spec_json(self.spec),
        }


def spec_json(spec: DeploymentSpec) -> dict[str, Any]:
    """The spec as responses echo it: env values redacted, metadata left to the top-level field."""
    data = spec.to_dict()
    del data["metadata"]
    for key in ("build", "run"):
        part = data.get(key)
        if part:
            part["env"] = {name: REDACTED for name in part["env"]}
    return data


# --- validation ----------------------------------------------------------------------------


def is_image_reference(text: str) -> bool:
    """Whether Docker accepts `text` as an image reference: name[:tag][@digest], lowercase repository path."""
    reference, at, digest = text.partition("@")
    if at and not _IMAGE_DIGEST.fullmatch(digest):
        return False
    name, tag = reference, None
    colon = reference.rfind(":")
    if colon > reference.rfind("/"):  # a colon before the last slash is a registry's port
        name, tag = reference[:colon], reference[colon + 1:]
    if tag is not None and not _IMAGE_TAG.fullmatch(tag):
        return False
    return len(name) <= MAX_IMAGE_NAME_LENGTH and _IMAGE_NAME.fullmatch(name) is not None


def is_application_name(text: str) -> bool:
    """Whether `text` is an application name: the contract's pattern, and a path component Docker accepts."""
    return APPLICATION_PATTERN.fullmatch(text) is not None and APPLICATION_COMPONENT.fullmatch(text) is not None


def _shown(key: str) -> str:
    """A client's key as it may appear in a field path: NUL spelled out, never sent raw."""
    return key.replace("\x00", "\\u0000")


def _child(path: str, key: str) -> str:
    return f"{path}.{_shown(key)}" if path else _shown(key)


class _Problems:
    """Collects every problem of a request so that one 422 names them all."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append({"field": path, "message": message})

    def object(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        """`value` as a dict without its null members (null means absent), unknown keys reported."""
        if not isinstance(value, dict):
            self.add(path, "must be an object")
            return None
        present = {key: item for key, item in value.items() if item is not None}
        for key in sorted(set(present) - allowed):
            self.add(_child(path, key), "unknown field")
        return present

    def refuse_nul(self, body: Any) -> None:
        """Names every string, key or value, anywhere in `body` that holds a NUL: no later step could pass it on."""
        stack: list[tuple[Any, str]] = [(body, "")]
        while stack:
            value, path = stack.pop()
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        self.add(path or "body", f"key '{_shown(key)}' must not contain a NUL character")
                    stack.append((item, _child(path, str(key))))
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, str):
                        # Named by the list's field: a command is one field, whichever element is bad.
                        if "\x00" in item:
                            self.add(path or "body", f"element {index} must not contain a NUL character")
                    else:
                        stack.append((item, f"{path}[{index}]"))
            elif isinstance(value, str) and "\x00" in value:
                self.add(path or "body", "must not contain a NUL character")

    def string(self, value: Any, path: str, *, required: bool = True, max_length: int = 4096) -> str | None:
        if value is None:
            if required:
                self.add(path, "is required")
            return None
        if not isinstance(value, str) or not value:
            self.add(path, "must be a non-empty string")
            return None
        if len(value) > max_length:
            self.add(path, f"must be at most {max_length} characters")
            return None
        return value

    def image(self, value: Any, path: str, *, required: bool) -> str | None:
        image = self.string(value, path, required=required, max_length=512)
        if image is not None and "\x00" not in image and not is_image_reference(image):
            self.add(path, "is not a Docker image reference (name[:tag][@digest], with a lowercase name)")
            return None
        return image

    def number(self, value: Any, path: str, default: float, *, minimum: float, maximum: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(path, "must be a number")
            return default
        if not minimum <= value <= maximum:
            self.add(path, f"must be between {minimum:g} and {maximum:g}")
            return default
        return float(value)

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, "must be an integer")
            return None
        if not minimum <= value <= maximum:
            self.add(path, f"must be between {minimum} and {maximum}")
            return None
        return value

    def size(self, value: Any, path: str, *, minimum: int, maximum: int) -> int | None:
        """A byte count: an integer, or a size string such as "512m"."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 32):
            self.add(path, "must be a number of bytes or a size such as 512m or 2g")
            return None
        try:
            size = parse_size(value)
        except (ValueError, OverflowError):  # OverflowError: a string such as "1e999" overflows to infinity
            self.add(path, "must be a number of bytes or a size such as 512m or 2g")
            return None
        if not minimum <= size <= maximum:
            self.add(path, f"must be between {minimum} and {maximum} bytes (4 MiB and 1 TiB)")
            return None
        return size

    def command(self, value: Any, path: str, *, required: bool) -> tuple[str, ...] | str | None:
        if value is None:
            if required:
                self.add(path, "is required")
            return None
        if isinstance(value, str):
            if not value.strip():
                self.add(path, "must not be empty")
                return None
            return value
        if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
            return tuple(value)
        self.add(path, "must be a non-empty list of strings (exec form) or a string (run by /bin/sh -c)")
        return None

    def env(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, "must be an object of string values")
            return {}
        clean: dict[str, str] = {}
        for name, item in value.items():
            if "\x00" in name:
                continue  # refuse_nul named it
            if not ENV_NAME_PATTERN.fullmatch(name):
                self.add(_child(path, name), "is not a valid environment variable name")
            elif not isinstance(item, str):
                self.add(_child(path, name), "must be a string")
            else:
                clean[name] = item
        return clean


def parse_deployment_request(
    body: Any,
    *,
    servers: frozenset[str] = frozenset(),
    default_build_timeout_s: float = 600.0,
    supported: frozenset[str] = frozenset({"source", "build", "run", "health_check", "remote"}),
    bind_addresses: tuple[str, ...] = (DEFAULT_BIND,),
    check_source: bool = True,
) -> DeploymentSpec:
    """Validates a deployment request body; raises ValidationFailed naming every bad field.

    `supported` names the optional features this build of the agent can carry out; a
    request that uses any other is refused with "not supported yet" rather than half-run.
    `bind_addresses` are the host addresses `run.bind` may name (`docker.bind_addresses`).
    `check_source=False` leaves the source directory to `check_source_directory`, for a
    caller that must first decide whether the path may be looked at at all.
    """
    problems = _Problems()
    top = problems.object(
        body, "", {"application", "server", "source", "build", "run", "health_check", "metadata"}
    )
    if top is None:
        raise ValidationFailed(problems.items, "the request body must be a JSON object")
    problems.refuse_nul(top)

    application = problems.string(top.get("application"), "application", max_length=63)
    if application is not None and "\x00" not in application and not is_application_name(application):
        problems.add(
            "application",
            "must match ^[a-z0-9][a-z0-9_.-]{0,62}$ and be a Docker path component: "
            "no '.', '_' or '-' at the end, no two '.' in a row, no more than two '_' in a row",
        )

    server = top.get("server", "local")
    if not isinstance(server, str) or not server:
        problems.add("server", "must be a non-empty string")
        server = "local"
    elif server != "local" and "\x00" not in server:
        if server not in servers:
            problems.add("server", f"unknown server {server!r}: not 'local' nor a [servers.*] name")
        elif "remote" not in supported:
            problems.add("server", "remote servers are not supported yet")

    source = _parse_source(top.get("source"), problems, check_source)
    build = _parse_build(top.get("build"), problems, default_build_timeout_s)
    run = _parse_run(top.get("run"), problems, bind_addresses)
    health = _parse_health(top.get("health_check"), problems)
    if health is not None and "run" not in top:
        problems.add("health_check", "needs a run")
    if build is not None and build.runtime == "process":
        if server == "local":
            problems.add(
                "build.runtime",
                "'process' builds run only on remote servers ([servers.*]) that have no Docker; "
                "a local build runs in a container from build.image",
            )
        if run is not None and run.runtime == "container" and run.image is None:
            problems.add("run.image", "is required: a process build leaves no image to start a container from")
    if run is not None and run.runtime == "container" and run.image is None and "build" not in top:
        problems.add("run.image", "is required when there is no build to start the release from")
    if (
        health is not None and run is not None and run.runtime == "container"
        and run.port is None and health.port is None
    ):
        problems.add("health_check.port", "is required when run.port is not set: there is nothing to check")
    for feature in ("run", "health_check"):
        if feature in top and feature not in supported:
            problems.add(feature, "not supported yet")
    metadata = _parse_metadata(top.get("metadata"), problems)

    if problems.items:
        raise ValidationFailed(problems.items)
    assert application is not None
    return DeploymentSpec(
        application=application,
        server=server,
        source=source,
        build=build,
        run=run,
        health_check=health,
        metadata=metadata,
    )


def parse_metadata(value: Any) -> dict[str, Any]:
    """A client's metadata object (at most 16 KiB of JSON, no NUL); raises ValidationFailed."""
    problems = _Problems()
    problems.refuse_nul({"metadata": value})
    metadata = _parse_metadata(value, problems)
    if problems.items:
        raise ValidationFailed(problems.items)
    return metadata


def _parse_metadata(value: Any, problems: _Problems) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add("metadata", "must be an object")
        return {}
    size = len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        problems.add("metadata", f"is {size} bytes of JSON; at most {MAX_METADATA_BYTES} (16 KiB) are allowed")
        return {}
    return value


def check_source_directory(spec: DeploymentSpec) -> None:
    """Raises ValidationFailed when the spec's path source is not a directory on the agent's host."""
    if spec.source is not None and spec.source.type == "path" and spec.source.path is not None:
        problem = _source_directory_problem(spec.source.path)
        if problem is not None:
            raise ValidationFailed([{"field": "source.path", "message": problem}])


def _source_directory_problem(path: str) -> str | None:
    return None if os.path.isdir(path) else f"{path} is not a directory on the agent's host"


def _parse_source(value: Any, problems: _Problems, check_directory: bool) -> SourceSpec | None:
    if value is None:
        return None
    raw = problems.object(value, "source", {"type", "path", "url", "ref"})
    if raw is None:
        return None
    kind = raw.get("type")
    if kind == "path":
        path = problems.string(raw.get("path"), "source.path")
        if path is not None and "\x00" not in path:
            if not os.path.isabs(path):
                problems.add("source.path", "must be an absolute path")
            elif check_directory and (problem := _source_directory_problem(path)) is not None:
                problems.add("source.path", problem)
        for extra in ("url", "ref"):
            if extra in raw:
                problems.add(f"source.{extra}", "is only for git sources")
        return SourceSpec(type="path", path=path)
    if kind == "git":
        url = problems.string(raw.get("url"), "source.url")
        ref = problems.string(raw.get("ref"), "source.ref", required=False, max_length=255)
        if ref is not None and (ref.startswith("-") or any(c.isspace() for c in ref)):
            problems.add("source.ref", "must be a branch, tag or commit name")
        if url is not None and (url.startswith("-") or any(c < " " or c == "\x7f" for c in url)):
            problems.add("source.url", "must be a repository URL or path")
        if "path" in raw:
            problems.add("source.path", "is only for path sources")
        return SourceSpec(type="git", url=url, ref=ref)
    problems.add("source.type", "must be 'path' or 'git'")
    return None


def _parse_build(value: Any, problems: _Problems, default_timeout_s: float) -> BuildSpec | None:
    if value is None:
        return None
    raw = problems.object(value, "build", {"image", "command", "env", "timeout_s", "runtime"})
    if raw is None:
        return None
    runtime = raw.get("runtime", "container")
    if runtime not in ("container", "process"):
        problems.add("build.runtime", "must be 'container' or 'process'")
        runtime = "container"
    image = problems.image(raw.get("image"), "build.image", required=runtime == "container")
    command = problems.command(raw.get("command"), "build.command", required=True)
    env = problems.env(raw.get("env"), "build.env")
    timeout = problems.number(raw.get("timeout_s"), "build.timeout_s", default_timeout_s, minimum=0.1, maximum=86400)
    if (image is None and runtime == "container") or command is None:
        return None
    return BuildSpec(image=image, command=command, env=env, timeout_s=timeout, runtime=runtime)


_RUN_FIELDS = {"runtime", "image", "command", "port", "env", "host_port", "bind", "memory", "cpus", "pids"}
_CONTAINER_ONLY_RUN_FIELDS = ("host_port", "memory", "cpus", "pids")


def _parse_run(value: Any, problems: _Problems, bind_addresses: tuple[str, ...]) -> RunSpec | None:
    if value is None:
        return None
    raw = problems.object(value, "run", _RUN_FIELDS)
    if raw is None:
        return None
    runtime = raw.get("runtime", "container")
    if runtime not in ("container", "process"):
        problems.add("run.runtime", "must be 'container' or 'process'")
        runtime = "container"
    image = problems.image(raw.get("image"), "run.image", required=False)
    command = problems.command(raw.get("command"), "run.command", required=runtime == "process")
    port = problems.integer(raw.get("port"), "run.port", minimum=1, maximum=65535)
    host_port = problems.integer(raw.get("host_port"), "run.host_port", minimum=1, maximum=65535)
    bind = _parse_bind(raw.get("bind"), problems, bind_addresses)
    env = problems.env(raw.get("env"), "run.env")
    memory = problems.size(
        raw.get("memory"), "run.memory", minimum=MIN_RELEASE_MEMORY_BYTES, maximum=MAX_RELEASE_MEMORY_BYTES
    )
    cpus = None
    if "cpus" in raw:
        cpus = problems.number(raw["cpus"], "run.cpus", 1.0, minimum=0.01, maximum=1024)
    pids = problems.integer(raw.get("pids"), "run.pids", minimum=1, maximum=MAX_RELEASE_PIDS)
    if runtime == "process":
        for name in _CONTAINER_ONLY_RUN_FIELDS:
            if name in raw:
                problems.add(f"run.{name}", "is only for container releases; a process release runs unconfined")
    return RunSpec(
        runtime=runtime, image=image, command=command, port=port, env=env, host_port=host_port, bind=bind,
        memory=memory, cpus=cpus, pids=pids,
    )


def _parse_bind(value: Any, problems: _Problems, allowed: tuple[str, ...]) -> str:
    """The host address a release publishes its port on: one of `docker.bind_addresses`."""
    default = DEFAULT_BIND if DEFAULT_BIND in allowed or not allowed else allowed[0]
    text = problems.string(value, "run.bind", required=False, max_length=64)
    if text is None or "\x00" in text:
        return default
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        address = None
    if address is None or address not in allowed:
        listed = ", ".join(allowed)
        problems.add("run.bind", f"must be one of the addresses in docker.bind_addresses: {listed}")
        return default
    return address


def _parse_health(value: Any, problems: _Problems) -> HealthCheckSpec | None:
    if value is None:
        return None
    raw = problems.object(
        value,
        "health_check",
        {"type", "path", "port", "interval_s", "timeout_s", "retries", "start_period_s", "stable_s"},
    )
    if raw is None:
        return None
    kind = raw.get("type", "http")
    if kind not in ("http", "tcp"):
        problems.add("health_check.type", "must be 'http' or 'tcp'")
        kind = "http"
    path = problems.string(raw.get("path"), "health_check.path", required=False, max_length=2048) or "/"
    if not path.startswith("/"):
        problems.add("health_check.path", "must start with /")
    elif any(c.isspace() for c in path):
        problems.add("health_check.path", "must not contain whitespace (percent-encode it)")
    retries = problems.integer(raw.get("retries"), "health_check.retries", minimum=1, maximum=10000)
    return HealthCheckSpec(
        type=kind,
        path=path,
        port=problems.integer(raw.get("port"), "health_check.port", minimum=1, maximum=65535),
        interval_s=problems.number(raw.get("interval_s"), "health_check.interval_s", 1.0, minimum=0.05, maximum=3600),
        timeout_s=problems.number(raw.get("timeout_s"), "health_check.timeout_s", 2.0, minimum=0.05, maximum=3600),
        retries=retries if retries is not None else 30,
        start_period_s=problems.number(
            raw.get("start_period_s"), "health_check.start_period_s", 0.0, minimum=0, maximum=3600
        ),
        stable_s=problems.number(raw.get("stable_s"), "health_check.stable_s", 5.0, minimum=0, maximum=3600),
    )


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


def encode_cursor(seq: int) -> str:
    return f"c{seq:x}"


def decode_cursor(text: str) -> int:
    """Raises ValueError for anything that is not a cursor this agent handed out."""
    # At most 16 hex digits, and below 2**63: the sequence is compared with a SQLite integer.
    if not _CURSOR.fullmatch(text):
        raise ValueError("not a cursor")
    seq = int(text[1:], 16)
    if seq > MAX_SQLITE_INTEGER:
        raise ValueError("not a cursor")
    return seq
