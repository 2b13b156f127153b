"""What a token may ask for beyond build containers: host processes and host paths.

Checked at submit (with the token's scopes) and again when a deployment starts (with the
config in force then), so a config reloaded later never lets an earlier request through.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from agent.config import Config
from agent.errors import Forbidden
from agent.models import DeploymentSpec
from agent.specs import LOCAL_SERVER

PROCESSES_SCOPE = "processes:write"
ADMIN_SCOPE = "admin"

# `scheme://...`, as git's is_url() reads it; any scheme but file fetches over a network.
_URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def authorize_spec(spec: DeploymentSpec, config: Config, scopes: frozenset[str] | None) -> None:
    """Raises Forbidden (403) when `spec` needs what the config or the token's scopes do not allow.

    `scopes` is None when the deployment starts (the token was checked at submit).
    """
    problems: list[dict[str, str]] = []
    for field, runtime in (
        ("build.runtime", spec.build.runtime if spec.build else None),
        ("run.runtime", spec.run.runtime if spec.run else None),
    ):
        if runtime == "process":
            reason = _host_process_refusal(config, scopes)
            if reason:
                problems.append({"field": field, "message": reason})
    source = spec.source
    if source is not None and source.type == "path" and source.path:
        # Path sources are copied from the agent's host, wherever the deployment runs.
        reason = host_path_refusal(source.path, config)
        if reason:
            problems.append({"field": "source.path", "message": f"{source.path!r} {reason}"})
    if source is not None and source.type == "git" and source.url and spec.server == LOCAL_SERVER:
        # On a remote server the clone runs there: a local-looking URL is a path of that server.
        local = local_git_path(source.url)
        reason = host_path_refusal(local, config) if local is not None else None
        if reason:
            problems.append({"field": "source.url", "message": f"the local repository {local!r} {reason}"})
    if problems:
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise Forbidden(message, details=problems)


def _host_process_refusal(config: Config, scopes: frozenset[str] | None) -> str | None:
    if not config.security.allow_host_processes:
        return (
            'runtime "process" runs commands on the host and is off in this agent '
            "(set security.allow_host_processes = true in its config to allow it)"
        )
    if scopes is not None and not scopes & {PROCESSES_SCOPE, ADMIN_SCOPE}:
        return (
            f'runtime "process" needs a token with the scope {PROCESSES_SCOPE} '
            "(security.allow_host_processes is on, but this token lacks the scope)"
        )
    return None


def host_path_refusal(path: str, config: Config) -> str | None:
    """Why the agent must not read the host path `path` for a deployment, or None when it may."""
    roots = config.security.source_roots
    if not roots:
        return "is refused: this agent allows no host path sources (security.source_roots is empty)"
    real = Path(os.path.realpath(path))
    if not any(_is_within(real, root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        # The resolved path is not shown: a symlink's target is the host's business, not the caller's.
        return f"is outside security.source_roots ({allowed}) once symlinks are resolved"
    # Even inside a source root: a source root may hold the agent's own secrets.
    for protected, what in protected_paths(config):
        if _is_within(real, protected):
            return f"is inside {what}, which is never a source"
        if _is_within(protected, real):
            return f"contains {what}, which is never a source"
    return None


def protected_paths(config: Config) -> list[tuple[Path, str]]:
    """Host paths no source may be, lie in or contain, with how to name each in a message."""
    protected = [(Path(os.path.realpath(config.agent.state_dir)), "the agent's state directory (agent.state_dir)")]
    if config.path is not None:
        protected.append((Path(os.path.realpath(config.path.parent)), "the directory of the agent's config file"))
    for server in config.servers.values():
        if server.identity_file:
            protected.append(
                (Path(os.path.realpath(server.identity_file)), f"the SSH identity file of server {server.name}")
            )
    return protected


def local_git_path(url: str) -> str | None:
    """The host path git would read for `url`, or None when git would fetch it from elsewhere.

    Follows git's own rules (transport.c): a `file:` URL or anything with no `scheme://`
    and no scp-like `host:path` (a colon before the first slash) is a path on this host.
    """
    if url[:5].lower() == "file:":
        rest = url[5:]
        if rest.startswith("//"):
            # git ignores a host in file://host/path and reads the (decoded) path after it.
            after_host = rest[2:]
            slash = after_host.find("/")
            rest = after_host[slash:] if slash >= 0 else after_host
            return urllib.parse.unquote(rest)
        # git would read `file:/x` as the ssh host "file"; holding it to the host rule is safer.
        return rest
    if _URL_PATTERN.match(url):
        return None
    colon, slash = url.find(":"), url.find("/")
    if colon >= 0 and (slash < 0 or colon < slash):
        return None  # scp-like host:path, or a remote helper's transport::address
    return url


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents
