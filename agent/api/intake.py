"""A deployment request accepted at the edge: validated, allowed by policy, its source looked at."""

from __future__ import annotations

from agent.config import Config
from agent.models import DeploymentSpec, check_source_directory, parse_deployment_request
from agent.policy import authorize_spec


def accept_request(body: object, config: Config, servers: frozenset[str], scopes: frozenset[str]) -> DeploymentSpec:
    """The validated spec of a submit (422), if the config and the token's scopes allow it (403).

    The source directory is looked at only once policy allows its path, so that a 422 cannot
    tell a caller what exists outside `security.source_roots`.
    """
    spec = parse_deployment_request(
        body,
        servers=servers,
        default_build_timeout_s=config.agent.default_build_timeout_s,
        bind_addresses=config.docker.bind_addresses,
        check_source=False,
        callbacks_enabled=config.callbacks is not None,
        default_callback_url=config.callbacks.url if config.callbacks else None,
        registry=config.registry is not None,
    )
    authorize_spec(spec, config, scopes)
    check_source_directory(spec)
    return spec
