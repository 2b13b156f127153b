"""Commands run to their end on a server, and the process groups they leave, checked and stopped.

Signals always go on a fresh channel as `kill -TERM -PGID` (sshd refuses signal requests for root
logins, and the command's own channel dies with a dropped connection), and only after the group
proved to be the one the agent started (`scripts.kill_script`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Awaitable, Callable

from agent.errors import AgentError, RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.remote.channel import QUERY_TIMEOUT_S, CommandSession, LineSink, RemoteShell, describe
from agent.runtimes.remote.scripts import kill_script, read_state, state_script

OnStart = Callable[[int, float], Awaitable[None]]

BUILD_STAGE = "build"
# After the command exits, how long its channel may take to deliver the rest of its output.
DRAIN_S = 2.0
# After a kill, how long the command's channel may take to report the exit.
EXIT_REPORT_S = 2.0
# How long SIGKILLed processes may take to disappear before kill_group gives up.
GONE_TIMEOUT_S = 5.0
# Budget for stopping a build's processes after its connection dropped.
LOST_CLEANUP_S = 10.0


@dataclass
class Ran:
    """A command that ran: its channel (closed or about to be), its (pid, start time), whether it timed out."""

    session: CommandSession
    started: tuple[int, float] | None
    timed_out: bool


class RemoteCommands:
    """Runs commands on one server to their end, and checks and stops the process groups they started."""

    def __init__(self, shell: RemoteShell, kill_grace_s: float) -> None:
        self.shell = shell
        self.kill_grace_s = kill_grace_s

    @property
    def server_name(self) -> str:
        return self.shell.server_name

    async def run(
        self, script: str, log: DeploymentLog, stage: str, what: str, *,
        timeout_s: float | None = None, on_start: OnStart | None = None,
    ) -> Ran:
        """Runs a `launch_script` command until it exits or `timeout_s` passes, its output in `log`.

        `on_start(pid, starttime)` is awaited before the command may run. A cancel (or a failing
        `on_start`) stops its group; a lost connection stops it too and raises RuntimeFailure.
        """
        session = await self.shell.open(script, LineSink(log, stage), what)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        started: tuple[int, float] | None = None
        timed_out = False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    started = await session.wait_started()
                    if started is not None and on_start is not None:
                        await on_start(*started)
                    session.proceed()
                    await session.exited.wait()
            except TimeoutError:
                timed_out = True
        except BaseException:
            # Cancelled (the deployment was killed) or on_start failed: nothing of it may keep running.
            if started is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.cleanup_group(started, log, stage))
            session.close()
            raise
        if session.lost is not None:
            await self._raise_lost(session, started, log, stage, what)
        return Ran(session, started, timed_out)

    async def kill_group(self, pid: int, started_at: float, grace_s: float) -> bool:
        """SIGTERM to the group of `pid`, SIGKILL after `grace_s`; True if it was ours and is now gone.

        Nothing is signalled unless `pid` still has start time `started_at` (or, its leader gone, a
        live member of its group carries the tag of that start). Runs on a fresh channel.
        """
        if pid <= 1 or not float(started_at).is_integer():
            return False
        _, output, error = await self.shell.query(
            kill_script(pid, started_at, grace_s), f"stopping process group {pid}",
            timeout_s=grace_s + GONE_TIMEOUT_S + QUERY_TIMEOUT_S,
        )
        verdict = output.strip()
        if verdict == "killed":
            return True
        if verdict in ("not-ours", "gone"):
            return False
        if verdict == "survived":
            raise RuntimeFailure(f"processes of group {pid} on server {self.server_name} survived SIGKILL")
        raise RuntimeFailure(f"stopping process group {pid} on server {self.server_name} failed: {error or verdict}")

    async def state(self, pid: int, started_at: float, run_dir: str) -> tuple[bool, int | None]:
        """(running, exit code once it has ended and its supervisor recorded one)."""
        if not float(started_at).is_integer():
            return False, None
        _, output, error = await self.shell.query(state_script(pid, started_at, run_dir), f"checking process {pid}")
        state = read_state(output)
        if state is None:
            raise RuntimeFailure(f"checking process {pid} on server {self.server_name} failed: {error or output}")
        return state[0] == "running", state[1]

    async def cleanup_group(self, started: tuple[int, float], log: DeploymentLog, stage: str) -> None:
        """Ends whatever is left of a command's group, within a budget; failures only go to the log."""
        try:
            async with asyncio.timeout(LOST_CLEANUP_S + self.kill_grace_s):
                if await self.kill_group(*started, self.kill_grace_s):
                    log.agent(stage, f"stopped the processes left in group {started[0]}")
        except (AgentError, TimeoutError) as exc:
            log.agent(stage, f"could not stop process group {started[0]} on server {self.server_name}: {exc}")

    async def _raise_lost(
        self, session: CommandSession, started: tuple[int, float] | None, log: DeploymentLog, stage: str, what: str
    ) -> None:
        session.close()
        reason = describe(session.lost) if session.lost is not None else "connection closed"
        aftermath = ""
        if started is not None:
            # The dropped channel does not end the remote tree: try a new connection to stop it.
            try:
                async with asyncio.timeout(LOST_CLEANUP_S + self.kill_grace_s):
                    await self.kill_group(*started, self.kill_grace_s)
                aftermath = f"; its processes (group {started[0]}) were stopped"
            except (AgentError, TimeoutError):
                aftermath = f"; its processes (group {started[0]}, start time {started[1]:g}) may still run"
        message = f"connection to server {self.server_name} was lost during {what}: {reason}{aftermath}"
        log.agent(stage, message)
        raise RuntimeFailure(message)
