"""What a client may ask for: the frozen deployment specs, whose annotations are the request schema.

`agent.deployment_request` validates a request body into a `DeploymentSpec` with these
rules; code that builds a spec itself (the store reading one back, a rollback) is trusted.
The validation context may hold `servers`, `bind_addresses`, `default_build_timeout_s`
and `check_source` (see `parse_deployment_request`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, ConfigDict, Field, PlainValidator, Strict, ValidationInfo, model_validator

from agent.validation import Between, invalid, parse_size, present_members, refuse

LOCAL_SERVER = "local"  # the `server` that names this host
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
DEFAULT_BUILD_TIMEOUT_S = 600.0
REDACTED_VALUE = "***"


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


# --- field rules ---------------------------------------------------------------------------


def _check_application(name: str) -> str:
    if not is_application_name(name):
        invalid(
            "must match ^[a-z0-9][a-z0-9_.-]{0,62}$ and be a Docker path component: "
            "no '.', '_' or '-' at the end, no two '.' in a row, no more than two '_' in a row"
        )
    return name


def _check_image(reference: str) -> str:
    if not is_image_reference(reference):
        invalid("is not a Docker image reference (name[:tag][@digest], with a lowercase name)")
    return reference


def _check_server(name: str, info: ValidationInfo) -> str:
    if name != LOCAL_SERVER and name not in (info.context or {}).get("servers", ()):
        invalid(f"unknown server {name!r}: not 'local' nor a [servers.*] name")
    return name


def _check_git_url(url: str) -> str:
    if url.startswith("-") or any(c < " " or c == "\x7f" for c in url):
        invalid("must be a repository URL or path")
    return url


def _check_git_ref(ref: str) -> str:
    if ref.startswith("-") or any(c.isspace() for c in ref):
        invalid("must be a branch, tag or commit name")
    return ref


def _check_callback_url(url: str, info: ValidationInfo) -> str:
    if not (info.context or {}).get("callbacks_enabled", True):
        invalid("callbacks need [callbacks] secret (or secret_file) in the agent's config to be signed with")
    if not is_callback_url(url):
        invalid("must be an http:// or https:// URL with a host")
    return url


def is_callback_url(url: str) -> bool:
    """Whether `url` is one a callback may be POSTed to: http(s), a host, no whitespace or controls."""
    if any(c <= " " or c == "\x7f" for c in url):
        return False
    parsed = urlsplit(url)
    return parsed.scheme in ("http", "https") and bool(parsed.hostname)


def redact_url(url: str) -> str:
    """The URL as responses show it: a password and the query (where tokens ride) hidden."""
    parsed = urlsplit(url)
    netloc = parsed.netloc
    if parsed.password is not None:
        netloc = f"{parsed.username}:{REDACTED_VALUE}@" + netloc.rpartition("@")[2]
    return urlunsplit(parsed._replace(netloc=netloc, query=REDACTED_VALUE if parsed.query else ""))


def _check_http_path(path: str) -> str:
    if not path.startswith("/"):
        invalid("must start with /")
    if any(c.isspace() for c in path):
        invalid("must not contain whitespace (percent-encode it)")
    return path


def _read_command(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str):
        if not value.strip():
            invalid("must not be empty")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(part, str) for part in value):
        return tuple(value)
    invalid("must be a non-empty list of strings (exec form) or a string (run by /bin/sh -c)")


def _read_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        invalid("must be an object of string values")
    problems = []
    for name, item in value.items():
        if not ENV_NAME_PATTERN.fullmatch(name):
            problems.append((name, "is not a valid environment variable name"))
        elif not isinstance(item, str):
            problems.append((name, "must be a string"))
    if problems:
        refuse(*problems)
    return dict(value)


def _read_bind(value: Any, info: ValidationInfo) -> str:
    """The host address a release publishes its port on: one of `docker.bind_addresses`."""
    allowed = bind_addresses(info.context)
    if not isinstance(value, str) or not value:
        invalid("must be a non-empty string")
    if len(value) > 64:
        invalid("must be at most 64 characters")
    try:
        address = str(ipaddress.ip_address(value))
    except ValueError:
        address = None
    if address is None or address not in allowed:
        invalid(f"must be one of the addresses in docker.bind_addresses: {', '.join(allowed)}")
    return address


def _read_release_memory(value: Any) -> int:
    """A byte count: an integer, or a size string such as "512m"."""
    wrong = "must be a number of bytes or a size such as 512m or 2g"
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 32):
        invalid(wrong)
    try:
        size = parse_size(value)
    except (ValueError, OverflowError):  # OverflowError: a string such as "1e999" overflows to infinity
        invalid(wrong)
    if not MIN_RELEASE_MEMORY_BYTES <= size <= MAX_RELEASE_MEMORY_BYTES:
        bounds = f"{MIN_RELEASE_MEMORY_BYTES} and {MAX_RELEASE_MEMORY_BYTES} bytes (4 MiB and 1 TiB)"
        invalid(f"must be between {bounds}")
    return size


def read_metadata(value: Any) -> dict[str, Any]:
    """A client's metadata: an object of at most 16 KiB of compact JSON."""
    if not isinstance(value, dict):
        invalid("must be an object")
    size = len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        invalid(f"is {size} bytes of JSON; at most {MAX_METADATA_BYTES} (16 KiB) are allowed")
    return value


