"""Config reload on SIGHUP: what a reload may change, and what keeps its running value until a restart.

An invalid file, or a token file that cannot be read, changes nothing: the running config stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog

from agent import systemd
from agent.config import Config
from agent.errors import ConfigError
from agent.startup_checks import warn_about_readable_secrets
from agent.state_dir import ensure_token

logger = structlog.get_logger("agent.reload")

# Settings read once at startup: a reload keeps their running values. (table, field, key in the file)
RESTART_ONLY: tuple[tuple[str, str, str], ...] = (
    ("agent", "listen", "listen"),
    ("agent", "state_dir", "state_dir"),
    ("agent", "max_connections", "max_connections"),
    ("agent", "header_timeout_s", "header_timeout_s"),
    ("agent", "max_body_bytes", "max_body_bytes"),
    ("agent", "kill_grace_s", "kill_grace_s"),
    ("docker", "url", "url"),
    ("docker", "build_memory_bytes", "build_memory"),
    ("docker", "build_cpus", "build_cpus"),
    ("docker", "build_pids", "build_pids"),
    ("docker", "release_memory_bytes", "release_memory"),
    ("docker", "release_cpus", "release_cpus"),
    ("docker", "release_pids", "release_pids"),
)


async def reload_config(running: Config, apply: Callable[[Config], None]) -> bool:
    """Reads `running`'s config file again and hands the result to `apply`; False when nothing changed.

    Keys that only take effect at startup (RESTART_ONLY) keep their running values, and a
    warning names those that changed. systemd hears RELOADING=1 before and READY=1 after.
    """
    path = running.path
    if path is None:
        logger.warning("reload ignored: the agent was started without --config")
        return False
    systemd.notify_reloading()
    try:
        try:
            loaded = await asyncio.to_thread(Config.load, path)
        except ConfigError as exc:
            logger.error(
                "config reload refused: the file is invalid, the running config stays",
                path=str(path), problems=exc.problems,
            )
            return False
        config, needs_restart = keep_restart_only(running, loaded)
        try:
            config = await asyncio.to_thread(ensure_token, config)
        except OSError as exc:
            logger.error("config reload refused: cannot read the token file", error=str(exc))
            return False
        await asyncio.to_thread(warn_about_readable_secrets, config)
        apply(config)
    finally:
        systemd.notify("READY=1")
    if needs_restart:
        logger.warning("config changes that take effect only after a restart", keys=needs_restart)
    logger.info("config reloaded", path=str(path), tokens=len(config.tokens), servers=sorted(config.servers))
    return True


def keep_restart_only(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """`loaded` with the running values of RESTART_ONLY settings, and the keys whose change waits for a restart."""
    kept: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    for table, name, key in RESTART_ONLY:
        value = getattr(getattr(running, table), name)
        if getattr(getattr(loaded, table), name) != value:
            kept.setdefault(table, {})[name] = value
            changed.append(f"{table}.{key}")
    tables = {table: dataclasses.replace(getattr(loaded, table), **values) for table, values in kept.items()}
    return dataclasses.replace(loaded, **tables), changed


def with_departed_servers(config: Config, previous: Config) -> Config:
    """`config` that still knows the servers `previous` had (deployments and releases may run there)."""
    departed = {name: server for name, server in previous.servers.items() if name not in config.servers}
    return dataclasses.replace(config, servers={**departed, **config.servers}) if departed else config
