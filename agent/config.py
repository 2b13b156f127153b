"""The agent's configuration: TOML loaded once into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from agent.errors import ConfigError

SCOPES: frozenset[str] = frozenset({"deployments:read", "deployments:write", "processes:write", "admin"})
DEFAULT_LISTEN = "127.0.0.1:8420"
DEFAULT_STATE_DIR = "./.deploy-agent"
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_LISTEN_PATTERN = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$"
)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


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


@dataclass(frozen=True)
class AgentSettings:
    listen: Listen = Listen("127.0.0.1", 8420)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    max_concurrent: int = 4
    max_queued: int = 1000
    max_body_bytes: int = 1024 * 1024
    kill_grace_s: float = 10.0
    shutdown_grace_s: float = 30.0
    default_build_timeout_s: float = 600.0
    log_level: str = "info"
    # A deployment's log holds at most this much; beyond it output is counted, not written.
    max_log_bytes: int = 100 * 1024**2
    # Below this much free space in state_dir, POST answers 503 disk_full.
    min_free_bytes: int = 256 * 1024**2
    # Followed log streams (`logs?follow=true`) open at once, in all and per token.
    max_log_followers: int = 256
    max_log_followers_per_token: int = 32
    # Open client connections beyond which new ones are refused, and how long a connection
    # may take to send its request headers before it is closed.
    max_connections: int = 512
    header_timeout_s: float = 10.0


@dataclass(frozen=True)
class DockerSettings:
    url: str | None = None
    build_memory_bytes: int | None = 2 * 1024**3
    build_cpus: float | None = 2.0
    build_pids: int | None = 1024
    release_memory_bytes: int = 1024**3
    release_cpus: float = 1.0
    release_pids: int = 512
    # Host addresses a release may publish its port on (`run.bind`); loopback only by default.
    bind_addresses: tuple[str, ...] = ("127.0.0.1",)


@dataclass(frozen=True)
class SecuritySettings:
    """What a deployments:write token may reach beyond its containers."""

    # runtime "process" (build or run) also needs the token scope processes:write.
    allow_host_processes: bool = False
    # Directories path sources (and local git URLs) may come from, compared after realpath.
    source_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ReleaseSettings:
    retention: int = 5  # release images kept per application, for rollbacks
    drain_s: float = 2.0  # how long a replaced release keeps serving after the switch


@dataclass(frozen=True)
class TokenConfig:
    """One API token; only its SHA-256 digest is kept, so it cannot leak through repr or logs."""

    name: str
    token_sha256: str = field(repr=False)
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ServerConfig:
    name: str
    host: str
    user: str
    identity_file: str | None = None
    known_hosts: str | None = None
    port: int = 22
    docker_socket: str = "/var/run/docker.sock"
    use_ssh_agent: bool = False  # also offer the keys of the agent's SSH agent ($SSH_AUTH_SOCK)


@dataclass(frozen=True)
class Config:
    agent: AgentSettings = AgentSettings()
    docker: DockerSettings = DockerSettings()
    releases: ReleaseSettings = ReleaseSettings()
    tokens: tuple[TokenConfig, ...] = ()
    servers: Mapping[str, ServerConfig] = field(default_factory=dict)
    security: SecuritySettings = SecuritySettings()
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
        reader = _Reader()
        reader.unknown(data, "", {"agent", "docker", "releases", "auth", "servers", "security"})
        agent = _read_agent(reader, reader.table(data, "agent"), base_dir)
        docker = _read_docker(reader, reader.table(data, "docker"))
        releases_table = reader.table(data, "releases")
        reader.unknown(releases_table, "releases.", {"retention", "drain_s"})
        drain = reader.typed(releases_table, "drain_s", "releases.drain_s", (int, float), ReleaseSettings.drain_s)
        if drain < 0:
            reader.problem("releases.drain_s", "must be 0 or more")
            drain = ReleaseSettings.drain_s
        releases = ReleaseSettings(
            retention=reader.positive(releases_table, "retention", "releases.retention", ReleaseSettings.retention, (int,)),
            drain_s=float(drain),
        )
        tokens = _read_tokens(reader, reader.table(data, "auth"))
        servers = _read_servers(reader, reader.table(data, "servers"))
        security = _read_security(reader, reader.table(data, "security"), base_dir)
        if reader.problems:
            raise ConfigError(reader.problems)
        return cls(
            agent=agent, docker=docker, releases=releases, tokens=tokens, servers=servers, security=security
        )


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


def parse_size(value: Any) -> int:
    """Parses a byte size: an integer, or a string such as "512m" or "2GiB"."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512m or 2g")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = _SIZE_PATTERN.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError("must be a size such as 512m or 2g")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _Reader:
    """Reads typed values out of the TOML tree, collecting every problem by key name."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def unknown(self, table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.problem(f"{prefix}{key}", "unknown key")

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, f"must be a table, got {_type_name(value)}")
            return {}
        return value

    def typed(self, table: Mapping[str, Any], key: str, name: str, kinds: tuple[type, ...], default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = " or ".join(_KIND_NAMES[kind] for kind in kinds)
            self.problem(name, f"must be {wanted}, got {_type_name(value)}")
            return default
        return value

    def size(self, table: Mapping[str, Any], key: str, name: str, default: int, *, allow_zero: bool = False) -> int:
        """A byte size: an integer, or a string such as "512m" or "2g"."""
        if key not in table:
            return default
        if allow_zero and table[key] == 0 and not isinstance(table[key], bool):
            return 0
        try:
            return parse_size(table[key])
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def positive(self, table: Mapping[str, Any], key: str, name: str, default: Any, kinds: tuple[type, ...]) -> Any:
        value = self.typed(table, key, name, kinds, default)
        if value is not None and value <= 0:
            self.problem(name, "must be greater than 0")
            return default
        return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _read_agent(reader: _Reader, table: Mapping[str, Any], base_dir: Path | None) -> AgentSettings:
    defaults = AgentSettings()
    reader.unknown(
        table,
        "agent.",
        {
            "listen", "state_dir", "max_concurrent", "max_queued", "max_body_bytes", "kill_grace_s",
            "shutdown_grace_s", "default_build_timeout_s", "log_level", "max_log_bytes", "min_free_bytes",
            "max_log_followers", "max_log_followers_per_token", "max_connections", "header_timeout_s",
        },
    )
    listen = defaults.listen
    listen_text = reader.typed(table, "listen", "agent.listen", (str,), None)
    if listen_text is not None:
        try:
            listen = parse_listen(listen_text)
        except ValueError as exc:
            reader.problem("agent.listen", str(exc))
    state_dir_text = reader.typed(table, "state_dir", "agent.state_dir", (str,), None)
    state_dir = defaults.state_dir
    if state_dir_text is not None:
        if not state_dir_text:
            reader.problem("agent.state_dir", "must not be empty")
        else:
            state_dir = Path(state_dir_text)
            if not state_dir.is_absolute() and base_dir is not None:
                state_dir = base_dir / state_dir
    log_level = reader.typed(table, "log_level", "agent.log_level", (str,), defaults.log_level)
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        reader.problem("agent.log_level", "must be one of debug, info, warning, error")
        log_level = defaults.log_level
    number = (int, float)
    return AgentSettings(
        listen=listen,
        state_dir=state_dir,
        max_concurrent=reader.positive(table, "max_concurrent", "agent.max_concurrent", defaults.max_concurrent, (int,)),
        max_queued=reader.positive(table, "max_queued", "agent.max_queued", defaults.max_queued, (int,)),
        max_body_bytes=reader.positive(table, "max_body_bytes", "agent.max_body_bytes", defaults.max_body_bytes, (int,)),
        kill_grace_s=float(reader.positive(table, "kill_grace_s", "agent.kill_grace_s", defaults.kill_grace_s, number)),
        shutdown_grace_s=float(
            reader.positive(table, "shutdown_grace_s", "agent.shutdown_grace_s", defaults.shutdown_grace_s, number)
        ),
        default_build_timeout_s=float(
            reader.positive(
                table, "default_build_timeout_s", "agent.default_build_timeout_s", defaults.default_build_timeout_s, number
            )
        ),
        log_level=log_level.lower(),
        max_log_bytes=reader.size(table, "max_log_bytes", "agent.max_log_bytes", defaults.max_log_bytes),
        min_free_bytes=reader.size(
            table, "min_free_bytes", "agent.min_free_bytes", defaults.min_free_bytes, allow_zero=True
        ),
        max_log_followers=reader.positive(
            table, "max_log_followers", "agent.max_log_followers", defaults.max_log_followers, (int,)
        ),
        max_log_followers_per_token=reader.positive(
            table, "max_log_followers_per_token", "agent.max_log_followers_per_token",
            defaults.max_log_followers_per_token, (int,),
        ),
        max_connections=reader.positive(
            table, "max_connections", "agent.max_connections", defaults.max_connections, (int,)
        ),
        header_timeout_s=float(
            reader.positive(table, "header_timeout_s", "agent.header_timeout_s", defaults.header_timeout_s, number)
        ),
    )


def _read_docker(reader: _Reader, table: Mapping[str, Any]) -> DockerSettings:
    defaults = DockerSettings()
    reader.unknown(
        table,
        "docker.",
        {
            "url", "build_memory", "build_cpus", "build_pids", "release_memory", "release_cpus", "release_pids",
            "bind_addresses",
        },
    )
    number = (int, float)
    bind_addresses = reader.typed(table, "bind_addresses", "docker.bind_addresses", (list,), None)
    addresses = defaults.bind_addresses
    if bind_addresses is not None:
        clean: list[str] = []
        for address in bind_addresses:
            try:
                clean.append(str(ipaddress.ip_address(address)) if isinstance(address, str) else "")
            except ValueError:
                clean.append("")
            if not clean[-1]:
                reader.problem("docker.bind_addresses", f"{address!r} is not an IP address")
        if not bind_addresses:
            reader.problem("docker.bind_addresses", "must list at least one address (e.g. \"127.0.0.1\")")
        addresses = tuple(a for a in clean if a) or defaults.bind_addresses
    return DockerSettings(
        url=reader.typed(table, "url", "docker.url", (str,), None) or None,
        build_memory_bytes=reader.size(table, "build_memory", "docker.build_memory", defaults.build_memory_bytes),
        build_cpus=float(reader.positive(table, "build_cpus", "docker.build_cpus", defaults.build_cpus, number)),
        build_pids=reader.positive(table, "build_pids", "docker.build_pids", defaults.build_pids, (int,)),
        release_memory_bytes=reader.size(
            table, "release_memory", "docker.release_memory", defaults.release_memory_bytes
        ),
        release_cpus=float(
            reader.positive(table, "release_cpus", "docker.release_cpus", defaults.release_cpus, number)
        ),
        release_pids=reader.positive(table, "release_pids", "docker.release_pids", defaults.release_pids, (int,)),
        bind_addresses=addresses,
    )


def _read_security(reader: _Reader, table: Mapping[str, Any], base_dir: Path | None) -> SecuritySettings:
    reader.unknown(table, "security.", {"allow_host_processes", "source_roots"})
    allow = reader.typed(table, "allow_host_processes", "security.allow_host_processes", (bool,), False)
    roots_value = reader.typed(table, "source_roots", "security.source_roots", (list,), [])
    roots: list[Path] = []
    for index, root in enumerate(roots_value):
        key = f"security.source_roots[{index}]"
        if not isinstance(root, str) or not root or "\0" in root:
            reader.problem(key, "must be a non-empty path")
            continue
        path = Path(root)
        if not path.is_absolute():
            if base_dir is None:
                reader.problem(key, "must be an absolute path")
                continue
            path = base_dir / path
        # Compared after realpath, as source paths are, so a symlinked root means its target.
        roots.append(Path(os.path.realpath(path)))
    return SecuritySettings(allow_host_processes=allow, source_roots=tuple(roots))


def _read_tokens(reader: _Reader, auth: Mapping[str, Any]) -> tuple[TokenConfig, ...]:
    reader.unknown(auth, "auth.", {"tokens"})
    entries = auth.get("tokens", [])
    if not isinstance(entries, list):
        reader.problem("auth.tokens", "must be an array of tables ([[auth.tokens]])")
        return ()
    tokens: list[TokenConfig] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        key = f"auth.tokens[{index}]"
        if not isinstance(entry, dict):
            reader.problem(key, "must be a table")
            continue
        reader.unknown(entry, f"{key}.", {"name", "token", "token_sha256", "scopes"})
        name = reader.typed(entry, "name", f"{key}.name", (str,), None)
        if not entry.get("name"):
            reader.problem(f"{key}.name", "is required")
        if not name:
            name = f"token-{index}"
        elif name in names:
            reader.problem(f"{key}.name", f"duplicate token name {name!r}")
        names.add(name)
        token = reader.typed(entry, "token", f"{key}.token", (str,), None)
        digest = reader.typed(entry, "token_sha256", f"{key}.token_sha256", (str,), None)
        if token is not None and digest is not None:
            reader.problem(key, "give token or token_sha256, not both")
        elif token is None and digest is None:
            reader.problem(key, "needs token or token_sha256")
        elif token is not None and len(token) < 16:
            reader.problem(f"{key}.token", "must be at least 16 characters")
        elif digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            reader.problem(f"{key}.token_sha256", "must be 64 hex digits (a SHA-256 digest)")
        scopes = reader.typed(entry, "scopes", f"{key}.scopes", (list,), [])
        for scope in scopes:
            if not isinstance(scope, str) or scope not in SCOPES:
                reader.problem(f"{key}.scopes", f"unknown scope {scope!r}; known: {', '.join(sorted(SCOPES))}")
        if not scopes:
            reader.problem(f"{key}.scopes", "must list at least one scope")
        tokens.append(
            TokenConfig(
                name=name,
                token_sha256=(hash_token(token) if token else (digest or "")).lower(),
                scopes=frozenset(s for s in scopes if isinstance(s, str)),
            )
        )
    return tuple(tokens)


def _read_servers(reader: _Reader, table: Mapping[str, Any]) -> dict[str, ServerConfig]:
    servers: dict[str, ServerConfig] = {}
    for name, entry in table.items():
        key = f"servers.{name}"
        if name == "local":
            reader.problem(key, "'local' is reserved for this host")
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            reader.problem(key, "server names may use letters, digits, '.', '_' and '-'")
            continue
        if not isinstance(entry, dict):
            reader.problem(key, "must be a table")
            continue
        reader.unknown(entry, f"{key}.", {"host", "port", "user", "identity_file", "known_hosts", "docker_socket", "use_ssh_agent"})
        host = reader.typed(entry, "host", f"{key}.host", (str,), None)
        user = reader.typed(entry, "user", f"{key}.user", (str,), None)
        port = reader.typed(entry, "port", f"{key}.port", (int,), 22)
        if not host:
            reader.problem(f"{key}.host", "is required")
        if not user:
            reader.problem(f"{key}.user", "is required")
        if not 1 <= port <= 65535:
            reader.problem(f"{key}.port", "must be between 1 and 65535")
        known_hosts = reader.typed(entry, "known_hosts", f"{key}.known_hosts", (str,), None)
        if not known_hosts:
            reader.problem(f"{key}.known_hosts", "is required: host keys are always verified")
        servers[name] = ServerConfig(
            name=name,
            host=host or "",
            user=user or "",
            port=port,
            identity_file=reader.typed(entry, "identity_file", f"{key}.identity_file", (str,), None),
            known_hosts=known_hosts,
            docker_socket=reader.typed(
                entry, "docker_socket", f"{key}.docker_socket", (str,), "/var/run/docker.sock"
            ),
            use_ssh_agent=reader.typed(entry, "use_ssh_agent", f"{key}.use_ssh_agent", (bool,), False),
        )
    return servers
