"""What a token may ask for beyond build containers: host processes and host paths.

Checked at submit (with the token's scopes) and again when a deployment starts (with the
config in force then), so a config reloaded later never lets an earlier request through.
"""

from __future__ import annotations

from agent.config import Config
from agent.models import DeploymentSpec

PROCESSES_SCOPE = "processes:write"
ADMIN_SCOPE = "admin"


def authorize_spec(spec: DeploymentSpec, config: Config, scopes: frozenset[str] | None) -> None:
    """Raises Forbidden (403) when `spec` needs what the config or the token's scopes do not allow.

    `scopes` is None when the deployment starts (the token was checked at submit).
    """
    # TODO(helper D): host processes, source roots; see the contract's Security and policy.
