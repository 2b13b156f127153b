"""Targets without Docker or a server: real objects where they open nothing, fakes for the runtimes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from agent.config import Config, ServerConfig
from agent.models import Deployment, DeploymentSpec, new_deployment_id, utc_now
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.ssh import SshConnections
from agent.targets.resolver import Targets


@pytest.fixture
def config(tmp_path: Path) -> Config:
    base = Config()
    edge = ServerConfig(name="edge", host="edge.example", user="deploy", known_hosts=str(tmp_path / "known_hosts"))
    return replace(base, agent=replace(base.agent, state_dir=tmp_path / "state"), servers={"edge": edge})


@pytest.fixture
async def targets(config: Config) -> AsyncIterator[Targets]:
    """Real Targets: its runtimes connect to nothing until asked to work."""
    containers = ContainerRuntime(config.docker, max_streams=1)
    resolved = Targets(config, SshConnections(config.servers), containers, ProcessRuntime(config.run_dir))
    yield resolved
    await resolved.close()
    await containers.close()


def deployment(spec: DeploymentSpec, **fields: Any) -> Deployment:
    """A stored-looking deployment of `spec`."""
    now = utc_now()
    deployment_id = fields.pop("id", None) or new_deployment_id()
    return Deployment(
        id=deployment_id, application=spec.application, server=spec.server, status="deploying",
        created_at=now, updated_at=now, log_path=f"/tmp/{deployment_id}.log", spec=spec, **fields,
    )
