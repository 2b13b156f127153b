"""The agent's configuration: TOML validated once into frozen dataclasses whose annotations are its schema.

Each table is a dataclass validated by pydantic (`Config.load`); code that builds one
itself (tests, `dataclasses.replace`) is not validated again. A problem names its key
("agent.max_concurrent: must be an integer, got a string"); all of them come at once.
It runs past 400 lines because it is the one declaration of every config key: splitting
the tables apart would spread that schema over several files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, PlainValidator, Strict, TypeAdapter
from pydantic import ValidationError, ValidationInfo, model_validator

from agent.errors import ConfigError
from agent.specs import is_callback_url
from agent.validation import UNKNOWN, Between, Location, dotted, invalid, kind_of, parse_size, problems_of, refuse

SCOPES: frozenset[str] = frozenset({"deployments:read", "deployments:write", "processes:write", "admin"})
DEFAULT_LISTEN = "127.0.0.1:8420"
DEFAULT_STATE_DIR = "./.deploy-agent"
LOG_LEVELS = ("debug", "info", "warning", "error")
_LISTEN_PATTERN = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$"
)
_SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

# How pydantic's own checks are worded; `{type}` is what was given ("a string", "a table").
MESSAGES = {
    "missing": "is required",
    UNKNOWN: "unknown key",
    "int_type": "must be an integer, got {type}",
    "float_type": "must be an integer or a number, got {type}",
    "string_type": "must be a string, got {type}",
    "bool_type": "must be a boolean, got {type}",
    "tuple_type": "must be a list, got {type}",
    "frozen_set_type": "must be a list, got {type}",
    "dataclass_type": "must be a table, got {type}",
    "dict_type": "must be a table, got {type}",
    "greater_than": "must be greater than {gt:g}",
    "greater_than_equal": "must be {ge:g} or more",
    "string_too_short": "must not be empty",
    "literal_error": "must be {expected}",
}


@dataclass(frozen=True)
class Listen:
    """Where the API listens: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(value: str) -> Listen:
    """Parses `host:port`, `[v6]:port` or `unix:/path`; raises ValueError with the reason."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError("a unix socket path must be absolute, as in unix:/run/deploy-agent/api.sock")
        return Listen(unix_path=path)
    match = _LISTEN_PATTERN.match(value)
    if not match:
        raise ValueError("must be host:port or unix:/path ([ipv6]:port for IPv6)")
    port = int(match.group("port"))
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return Listen(host=match.group("v6") or match.group("host"), port=port)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- field rules ---------------------------------------------------------------------------


def _string(value: Any, key: str = "") -> str:
    if not isinstance(value, str):
        refuse((key, f"must be a string, got {kind_of(value)}"))
    return value


def _read_listen(value: Any) -> Listen:
    try:
        return parse_listen(_string(value))
    except ValueError as exc:
        invalid(str(exc))


def _read_state_dir(value: Any, info: ValidationInfo) -> Path:
    """A directory; a relative one is relative to the config file's directory."""
    if not _string(value):
        invalid("must not be empty")
    path, base_dir = Path(value), (info.context or {}).get("base_dir")
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def _read_source_root(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        invalid("must be a non-empty path")
    path, base_dir = Path(value), (info.context or {}).get("base_dir")
    if not path.is_absolute():
        if base_dir is None:
            invalid("must be an absolute path")
        path = base_dir / path
    # Compared after realpath, as source paths are, so a symlinked root means its target.
    return Path(os.path.realpath(path))


def _read_log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        invalid(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _read_size(value: Any) -> int:
    """A byte size: an integer, or a string such as "512m" or "2g"."""
    try:
        return parse_size(value)
    except ValueError as exc:
        invalid(str(exc))


def _read_size_or_zero(value: Any) -> int:
    return 0 if value == 0 and not isinstance(value, bool) else _read_size(value)


def _read_bind_addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        invalid(f"must be a list, got {kind_of(value)}")
    if not value:
        invalid('must list at least one address (e.g. "127.0.0.1")')
    addresses, problems = [], []
    for address in value:
        try:
            # ip_address also takes an integer, which a file never means as an address.
            addresses.append(str(ipaddress.ip_address(address if isinstance(address, str) else "")))
        except ValueError:
            problems.append(("", f"{address!r} is not an IP address"))
    if problems:
        refuse(*problems)
    return tuple(addresses)


def _read_digest(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        invalid("must be 64 hex digits (a SHA-256 digest)")
    return digest.lower()


def _check_scopes(scopes: frozenset[str]) -> frozenset[str]:
    if not scopes:
        invalid("must list at least one scope")
    unknown = sorted(scopes - SCOPES)
    if unknown:
        refuse(*(("", f"unknown scope {scope!r}; known: {', '.join(sorted(SCOPES))}") for scope in unknown))
    return scopes


def _check_server_name(name: str) -> str:
    if name == "local":
        invalid("'local' is reserved for this host")
    if not _SERVER_NAME.fullmatch(name):
        invalid("server names may use letters, digits, '.', '_' and '-'")
    return name


def _check_callback_url(url: str) -> str:
    if not is_callback_url(url):
        invalid("must be an http:// or https:// URL with a host")
    return url


def _require(text: str) -> str:
    if not text:
        invalid("is required")
    return text


def _require_known_hosts(path: str | None) -> str | None:
    if not path:
        invalid("is required: host keys are always verified")
    return path


def _name_servers(table: Any) -> Any:
    """Each [servers.NAME] table with its name, which only the table's key gives."""
    if not isinstance(table, dict):
        return table
    for name, entry in table.items():
        if isinstance(entry, dict) and "name" in entry:
            refuse(((name, "name"), MESSAGES[UNKNOWN]))
    return {name: {**entry, "name": name} if isinstance(entry, dict) else entry for name, entry in table.items()}


def _array_of_tables(value: Any) -> Any:
    if not isinstance(value, list):
        invalid("must be an array of tables ([[auth.tokens]])")
    return value


Text = Annotated[str, Strict()]
RequiredText = Annotated[str, Strict(), AfterValidator(_require)]
Flag = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(gt=0)]
Seconds = Annotated[float, Strict(), Field(gt=0)]
Size = Annotated[int, PlainValidator(_read_size, json_schema_input_type=int | str)]


class Table:
    """Base of the config's tables: a key the table does not have is an error."""

    __pydantic_config__ = ConfigDict(extra="forbid")


# --- tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSettings(Table):
    listen: Annotated[Listen, PlainValidator(_read_listen, json_schema_input_type=str)] = Listen("127.0.0.1", 8420)
    state_dir: Annotated[Path, PlainValidator(_read_state_dir, json_schema_input_type=str)] = Path(DEFAULT_STATE_DIR)
    max_concurrent: Count = 4
    max_queued: Count = 1000
    max_body_bytes: Count = 1024 * 1024
    kill_grace_s: Seconds = 10.0
    shutdown_grace_s: Seconds = 30.0
    # On SIGTERM/SIGINT: "detach" leaves builds and releases running for the next start to
    # re-adopt; "drain" waits up to shutdown_grace_s for them, then stops them.
    on_stop: Literal["detach", "drain"] = "detach"
    default_build_timeout_s: Seconds = 600.0
    log_level: Annotated[str, Strict(), AfterValidator(_read_log_level)] = "info"
    # A deployment's log holds at most this much; beyond it output is counted, not written.
    max_log_bytes: Size = 100 * 1024**2
    # Below this much free space in state_dir, POST answers 503 disk_full.
    min_free_bytes: Annotated[int, PlainValidator(_read_size_or_zero, json_schema_input_type=int | str)] = 256 * 1024**2
    # Followed log streams (`logs?follow=true`) open at once, in all and per token.
    max_log_followers: Count = 256
    max_log_followers_per_token: Count = 32
    # Open client connections beyond which new ones are refused, and how long a connection
    # may take to send its request headers before it is closed.
    max_connections: Count = 512
    header_timeout_s: Seconds = 10.0


@dataclass(frozen=True)
class DockerSettings(Table):
    url: Annotated[str, Strict(), AfterValidator(lambda url: url or None)] | None = None
    build_memory_bytes: Annotated[Size | None, Field(validation_alias="build_memory")] = 2 * 1024**3
    build_cpus: Seconds | None = 2.0
    build_pids: Count | None = 1024
    release_memory_bytes: Annotated[Size, Field(validation_alias="release_memory")] = 1024**3
    release_cpus: Seconds = 1.0
    release_pids: Count = 512
    # Host addresses a release may publish its port on (`run.bind`); loopback only by default.
    bind_addresses: Annotated[
        tuple[str, ...], PlainValidator(_read_bind_addresses, json_schema_input_type=list[str])
    ] = ("127.0.0.1",)


@dataclass(frozen=True)
class SecuritySettings(Table):
    """What a deployments:write token may reach beyond its containers."""

    # runtime "process" (build or run) also needs the token scope processes:write.
    allow_host_processes: Flag = False
    # Directories path sources (and local git URLs) may come from, compared after realpath.
    source_roots: tuple[Annotated[Path, PlainValidator(_read_source_root, json_schema_input_type=str)], ...] = ()


@dataclass(frozen=True)
class ReleaseSettings(Table):
    retention: Count = 5  # release images kept per application, for rollbacks
    drain_s: Annotated[float, Strict(), Field(ge=0)] = 2.0  # how long a replaced release keeps serving after the switch


MIN_CALLBACK_SECRET_LENGTH = 16


@dataclass(frozen=True)
class CallbackSettings(Table):
    """Signed status callbacks: the secret they are signed with, a default URL, and the retry policy."""

    secret: Annotated[str, Strict()] = field(repr=False)
    url: Annotated[str, Strict(), AfterValidator(_check_callback_url)] | None = None
    max_attempts: Count = 10
    timeout_s: Seconds = 10.0
    # The first retry waits this long, each next one twice as long, up to max_backoff_s.
    backoff_s: Seconds = 1.0
    max_backoff_s: Seconds = 300.0

    @model_validator(mode="before")
    @classmethod
    def _secret_of_file(cls, entry: Any, info: ValidationInfo) -> Any:
        """`secret_file` is read at load: the secret itself is what signs, and only memory keeps it."""
        if not isinstance(entry, dict):
            return entry
        if "secret" in entry and "secret_file" in entry:
            invalid("give secret or secret_file, not both")
        if "secret_file" in entry:
            entry = dict(entry)
            path = Path(_string(entry.pop("secret_file"), "secret_file"))
            base_dir = (info.context or {}).get("base_dir")
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                entry["secret"] = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                refuse(("secret_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"))
        if "secret" not in entry:
            invalid("needs secret or secret_file: callbacks are always signed")
        if len(_string(entry["secret"], "secret")) < MIN_CALLBACK_SECRET_LENGTH:
            refuse(("secret", f"must be at least {MIN_CALLBACK_SECRET_LENGTH} characters"))
        return entry


@dataclass(frozen=True)
class TokenConfig(Table):
    """One API token; only its SHA-256 digest is kept, so it cannot leak through repr or logs."""

    name: RequiredText
    token_sha256: Annotated[str, Strict(), AfterValidator(_read_digest)] = field(repr=False)
    scopes: Annotated[frozenset[Text], Field(validate_default=True), AfterValidator(_check_scopes)] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _digest_of_token(cls, entry: Any) -> Any:
        """A file gives the token or its digest; the token itself is hashed at once and never kept."""
        if not isinstance(entry, dict):
            return entry
        if "token" in entry and "token_sha256" in entry:
            invalid("give token or token_sha256, not both")
        if "token" not in entry:
            if "token_sha256" not in entry:
                invalid("needs token or token_sha256")
            return entry
        entry = dict(entry)
        token = entry.pop("token")
        if len(_string(token, "token")) < 16:
            refuse(("token", "must be at least 16 characters"))
        return {**entry, "token_sha256": hash_token(token)}


@dataclass(frozen=True)
class ServerConfig(Table):
    name: Text
    host: RequiredText
    user: RequiredText
    identity_file: Text | None = None
    known_hosts: Annotated[Text | None, Field(validate_default=True), AfterValidator(_require_known_hosts)] = None
    port: Annotated[int, Strict(), Between(1, 65535)] = 22
    docker_socket: Text = "/var/run/docker.sock"
    use_ssh_agent: Flag = False  # also offer the keys of the agent's SSH agent ($SSH_AUTH_SOCK)


@dataclass(frozen=True)
class AuthTable(Table):
    tokens: Annotated[tuple[TokenConfig, ...], BeforeValidator(_array_of_tables)] = ()

    @model_validator(mode="after")
    def _check_names_unique(self) -> AuthTable:
        seen: set[str] = set()
        duplicates = []
        for index, token in enumerate(self.tokens):
            if token.name in seen:
                duplicates.append((("tokens", index, "name"), f"duplicate token name {token.name!r}"))
            seen.add(token.name)
        if duplicates:
            refuse(*duplicates)
        return self


_REGISTRY = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[a-z0-9._/-]+)?")


def _check_registry_url(url: str) -> str:
    if not _REGISTRY.fullmatch(url):
        invalid("must be a registry address such as 127.0.0.1:5000 or registry.example.com (no scheme)")
    return url


@dataclass(frozen=True)
class RegistrySettings(Table):
    """Where release images of swarm applications are pushed for every node to pull."""

    url: Annotated[str, Strict(), AfterValidator(_check_registry_url)]
    username: Annotated[str, Strict(), Field(min_length=1)] | None = None
    password: Annotated[str, Strict()] | None = field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _password_of_file(cls, entry: Any, info: ValidationInfo) -> Any:
        """`password_file` is read at load, as `[callbacks] secret_file` is; a password needs a username."""
        if not isinstance(entry, dict):
            return entry
        if "password" in entry:
            invalid("give password_file (a file only the agent's user can read), not the password itself")
        if "password_file" in entry:
            entry = dict(entry)
            path = Path(_string(entry.pop("password_file"), "password_file"))
            base_dir = (info.context or {}).get("base_dir")
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                entry["password"] = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                refuse(("password_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"))
            if "username" not in entry:
                refuse(("username", "is required with password_file"))
        return entry


@dataclass(frozen=True)
class ConfigFile(Table):
    """The file as written: its tables, before they become a `Config`."""

    agent: AgentSettings = AgentSettings()
    docker: DockerSettings = DockerSettings()
    releases: ReleaseSettings = ReleaseSettings()
    auth: AuthTable = AuthTable()
    servers: Annotated[
        dict[Annotated[str, AfterValidator(_check_server_name)], ServerConfig], BeforeValidator(_name_servers)
    ] = field(default_factory=dict)
    security: SecuritySettings = SecuritySettings()
    callbacks: CallbackSettings | None = None
    registry: RegistrySettings | None = None


@dataclass(frozen=True)
class Config:
    agent: AgentSettings = AgentSettings()
    docker: DockerSettings = DockerSettings()
    releases: ReleaseSettings = ReleaseSettings()
    tokens: tuple[TokenConfig, ...] = ()
    servers: Mapping[str, ServerConfig] = field(default_factory=dict)
    security: SecuritySettings = SecuritySettings()
    callbacks: CallbackSettings | None = None
    registry: RegistrySettings | None = None
    # The file this config was read from (None for built-in defaults); its directory is never a source.
    path: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.agent.state_dir / "agent.db"

    @property
    def logs_dir(self) -> Path:
        return self.agent.state_dir / "logs"

    @property
    def workspaces_dir(self) -> Path:
        return self.agent.state_dir / "workspaces"

    @property
    def releases_dir(self) -> Path:
        """Workspaces of host-process releases, one directory per deployment."""
        return self.agent.state_dir / "releases"

    @property
    def run_dir(self) -> Path:
        """Runtime files of host processes (pid and exit files)."""
        return self.agent.state_dir / "run"

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Reads and validates a TOML file; raises ConfigError listing every problem."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        config = cls.from_mapping(data, base_dir=Path(path).resolve().parent)
        return dataclasses.replace(config, path=Path(path).resolve())

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> "Config":
        """Validates a parsed TOML document; relative paths in it are relative to `base_dir`."""
        try:
            file = _config_file().validate_python(data, context={"base_dir": base_dir})
        except ValidationError as error:
            problems = sorted(problems_of(error, MESSAGES), key=_problem_order)
            raise ConfigError([f"{dotted(location)}: {message}" for location, message in problems]) from None
        return cls(
            agent=file.agent, docker=file.docker, releases=file.releases, tokens=file.auth.tokens,
            servers=file.servers, security=file.security, callbacks=file.callbacks, registry=file.registry,
        )


@cache
def _config_file() -> TypeAdapter[ConfigFile]:
    """Built on first use, as the client commands never read a config file."""
    return TypeAdapter(ConfigFile)


def _problem_order(problem: tuple[Location, str]) -> tuple[tuple[int, str], ...]:
    """By key, and within a table its unknown keys first: a typo usually explains the rest."""
    location, message = problem
    unknown = message == MESSAGES[UNKNOWN]
    return tuple(
        (0 if unknown and index == len(location) - 1 else 1, f"{part:09d}" if isinstance(part, int) else part)
        for index, part in enumerate(location)
    )
