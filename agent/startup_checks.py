"""Checks of the host the agent runs on, at startup and on each reload: readable secrets, the open file limit.

They warn and go on: a daemon that refused to start over a file mode would be worse than one that
says what to fix.
"""

from __future__ import annotations

import os
import resource
import stat
import tomllib
from pathlib import Path

import structlog

from agent.config import Config

logger = structlog.get_logger("agent.startup_checks")


def warn_about_readable_secrets(config: Config) -> None:
    """Logs a warning for each file of secrets the agent reads that its group or others may read too."""
    for path in _secret_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue  # a missing identity file is reported when the server is used
        if mode & 0o077:
            logger.warning(
                "secret file readable by others", path=str(path), mode=f"{mode:04o}",
                hint=f"chmod 600 {path}",
            )


def _secret_files(config: Config) -> list[Path]:
    files: list[Path] = []
    if config.path is not None and _has_plain_tokens(config.path):
        files.append(config.path)
    for server in config.servers.values():
        if server.identity_file:
            files.append(Path(server.identity_file))
    return files


def _has_plain_tokens(path: Path) -> bool:
    """Whether the config file holds a token itself (`token =`) rather than only its digest."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    tokens = data.get("auth", {}).get("tokens", []) if isinstance(data.get("auth"), dict) else []
    return any(isinstance(entry, dict) and "token" in entry for entry in tokens if isinstance(tokens, list))


def raise_descriptor_limit(wanted: int) -> None:
    """Raises the soft limit on open files to the hard limit; warns when that is below `wanted`."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        if soft != resource.RLIM_INFINITY and target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError) as exc:
        logger.warning("cannot raise the open file limit", error=str(exc))
        return
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "open file limit is low for agent.max_connections", limit=soft, wanted=wanted,
            hint="raise LimitNOFILE (systemd) or ulimit -n, or lower agent.max_connections",
        )
