"""asyncssh is loaded with the first server only: an agent without servers never pays for it."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import agent.daemon, agent.api.app, agent.targets.resolver
assert "asyncssh.connection" not in sys.modules, "asyncssh was executed at import"
from agent.ssh import SshConnections
SshConnections({})
assert "asyncssh.connection" not in sys.modules, "an empty SshConnections loaded asyncssh"
from agent import ssh
ssh._client_class()
assert "asyncssh.connection" in sys.modules, "asyncssh did not load on first use"
print("ok")
"""


def test_asyncssh_loads_on_first_use_only() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
