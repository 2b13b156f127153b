"""Fault tests: the e2e daemon fixtures and a private Docker engine that may be stopped."""

from __future__ import annotations

# Fixtures of a sibling package are not visible here; importing them into this conftest registers them.
from tests.e2e.conftest import agent, agent_factory, source_dir  # noqa: F401
from tests.faults.dockerd import private_dockerd  # noqa: F401