def bind_addresses(context: Mapping[str, Any] | None) -> tuple[str, ...]:
    return tuple((context or {}).get("bind_addresses") or (DEFAULT_BIND,))


Text = Annotated[str, Strict(), Field(min_length=1, max_length=4096)]
Runtime = Literal["container", "process"]
# Where a release runs: a container, a host process, or a Docker Swarm service of the agent's swarm.
RunRuntime = Literal["container", "process", "swarm"]
MAX_REPLICAS = 1000
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.-]+(?:\.[A-Za-z0-9_.-]+)*\s*(?:==|!=)\s*\S(?:.*\S)?")
Port = Annotated[int, Strict(), Between(1, 65535)]
ImageReference = Annotated[str, Strict(), Field(min_length=1, max_length=512), AfterValidator(_check_image)]
Command = Annotated[tuple[str, ...] | str, PlainValidator(_read_command, json_schema_input_type=list[str] | str)]
Env = Annotated[Mapping[str, str], PlainValidator(_read_env, json_schema_input_type=dict[str, str])]
Seconds = Annotated[float, Strict(), Between(0, 3600)]
PollSeconds = Annotated[float, Strict(), Between(0.05, 3600)]
Metadata = Annotated[Mapping[str, Any], PlainValidator(read_metadata, json_schema_input_type=dict[str, Any])]


class RequestObject:
    """Base of the request's objects: unknown members are refused, and a null member means absent."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _read_members(cls, data: Any, info: ValidationInfo) -> Any:
        data = present_members(data)
        return {**cls.input_defaults(info.context or {}), **data} if isinstance(data, dict) else data

    @classmethod
    def input_defaults(cls, context: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults of absent members that the dataclass cannot declare (they depend on the config)."""
        return {}


# --- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec(RequestObject):
    type: Literal["path", "git"]
    path: Text | None = None
    url: Annotated[str, Strict(), Field(min_length=1, max_length=4096), AfterValidator(_check_git_url)] | None = None
    ref: Annotated[str, Strict(), Field(min_length=1, max_length=255), AfterValidator(_check_git_ref)] | None = None

    @model_validator(mode="after")
    def _check_kind(self, info: ValidationInfo) -> SourceSpec:
        problems: list[tuple[str, str]] = []
        if self.type == "path":
            if self.path is None:
                problems.append(("path", "is required"))
            elif not os.path.isabs(self.path):
                problems.append(("path", "must be an absolute path"))
            elif (info.context or {}).get("check_source", True) and not os.path.isdir(self.path):
                problems.append(("path", source_directory_problem(self.path)))
            given = [name for name in ("url", "ref") if getattr(self, name) is not None]
            problems += [(name, "is only for git sources") for name in given]
        else:
            if self.url is None:
                problems.append(("url", "is required"))
            if self.path is not None:
                problems.append(("path", "is only for path sources"))
        if problems:
            refuse(*problems)
        return self


