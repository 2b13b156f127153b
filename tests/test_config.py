"""Config loading and validation, and the `check-config` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import Config, Listen, hash_token, parse_listen, parse_size
from agent.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO_ROOT / "config.example.toml"
SECRET = "a-long-random-secret-value"

FULL_CONFIG = f"""
[agent]
listen = "0.0.0.0:9000"
state_dir = "/srv/agent-state"
max_concurrent = 8
max_queued = 50
max_body_bytes = 2048
kill_grace_s = 3
shutdown_grace_s = 12.5
default_build_timeout_s = 90
log_level = "DEBUG"

[docker]
url = "unix:///run/docker.sock"
build_memory = "512m"
build_cpus = 1.5
build_pids = 256

[[auth.tokens]]
name = "control-plane"
token = "{SECRET}"
scopes = ["deployments:read", "deployments:write"]

[[auth.tokens]]
name = "ops"
token_sha256 = "{hash_token("another-long-secret").upper()}"
scopes = ["admin"]

[servers.edge-1]
host = "203.0.113.10"
port = 2222
user = "deploy"
identity_file = "/etc/deploy-agent/id_ed25519"
known_hosts = "/etc/deploy-agent/known_hosts"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Config.load(write_config(tmp_path, text))
    return caught.value.problems


# --- loading -----------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    """Without a file: state under ./.deploy-agent, listen on 127.0.0.1:8420, no tokens or servers."""
    config = Config()
    assert config.agent.listen == Listen(host="127.0.0.1", port=8420)
    assert str(config.agent.listen) == "127.0.0.1:8420"
    assert config.agent.state_dir == Path(".deploy-agent")
    assert config.database_path == Path(".deploy-agent/agent.db")
    assert config.logs_dir == Path(".deploy-agent/logs")
    assert config.workspaces_dir == Path(".deploy-agent/workspaces")
    assert config.agent.max_concurrent == 4
    assert config.agent.max_queued == 1000
    assert config.agent.max_body_bytes == 1024 * 1024
    assert config.agent.log_level == "info"
    assert config.tokens == () and dict(config.servers) == {}


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    """An empty file is valid and means the defaults."""
    config = Config.load(write_config(tmp_path, ""))
    assert config.agent.listen == Config().agent.listen
    assert config.agent.max_concurrent == 4
    assert config.docker == Config().docker


def test_every_key_is_read(tmp_path: Path) -> None:
    """Each key the loader accepts ends up in the matching field."""
    config = Config.load(write_config(tmp_path, FULL_CONFIG))
    agent = config.agent
    assert agent.listen == Listen(host="0.0.0.0", port=9000)
    assert agent.state_dir == Path("/srv/agent-state")
    assert (agent.max_concurrent, agent.max_queued, agent.max_body_bytes) == (8, 50, 2048)
    assert (agent.kill_grace_s, agent.shutdown_grace_s, agent.default_build_timeout_s) == (3.0, 12.5, 90.0)
    assert agent.log_level == "debug"
    assert config.docker.url == "unix:///run/docker.sock"
    assert config.docker.build_memory_bytes == 512 * 1024**2
    assert config.docker.build_cpus == 1.5
    assert config.docker.build_pids == 256
    plane, ops = config.tokens
    assert plane.name == "control-plane" and plane.token_sha256 == hash_token(SECRET)
    assert plane.scopes == frozenset({"deployments:read", "deployments:write"})
    assert ops.token_sha256 == hash_token("another-long-secret")
    assert ops.scopes == frozenset({"admin"})
    edge = config.servers["edge-1"]
    assert (edge.host, edge.port, edge.user) == ("203.0.113.10", 2222, "deploy")
    assert edge.identity_file == "/etc/deploy-agent/id_ed25519"
    assert edge.known_hosts == "/etc/deploy-agent/known_hosts"


def test_relative_state_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """A relative state_dir is resolved against the directory holding the config file."""
    config = Config.load(write_config(tmp_path, '[agent]\nstate_dir = "state"\n'))
    assert config.agent.state_dir == tmp_path.resolve() / "state"


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """Several bad keys give one ConfigError listing every one of them."""
    problems = problems_of('[agent]\nmax_concurrent = 0\nlog_level = "loud"\nlisten = "nowhere"\n', tmp_path)
    assert [problem.split(":")[0] for problem in problems] == ["agent.listen", "agent.log_level", "agent.max_concurrent"]


# --- unknown keys and wrong types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ("[agent]\nlisten_port = 1\n", "agent.listen_port"),
        ("[docker]\nmemory = '1g'\n", "docker.memory"),
        ("[auth]\nkeys = []\n", "auth.keys"),
        (f"[[auth.tokens]]\nname = 'a'\ntoken = '{SECRET}'\nscopes = ['admin']\nexpires = 1\n", "auth.tokens[0].expires"),
        ("[servers.edge]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\npassword = 'x'\n", "servers.edge.password"),
    ],
)
def test_unknown_keys_are_named(tmp_path: Path, text: str, key: str) -> None:
    """An unknown key anywhere is an error naming it in full."""
    assert problems_of(text, tmp_path) == [f"{key}: unknown key"]


@pytest.mark.parametrize(
    ("text", "key", "wanted"),
    [
        ("[agent]\nmax_concurrent = '4'\n", "agent.max_concurrent", "an integer"),
        ("[agent]\nmax_queued = 1.5\n", "agent.max_queued", "an integer"),
        ("[agent]\nkill_grace_s = true\n", "agent.kill_grace_s", "an integer or a number"),
        ("[agent]\nlisten = 8420\n", "agent.listen", "a string"),
        ("[agent]\nstate_dir = 1\n", "agent.state_dir", "a string"),
        ("[agent]\nlog_level = 1\n", "agent.log_level", "a string"),
        ("[docker]\nbuild_pids = '10'\n", "docker.build_pids", "an integer"),
        ("[docker]\nbuild_cpus = 'two'\n", "docker.build_cpus", "an integer or a number"),
        ("[servers.edge]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\nport = '22'\n", "servers.edge.port", "an integer"),
        (f"[[auth.tokens]]\nname = 'a'\ntoken = '{SECRET}'\nscopes = 'admin'\n", "auth.tokens[0].scopes", "a list"),
    ],
)
def test_wrong_types_are_named(tmp_path: Path, text: str, key: str, wanted: str) -> None:
    """A value of the wrong type is an error naming the key and the type it must be."""
    problems = problems_of(text, tmp_path)
    assert f"{key}: must be {wanted}" in problems[0]


@pytest.mark.parametrize("table", ["agent", "docker", "auth", "servers"])
def test_sections_must_be_tables(tmp_path: Path, table: str) -> None:
    """A top-level section given as a plain value is an error naming it."""
    assert problems_of(f"{table} = 1\n", tmp_path) == [f"{table}: must be a table, got an integer"]


@pytest.mark.parametrize("key", ["max_concurrent", "max_queued", "max_body_bytes", "kill_grace_s", "shutdown_grace_s"])
def test_counts_and_durations_must_be_positive(tmp_path: Path, key: str) -> None:
    """Zero or negative counts and durations are rejected by name."""
    assert problems_of(f"[agent]\n{key} = 0\n", tmp_path) == [f"agent.{key}: must be greater than 0"]


def test_log_level_is_one_of_four(tmp_path: Path) -> None:
    """log_level accepts debug/info/warning/error in any case and nothing else."""
    assert Config.load(write_config(tmp_path, '[agent]\nlog_level = "Warning"\n')).agent.log_level == "warning"
    assert problems_of('[agent]\nlog_level = "trace"\n', tmp_path) == [
        "agent.log_level: must be one of debug, info, warning, error"
    ]


# --- tokens ------------------------------------------------------------------------------------


def token_config(body: str) -> str:
    return f"[[auth.tokens]]\nname = 'cp'\nscopes = ['admin']\n{body}\n"


def test_token_is_kept_only_as_its_digest(tmp_path: Path) -> None:
    """A plain token is stored as its SHA-256 digest."""
    (token,) = Config.load(write_config(tmp_path, token_config(f"token = '{SECRET}'"))).tokens
    assert token.token_sha256 == hash_token(SECRET)
    assert not hasattr(token, "token")


