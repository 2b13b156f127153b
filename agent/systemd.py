"""sd_notify: tells systemd (Type=notify) when the daemon is ready, reloading or stopping, and that it is alive.

`Heartbeat` sends `WATCHDOG=1` only while a health probe passes (the event loop runs it, so a
blocked loop also stops the pings) and `STATUS=` whenever the queue or the running count changes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Awaitable, Callable

import structlog

logger = structlog.get_logger("agent.systemd")

# STATUS= is refreshed at least this often, and changes are noticed within one tick.
STATUS_INTERVAL_S = 5.0
TICK_S = 1.0


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def notify_reloading() -> bool:
    """RELOADING=1 with the monotonic time systemd (Type=notify-reload) matches it against."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval_s() -> float | None:
    """Half of $WATCHDOG_USEC, as sd_watchdog_enabled advises; None when systemd asked for no pings."""
    value = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not value or (pid and pid != str(os.getpid())):
        return None  # the variables were meant for another process (a parent that exec'd us keeps them)
    try:
        usec = int(value)
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


Probe = Callable[[], Awaitable[bool]]
Status = Callable[[], Awaitable[str]]


class Heartbeat:
    """Pings the watchdog while `probe` passes and keeps `STATUS=` current; a no-op outside systemd."""

    def __init__(self, probe: Probe, status: Status) -> None:
        self._probe = probe
        self._status = status
        self._task: asyncio.Task[None] | None = None
        self._interval = watchdog_interval_s()
        self._last_status = ""
        self._status_sent_at = 0.0

    def start(self) -> None:
        if os.environ.get("NOTIFY_SOCKET") and self._task is None:
            self._task = asyncio.create_task(self._run(), name="systemd-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        tick = min(TICK_S, self._interval) if self._interval else TICK_S
        while True:
            healthy = await self._healthy(timeout_s=tick)
            if healthy and self._interval:
                notify("WATCHDOG=1")
            await self._refresh_status()
            await asyncio.sleep(tick)

    async def _healthy(self, timeout_s: float) -> bool:
        try:
            return await asyncio.wait_for(self._probe(), timeout=max(timeout_s, 0.5))
        except asyncio.TimeoutError:
            logger.warning("health probe timed out: no watchdog ping", timeout_s=timeout_s)
            return False
        except Exception as exc:  # noqa: BLE001 - an unhealthy daemon is reported by withholding the ping
            logger.warning("health probe failed: no watchdog ping", error=str(exc) or type(exc).__name__)
            return False

    async def _refresh_status(self) -> None:
        try:
            status = await self._status()
        except Exception:  # noqa: BLE001 - the status line is informative; the probe reports failures
            return
        now = time.monotonic()
        if status != self._last_status or now - self._status_sent_at >= STATUS_INTERVAL_S:
            notify(f"STATUS={status}")
            self._last_status, self._status_sent_at = status, now
