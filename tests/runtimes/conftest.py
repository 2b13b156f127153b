"""Fixtures shared by the runtime tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from agent.logs import DeploymentLog


@pytest.fixture
def log(tmp_path: Path) -> Iterator[DeploymentLog]:
    """The deployment log a runtime writes into, at tmp_path/deployment.log."""
    with DeploymentLog(tmp_path / "deployment.log") as deployment_log:
        yield deployment_log