def test_token_sha256_is_accepted_and_lowercased(tmp_path: Path) -> None:
    """token_sha256 takes a hex digest in either case."""
    digest = hash_token(SECRET).upper()
    (token,) = Config.load(write_config(tmp_path, token_config(f"token_sha256 = '{digest}'"))).tokens
    assert token.token_sha256 == digest.lower()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (f"token = '{SECRET}'\ntoken_sha256 = '{'a' * 64}'", "auth.tokens[0]: give token or token_sha256, not both"),
        ("", "auth.tokens[0]: needs token or token_sha256"),
        ("token = 'short'", "auth.tokens[0].token: must be at least 16 characters"),
        ("token_sha256 = 'abc'", "auth.tokens[0].token_sha256: must be 64 hex digits (a SHA-256 digest)"),
    ],
)
def test_token_or_digest_rules(tmp_path: Path, body: str, problem: str) -> None:
    """Exactly one of token (16+ characters) and token_sha256 (64 hex digits) is required."""
    assert problems_of(token_config(body), tmp_path) == [problem]


def test_scopes_must_be_known_and_present(tmp_path: Path) -> None:
    """Unknown scopes and an empty scope list are errors naming the token's scopes key."""
    unknown = f"[[auth.tokens]]\nname = 'a'\ntoken = '{SECRET}'\nscopes = ['deployments:delete']\n"
    assert problems_of(unknown, tmp_path)[0].startswith("auth.tokens[0].scopes: unknown scope 'deployments:delete'")
    empty = f"[[auth.tokens]]\nname = 'a'\ntoken = '{SECRET}'\nscopes = []\n"
    assert problems_of(empty, tmp_path) == ["auth.tokens[0].scopes: must list at least one scope"]


def test_token_names_are_required_and_unique(tmp_path: Path) -> None:
    """Each token needs a name, and no two tokens may share one."""
    entry = f"[[auth.tokens]]\nname = 'cp'\ntoken = '{SECRET}'\nscopes = ['admin']\n"
    assert problems_of(entry + entry, tmp_path) == ["auth.tokens[1].name: duplicate token name 'cp'"]
    nameless = f"[[auth.tokens]]\ntoken = '{SECRET}'\nscopes = ['admin']\n"
    assert problems_of(nameless, tmp_path) == ["auth.tokens[0].name: is required"]


def test_auth_tokens_must_be_an_array_of_tables(tmp_path: Path) -> None:
    """[auth] tokens = "x" is an error that says how to write tokens."""
    assert problems_of("[auth]\ntokens = 'x'\n", tmp_path) == ["auth.tokens: must be an array of tables ([[auth.tokens]])"]


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    """Neither a token nor its digest shows in repr(config) or str(config)."""
    config = Config.load(write_config(tmp_path, FULL_CONFIG))
    for text in (repr(config), str(config), repr(config.tokens)):
        assert SECRET not in text
        assert hash_token(SECRET) not in text
        assert hash_token("another-long-secret") not in text
    assert "control-plane" in repr(config)


# --- servers -----------------------------------------------------------------------------------


def test_server_defaults_to_port_22(tmp_path: Path) -> None:
    """A server without a port uses 22; identity_file is optional."""
    text = "[servers.edge]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\n"
    edge = Config.load(write_config(tmp_path, text)).servers["edge"]
    assert (edge.name, edge.port, edge.identity_file) == ("edge", 22, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[servers.local]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\n", "servers.local: 'local' is reserved for this host"),
        ("[servers.edge]\nuser = 'u'\nknown_hosts = '/k'\n", "servers.edge.host: is required"),
        ("[servers.edge]\nhost = 'h'\nknown_hosts = '/k'\n", "servers.edge.user: is required"),
        ("[servers.edge]\nhost = 'h'\nuser = 'u'\n", "servers.edge.known_hosts: is required: host keys are always verified"),
        ("[servers.edge]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\nport = 0\n", "servers.edge.port: must be between 1 and 65535"),
        ("[servers.'bad name']\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\n", "servers.bad name: server names may use letters, digits, '.', '_' and '-'"),
        ("[servers]\nedge = 1\n", "servers.edge: must be a table, got an integer"),
    ],
)
def test_server_problems_are_named(tmp_path: Path, text: str, problem: str) -> None:
    """Each server problem names the server and the key."""
    assert problems_of(text, tmp_path) == [problem]


