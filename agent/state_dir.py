"""The state directory is the agent's user's alone: made private at startup, and home of the generated token."""

from __future__ import annotations

import dataclasses
import os
import secrets
import stat
from pathlib import Path

import structlog

from agent.config import Config, TokenConfig, hash_token

logger = structlog.get_logger("agent.state_dir")

GENERATED_TOKEN_NAME = "local-admin"
# Whatever the agent creates under state_dir is its user's alone (directories 0700, files 0600).
PRIVATE_UMASK = 0o077


def make_state_dir_private(state_dir: Path) -> None:
    """Creates `state_dir` 0700 and takes group and other bits off what an older version left in it.

    The state dir and two levels below it (logs/*.log, run/<id>, ...) are fixed; deeper entries
    are out of reach once their directories are 0700.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    for entry in _entries(state_dir):
        _make_private(entry)
        if entry.is_dir(follow_symlinks=False):
            for child in _entries(Path(entry.path)):
                _make_private(child)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _make_private(entry: os.DirEntry[str]) -> None:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode) or not mode & 0o077:
            return  # a link's mode means nothing; a socket's is the API's own choice
        os.chmod(entry.path, stat.S_IMODE(mode) & 0o700)
    except OSError as exc:
        logger.warning("cannot make a state file private", path=entry.path, error=exc.strerror or str(exc))


def ensure_token(config: Config) -> Config:
    """With no configured token, uses (or creates) a random admin token in <state_dir>/token."""
    if config.tokens:
        return config
    path = config.agent.state_dir / "token"
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        created = False
    else:
        token = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        created = True
    os.chmod(path, 0o600)
    logger.info("no token configured: using a generated admin token", token_file=str(path.resolve()), created=created)
    generated = TokenConfig(name=GENERATED_TOKEN_NAME, token_sha256=hash_token(token), scopes=frozenset({"admin"}))
    return dataclasses.replace(config, tokens=(generated,))
