"""The configured remote servers, as `GET /v1/servers` shows them: reachable or not, and how fast.

What runs on a server is its target's business (agent.targets).
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.config import Config
from agent.ssh import SshConnections

PROBE_TIMEOUT_S = 15.0


class Servers:
    """Probes the configured servers over their SSH connections (which are the caller's)."""

    def __init__(self, config: Config, ssh: SshConnections) -> None:
        self.config = config
        self.ssh = ssh

    async def describe(self) -> list[dict[str, Any]]:
        """Every configured server with its reachability, latency and Docker version, probed at once."""
        return list(await asyncio.gather(*(self.check(name) for name in sorted(self.config.servers))))

    async def check(self, name: str) -> dict[str, Any]:
        """One server, probed now; a server in reconnect backoff answers unreachable instead of hanging."""
        try:
            return await asyncio.wait_for(self.ssh.check(name), timeout=PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            server = self.config.servers[name]
            return {
                "name": name, "host": server.host, "port": server.port, "reachable": False, "latency_ms": None,
                "docker_version": None, "error": f"no answer within {PROBE_TIMEOUT_S:g}s",
            }

    def connected(self) -> dict[str, bool]:
        """Whether each configured server has an open SSH connection now (a scrape must not probe)."""
        return {name: self.ssh.is_connected(name) for name in sorted(self.config.servers)}