# --- listen and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8420", Listen(host="127.0.0.1", port=8420)),
        ("0.0.0.0:0", Listen(host="0.0.0.0", port=0)),
        ("localhost:80", Listen(host="localhost", port=80)),
        ("[::1]:8420", Listen(host="::1", port=8420)),
        ("unix:/run/deploy-agent/api.sock", Listen(unix_path="/run/deploy-agent/api.sock")),
    ],
)
def test_listen_forms(text: str, expected: Listen) -> None:
    """host:port, [v6]:port and unix:/absolute/path are the accepted listen forms."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("8420", "must be host:port or unix:/path"),
        ("localhost", "must be host:port or unix:/path"),
        ("localhost:", "must be host:port or unix:/path"),
        (":8420", "must be host:port or unix:/path"),
        ("localhost:http", "must be host:port or unix:/path"),
        ("localhost:65536", "port must be between 0 and 65535"),
        ("unix:api.sock", "a unix socket path must be absolute"),
        ("unix:", "a unix socket path must be absolute"),
    ],
)
def test_bad_listen_values(text: str, reason: str) -> None:
    """Malformed listen values raise ValueError with the reason."""
    with pytest.raises(ValueError, match=reason):
        parse_listen(text)


def test_bad_listen_in_a_file_names_the_key(tmp_path: Path) -> None:
    """A bad listen value in a file is reported against agent.listen."""
    assert problems_of('[agent]\nlisten = "unix:relative.sock"\n', tmp_path)[0].startswith("agent.listen: ")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("512", 512),
        ("512b", 512),
        ("64k", 64 * 1024),
        ("512m", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("2GB", 2 * 1024**3),
        ("1.5g", int(1.5 * 1024**3)),
        ("1t", 1024**4),
    ],
)
def test_sizes(value: object, size: int) -> None:
    """Sizes are bytes, or a number with a binary k/m/g/t suffix."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [0, -1, "0m", "lots", "2x", "", True, 1.5])
def test_bad_sizes(value: object) -> None:
    """Zero, negative, unit-less junk, booleans and floats are not sizes."""
    with pytest.raises(ValueError):
        parse_size(value)


def test_bad_build_memory_names_the_key(tmp_path: Path) -> None:
    """A bad docker.build_memory is reported against that key."""
    assert problems_of("[docker]\nbuild_memory = 'much'\n", tmp_path) == [
        "docker.build_memory: must be a size such as 512m or 2g"
    ]


# --- files -------------------------------------------------------------------------------------