def source_directory_problem(path: str) -> str:
    return f"{path} is not a directory on the agent's host"


def _image_optional(schema: dict[str, Any]) -> None:
    schema["required"].remove("image")  # a process build has none; the dataclass field has no default


@dataclass(frozen=True)
class BuildSpec(RequestObject):
    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra=_image_optional)

    image: ImageReference | None
    command: Command
    env: Env = field(default_factory=dict)
    timeout_s: Annotated[float, Strict(), Between(0.1, 86400)] = DEFAULT_BUILD_TIMEOUT_S
    # "process" runs the command as a shell command on a remote server that has no Docker.
    runtime: Runtime = "container"

    @classmethod
    def input_defaults(cls, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"image": None}

    @model_validator(mode="wrap")
    @classmethod
    def _default_timeout(cls, data: Any, handler: Any, info: ValidationInfo) -> BuildSpec:
        """Without a timeout_s the build gets agent.default_build_timeout_s, which the request's bounds do not limit."""
        given = isinstance(data, dict) and data.get("timeout_s") is not None
        build = handler(data)
        default = (info.context or {}).get("default_build_timeout_s", DEFAULT_BUILD_TIMEOUT_S)
        return build if given else replace(build, timeout_s=float(default))

    @model_validator(mode="after")
    def _check_image_needed(self) -> BuildSpec:
        if self.runtime == "container" and self.image is None:
            refuse(("image", "is required"))
        return self


_CONTAINER_ONLY_RUN_FIELDS = ("host_port", "memory", "cpus", "pids")
_SWARM_ONLY_RUN_FIELDS = ("replicas", "constraints")


