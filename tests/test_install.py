"""scripts/install.sh, run for real: a virtualenv with the package, the config, the state dir and the unit.

Its directories are moved into a temporary tree (the script's DEPLOY_AGENT_* overrides); this
machine runs no systemd, so the script installs the unit without enabling it, as it says.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_install(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEPLOY_AGENT_PREFIX": str(tree / "opt"),
        "DEPLOY_AGENT_ETC": str(tree / "etc"),
        "DEPLOY_AGENT_STATE": str(tree / "state"),
        "DEPLOY_AGENT_UNIT_DIR": str(tree / "units"),
        "PYTHON": sys.executable,
    }
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_puts_a_venv_config_state_and_unit_in_place_and_upgrades_in_place(tmp_path: Path) -> None:
    installed = run_install(tmp_path)
    assert installed.returncode == 0, installed.stderr
    agent = tmp_path / "opt" / "bin" / "deploy-agent"
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("deploy-agent ")
    config = tmp_path / "etc" / "config.toml"
    assert mode_of(config) == 0o600 and mode_of(tmp_path / "etc") == 0o700 and mode_of(tmp_path / "state") == 0o700
    assert subprocess.run([str(agent), "check-config", str(config)], capture_output=True, timeout=60).returncode == 0
    unit = (tmp_path / "units" / "deploy-agent.service").read_text()
    assert f"ExecStart={agent} " in unit and f"--config {config}" in unit
    assert "systemd is not running here" in installed.stderr

    # Again, as an upgrade: the operator's config is never touched.
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    again = run_install(tmp_path)
    assert again.returncode == 0, again.stderr
    assert config.read_text().endswith("# edited by the operator\n")