def test_unreadable_file_is_one_problem(tmp_path: Path) -> None:
    """A missing file is a ConfigError with a single problem naming the path."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        Config.load(missing)
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_bad_toml_is_one_problem(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError with a single problem."""
    path = write_config(tmp_path, "[agent\nlisten = \n")
    with pytest.raises(ConfigError) as caught:
        Config.load(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: not valid TOML: ")


def test_example_config_is_valid() -> None:
    """config.example.toml loads, with the contract's example values."""
    config = Config.load(EXAMPLE_CONFIG)
    assert str(config.agent.listen) == "127.0.0.1:8420"
    assert config.agent.state_dir == Path("/var/lib/deploy-agent")
    assert config.agent.max_concurrent == 4
    assert {token.name for token in config.tokens} == {"control-plane", "dashboard"}


def test_example_config_mentions_every_key() -> None:
    """Every key the loader accepts is documented in config.example.toml."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    keys = [
        "listen", "state_dir", "max_concurrent", "max_queued", "max_body_bytes", "kill_grace_s",
        "shutdown_grace_s", "default_build_timeout_s", "log_level", "url", "build_memory", "build_cpus",
        "build_pids", "name", "token", "token_sha256", "scopes", "host", "port", "user", "identity_file",
        "known_hosts",
    ]
    assert [key for key in keys if f"{key} = " not in text] == []


# --- check-config ------------------------------------------------------------------------------


def test_check_config_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: exit 0 and `FILE: ok`."""
    path = write_config(tmp_path, FULL_CONFIG)
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok\n" and captured.err == ""


def test_check_config_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file: exit 2 and exactly one stderr line per problem, each naming its key."""
    path = write_config(tmp_path, "[agent]\nmax_concurrent = 'x'\nport = 1\n[docker]\nbuild_pids = 0\n")
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "config error: agent.port: unknown key",
        "config error: agent.max_concurrent: must be an integer, got a string",
        "config error: docker.build_pids: must be greater than 0",
    ]


@pytest.mark.parametrize("content", [None, "[agent\n", "x = \n"])
def test_check_config_unreadable_or_bad_toml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    """A missing file or broken TOML: exit 2 with a single line on stderr."""
    path = tmp_path / "config.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"config error: {path}: ")


def test_check_config_passes_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`deploy-agent check-config config.example.toml` succeeds."""
    assert main(["check-config", str(EXAMPLE_CONFIG)]) == 0
    assert capsys.readouterr().out == f"{EXAMPLE_CONFIG}: ok\n"


def test_console_script_check_config(tmp_path: Path) -> None:
    """The installed `deploy-agent` console script runs check-config with the same exit codes."""
    script = Path(sys.executable).parent / "deploy-agent"
    good = subprocess.run([str(script), "check-config", str(EXAMPLE_CONFIG)], capture_output=True, text=True, timeout=60)
    assert (good.returncode, good.stdout, good.stderr) == (0, f"{EXAMPLE_CONFIG}: ok\n", "")

    bad_path = write_config(tmp_path, "[agent]\nlisten = 'nowhere'\nmax_queued = -1\n")
    bad = subprocess.run([str(script), "check-config", str(bad_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "config error: agent.listen: must be host:port or unix:/path ([ipv6]:port for IPv6)",
        "config error: agent.max_queued: must be greater than 0",
    ]


@pytest.mark.parametrize("text", ["[::1", "::1:80", " :80", "local host:80"])
def test_listen_rejects_malformed_hosts(text: str) -> None:
    """Unbracketed IPv6, unclosed brackets and blank hosts are refused."""
    with pytest.raises(ValueError, match="must be host:port"):
        parse_listen(text)


def test_non_string_scope_is_a_problem_not_a_crash() -> None:
    """A scope that is a table is reported by key instead of raising TypeError."""
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"auth": {"tokens": [{"name": "a", "token": "x" * 20, "scopes": [{"a": 1}]}]}})
    assert any("auth.tokens[0].scopes" in problem for problem in caught.value.problems)


def test_server_options() -> None:
    """A server takes docker_socket and use_ssh_agent; a wrong type names the key."""
    base = {"host": "h", "user": "u", "known_hosts": "/k"}
    config = Config.from_mapping({"servers": {"edge": {**base, "docker_socket": "/run/d.sock", "use_ssh_agent": True}}})
    assert config.servers["edge"].docker_socket == "/run/d.sock" and config.servers["edge"].use_ssh_agent is True
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"servers": {"edge": {**base, "use_ssh_agent": "yes"}}})
    assert any("servers.edge.use_ssh_agent" in problem for problem in caught.value.problems)


# --- security, limits, bind addresses -------------------------------------------------------------