def _read_constraints(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        invalid("must be a list of placement constraints such as 'node.role==manager'")
    problems = [((index,), "must be KEY==VALUE or KEY!=VALUE, e.g. node.labels.zone==eu-1")
                for index, item in enumerate(value) if len(item) > 256 or not _CONSTRAINT.fullmatch(item)]
    if problems:
        refuse(*problems)
    return tuple(value)


@dataclass(frozen=True)
class RunSpec(RequestObject):
    runtime: RunRuntime = "container"
    image: ImageReference | None = None
    command: Command | None = None
    port: Port | None = None
    env: Env = field(default_factory=dict)
    host_port: Port | None = None
    bind: Annotated[str, PlainValidator(_read_bind, json_schema_input_type=str)] = DEFAULT_BIND
    # Limits of the release container; None takes the [docker] release_* default.
    memory: Annotated[int, PlainValidator(_read_release_memory, json_schema_input_type=int | str)] | None = None
    cpus: Annotated[float, Strict(), Between(0.01, 1024)] | None = None
    pids: Annotated[int, Strict(), Between(1, MAX_RELEASE_PIDS)] | None = None
    # Swarm only: how many tasks run the release, and where they may be placed.
    replicas: Annotated[int, Strict(), Between(0, MAX_REPLICAS)] | None = None
    constraints: Annotated[tuple[str, ...], PlainValidator(_read_constraints, json_schema_input_type=list[str])] = ()

    @classmethod
    def input_defaults(cls, context: Mapping[str, Any]) -> dict[str, Any]:
        allowed = bind_addresses(context)
        return {"bind": DEFAULT_BIND if DEFAULT_BIND in allowed else allowed[0]}

    @model_validator(mode="after")
    def _check_runtime_fields(self) -> RunSpec:
        problems: list[tuple[str, str]] = []
        if self.runtime == "process":
            if self.command is None:
                problems.append(("command", "is required"))
            problems += [
                (name, "is only for container releases; a process release runs unconfined")
                for name in _CONTAINER_ONLY_RUN_FIELDS
                if getattr(self, name) is not None
            ]
        if self.runtime != "swarm":
            problems += [(name, "is only for swarm releases (runtime \"swarm\")")
                         for name in _SWARM_ONLY_RUN_FIELDS if getattr(self, name)]
        if problems:
            refuse(*problems)
        return self


@dataclass(frozen=True)
class HealthCheckSpec(RequestObject):
    type: Literal["http", "tcp"] = "http"
    path: Annotated[str, Strict(), Field(min_length=1, max_length=2048), AfterValidator(_check_http_path)] = "/"
    port: Port | None = None
    interval_s: PollSeconds = 1.0
    timeout_s: PollSeconds = 2.0
    retries: Annotated[int, Strict(), Between(1, 10000)] = 30
    start_period_s: Seconds = 0.0
    stable_s: Seconds = 5.0


@dataclass(frozen=True)
class CallbackSpec(RequestObject):
    """Where the agent POSTs the deployment's status changes (signed with `[callbacks] secret`)."""

    url: Annotated[str, Strict(), Field(min_length=1, max_length=2048), AfterValidator(_check_callback_url)]


@dataclass(frozen=True)
class DeploymentSpec(RequestObject):
    """What a client asked for, validated; the rest of the agent trusts it."""

    application: Annotated[
        str,
        Strict(),
        # The pattern is for the published schema: the validator applies it, and Docker's rules besides.
        Field(min_length=1, max_length=63, json_schema_extra={"pattern": f"^{APPLICATION_PATTERN.pattern}$"}),
        AfterValidator(_check_application),
    ]
    server: Annotated[str, Strict(), Field(min_length=1, max_length=4096), AfterValidator(_check_server)] = LOCAL_SERVER
    source: SourceSpec | None = None
    build: BuildSpec | None = None
    run: RunSpec | None = None
    health_check: HealthCheckSpec | None = None
    metadata: Metadata = field(default_factory=dict)
    callback: CallbackSpec | None = None

    @classmethod
    def input_defaults(cls, context: Mapping[str, Any]) -> dict[str, Any]:
        default = context.get("default_callback_url")
        return {"callback": {"url": default}} if default else {}

    @model_validator(mode="after")
    def _check_parts_fit(self, info: ValidationInfo) -> DeploymentSpec:
        build, run, health = self.build, self.run, self.health_check
        problems: list[tuple[tuple[str, str] | str, str]] = []
        if health is not None and run is None:
            problems.append(("health_check", "needs a run"))
        container_run_without_image = run is not None and run.runtime in ("container", "swarm") and run.image is None
        if build is not None and build.runtime == "process":
            if self.server == LOCAL_SERVER:
                problems.append((
                    ("build", "runtime"),
                    "'process' builds run only on remote servers ([servers.*]) that have no Docker; "
                    "a local build runs in a container from build.image",
                ))
            if container_run_without_image:
                problems.append(
                    (("run", "image"), "is required: a process build leaves no image to start a container from")
                )
        if container_run_without_image and build is None:
            problems.append((("run", "image"), "is required when there is no build to start the release from"))
        if run is not None and run.runtime == "swarm":
            if self.server != LOCAL_SERVER:
                problems.append((("run", "runtime"), "'swarm' runs on the swarm of this agent's engine: server must be 'local'"))
            if not (info.context or {}).get("registry", True):
                problems.append((("run", "runtime"), "'swarm' needs [registry] url in the agent's config: "
                                 "its nodes pull the release image from there"))
        unchecked = run is not None and run.runtime in ("container", "swarm") and run.port is None
        if health is not None and unchecked and health.port is None:
            problems.append(
                (("health_check", "port"), "is required when run.port is not set: there is nothing to check")
            )
        if problems:
            refuse(*problems)
        return self

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
        callback = data.get("callback")
        return cls(
            application=data["application"],
            server=data.get("server", LOCAL_SERVER),
            source=SourceSpec(**source) if source else None,
            build=BuildSpec(**{**build, "command": command(build["command"])}) if build else None,
            run=RunSpec(**{**run, "command": command(run.get("command")), "constraints": tuple(run.get("constraints") or ())})
            if run else None,
            health_check=HealthCheckSpec(**health) if health else None,
            metadata=data.get("metadata") or {},
            callback=CallbackSpec(**callback) if callback else None,
        )
