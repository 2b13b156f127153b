"""asyncssh is loaded with the first server only, croniter with the first cron expression: an agent without
servers or cron schedules never pays for them."""

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


CRON_CHECK = """
import sys
import agent.daemon, agent.api.app, agent.schedules
assert "croniter" not in sys.modules, "croniter was imported at start"
from agent import schedule_times
assert schedule_times.cron_problem("0 9 * * *") is None
assert "croniter" in sys.modules, "croniter did not load with the first cron expression"
print("ok")
"""


def test_croniter_loads_with_the_first_cron_expression_only() -> None:
    result = subprocess.run([sys.executable, "-c", CRON_CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
