"""Daemon startup helpers: private state dir, warnings about readable secrets, descriptor limit."""

from __future__ import annotations

import dataclasses
import os
import resource
import stat
from pathlib import Path
import pytest
from structlog.testing import capture_logs

from agent.config import Config, ServerConfig
from agent.reload import keep_restart_only, with_departed_servers
from agent.startup_checks import raise_descriptor_limit, warn_about_readable_secrets
from agent.state_dir import make_state_dir_private

PLAIN_TOKEN_CONFIG = """
[[auth.tokens]]
name = "cp"
token = "a-long-random-secret-0123"
scopes = ["admin"]
"""
DIGEST_CONFIG = f"""
[[auth.tokens]]
name = "cp"
token_sha256 = "{'ab' * 32}"
scopes = ["admin"]
"""


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    """A new state dir (and its parents' last level) is created 0700."""
    state = tmp_path / "a" / "state"
    make_state_dir_private(state)
    assert mode_of(state) == 0o700


def test_an_older_state_dir_loses_group_and_other_bits(tmp_path: Path) -> None:
    """The state dir, its entries and theirs lose group/other bits; owner bits and links stay."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "agent.db").write_text("")
    (state / "logs" / "dep_1.log").write_text("")
    (state / "link").symlink_to("/etc")
    (state / "tool").write_text("")
    for path, mode in ((state, 0o755), (state / "logs", 0o755), (state / "agent.db", 0o644),
                       (state / "logs" / "dep_1.log", 0o664), (state / "tool", 0o755)):
        os.chmod(path, mode)
    make_state_dir_private(state)
    assert mode_of(state) == 0o700 and mode_of(state / "logs") == 0o700
    assert mode_of(state / "agent.db") == 0o600
    assert mode_of(state / "logs" / "dep_1.log") == 0o600
    assert mode_of(state / "tool") == 0o700
    assert mode_of(Path("/etc")) & 0o005  # the link's target is untouched


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "agent.toml"


def config_at(path: Path, text: str, mode: int, **fields: object) -> Config:
    path.write_text(text)
    os.chmod(path, mode)
    return dataclasses.replace(Config.load(path), **fields)


def secret_warnings(config: Config) -> list[dict[str, object]]:
    with capture_logs() as logs:
        warn_about_readable_secrets(config)
    return [entry for entry in logs if entry["event"] == "secret file readable by others"]


def test_a_readable_config_with_plain_tokens_is_warned_about(config_file: Path) -> None:
    """Plain `token =` values in a 0644 config: one warning with the path and the mode."""
    warnings = secret_warnings(config_at(config_file, PLAIN_TOKEN_CONFIG, 0o644))
    assert [(w["path"], w["mode"], w["log_level"]) for w in warnings] == [(str(config_file), "0644", "warning")]


@pytest.mark.parametrize(("text", "mode"), [(PLAIN_TOKEN_CONFIG, 0o600), (DIGEST_CONFIG, 0o644)])
def test_a_private_config_or_one_with_digests_only_is_fine(config_file: Path, text: str, mode: int) -> None:
    """A 0600 config, or a readable one holding only token_sha256 digests, draws no warning."""
    assert secret_warnings(config_at(config_file, text, mode)) == []


def test_a_readable_identity_file_is_warned_about(tmp_path: Path, config_file: Path) -> None:
    """A server's identity file readable by group or others is warned about; a 0600 one is not."""
    key = tmp_path / "id_ed25519"
    key.write_text("key")
    server = ServerConfig(name="edge", host="h", user="u", identity_file=str(key), known_hosts="k")
    config = config_at(config_file, DIGEST_CONFIG, 0o600, servers={"edge": server})
    os.chmod(key, 0o640)
    assert [(w["path"], w["mode"]) for w in secret_warnings(config)] == [(str(key), "0640")]
    os.chmod(key, 0o600)
    assert secret_warnings(config) == []


def test_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    """The soft limit on open files goes up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_descriptor_limit(1024)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hard_limit_below_the_need_is_warned_about() -> None:
    """When even the hard limit is below max_connections plus spares, a warning says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with capture_logs() as logs:
        raise_descriptor_limit(hard + 1)
    assert any(entry["event"] == "open file limit is low for agent.max_connections" for entry in logs)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] == hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_reload_keeps_settings_that_need_a_restart() -> None:
    """listen, state_dir and the [docker] limits keep their running values; the changed keys are named."""
    running = Config.from_mapping({"agent": {"listen": "127.0.0.1:1", "max_concurrent": 2}})
    loaded = Config.from_mapping(
        {"agent": {"listen": "127.0.0.1:2", "state_dir": "/elsewhere", "max_concurrent": 8},
         "docker": {"build_memory": "1g"}}
    )
    config, changed = keep_restart_only(running, loaded)
    assert config.agent.listen == running.agent.listen and config.agent.state_dir == running.agent.state_dir
    assert config.docker.build_memory_bytes == running.docker.build_memory_bytes
    assert config.agent.max_concurrent == 8
    assert changed == ["agent.listen", "agent.state_dir", "docker.build_memory"]


def test_a_server_removed_by_a_reload_stays_known_to_running_work() -> None:
    """Work on a server that left the file still finds its settings; the file's servers win."""
    server = {"host": "192.0.2.1", "user": "deploy", "known_hosts": "/dev/null"}
    previous = Config.from_mapping({"servers": {"old": server, "kept": server}})
    config = Config.from_mapping({"servers": {"kept": {**server, "host": "192.0.2.2"}}})
    operating = with_departed_servers(config, previous)
    assert sorted(operating.servers) == ["kept", "old"] and operating.servers["kept"].host == "192.0.2.2"
    assert with_departed_servers(config, config) is config