def test_security_limits_and_addresses_are_read(tmp_path: Path) -> None:
    """[security], release limits, sizes and bind addresses reach their fields, normalised."""
    (tmp_path / "src").mkdir()
    text = (
        "[agent]\nmin_free_bytes = 0\nmax_log_bytes = '1m'\n"
        "[docker]\nrelease_memory = '256m'\nrelease_cpus = 0.5\nrelease_pids = 64\nbind_addresses = ['0:0::1', '10.0.0.5']\n"
        "[releases]\nretention = 2\ndrain_s = 0\n"
        "[security]\nallow_host_processes = true\nsource_roots = ['src', '/srv/../srv']\n"
    )
    config = Config.load(write_config(tmp_path, text))
    assert (config.agent.min_free_bytes, config.agent.max_log_bytes) == (0, 1024**2)
    docker = config.docker
    assert (docker.release_memory_bytes, docker.release_cpus, docker.release_pids) == (256 * 1024**2, 0.5, 64)
    assert docker.bind_addresses == ("::1", "10.0.0.5")
    assert (config.releases.retention, config.releases.drain_s) == (2, 0.0)
    assert config.security.allow_host_processes is True
    assert config.security.source_roots == ((tmp_path / "src").resolve(), Path("/srv").resolve())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[docker]\nbind_addresses = []\n", ['docker.bind_addresses: must list at least one address (e.g. "127.0.0.1")']),
        ("[docker]\nbind_addresses = ['x', 3]\n", [
            "docker.bind_addresses: 'x' is not an IP address", "docker.bind_addresses: 3 is not an IP address",
        ]),
        ("[docker]\nbind_addresses = '127.0.0.1'\n", ["docker.bind_addresses: must be a list, got a string"]),
        ("[docker]\nrelease_memory = 'lots'\n", ["docker.release_memory: must be a size such as 512m or 2g"]),
        ("[docker]\nbuild_memory_bytes = 1\n", ["docker.build_memory_bytes: unknown key"]),
        ("[releases]\ndrain_s = -1\n", ["releases.drain_s: must be 0 or more"]),
        ("[security]\nallow_host_processes = 'yes'\n", ["security.allow_host_processes: must be a boolean, got a string"]),
        ("[security]\nsource_roots = ['', 3]\n", [
            "security.source_roots[0]: must be a non-empty path", "security.source_roots[1]: must be a non-empty path",
        ]),
        ("[security]\nsource_roots = '/srv'\n", ["security.source_roots: must be a list, got a string"]),
        ("[servers.edge]\nhost = 'h'\nuser = 'u'\nknown_hosts = '/k'\nname = 'x'\n", ["servers.edge.name: unknown key"]),
        ("[[auth.tokens]]\nname = ''\ntoken_sha256 = '" + "a" * 64 + "'\nscopes = ['admin']\n", [
            "auth.tokens[0].name: is required",
        ]),
    ],
)
def test_problems_of_the_newer_tables_are_named(tmp_path: Path, text: str, expected: list[str]) -> None:
    """Each problem in [docker], [releases], [security] and the servers names its key in full."""
    assert problems_of(text, tmp_path) == expected


def test_relative_source_roots_need_a_config_file() -> None:
    """Without a file to be relative to, a relative source root is refused."""
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"security": {"source_roots": ["src"]}})
    assert caught.value.problems == ["security.source_roots[0]: must be an absolute path"]


def test_callbacks_need_a_secret_and_read_it_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("a-callback-secret-of-32-characters\n")
    config = Config.from_mapping({"callbacks": {"secret_file": "secret", "url": "https://cp/hook"}}, base_dir=tmp_path)
    assert config.callbacks is not None and config.callbacks.secret == "a-callback-secret-of-32-characters"
    assert "a-callback-secret" not in repr(config)
    assert Config.from_mapping({}).callbacks is None
    for table, problem in (
        ({}, "callbacks: needs secret or secret_file"),
        ({"secret": "short"}, "callbacks.secret: must be at least 16 characters"),
        ({"secret": "s" * 16, "secret_file": "x"}, "callbacks: give secret or secret_file, not both"),
        ({"secret": "s" * 16, "url": "file:///etc/passwd"}, "callbacks.url: must be an http:// or https:// URL"),
        ({"secret": "s" * 16, "max_attempts": 0}, "callbacks.max_attempts: must be greater than 0"),
        ({"secret_file": "missing"}, "callbacks.secret_file: cannot read"),
    ):
        with pytest.raises(ConfigError) as caught:
            Config.from_mapping({"callbacks": table}, base_dir=tmp_path)
        assert problem in str(caught.value), (table, str(caught.value))
