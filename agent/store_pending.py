"""Final statuses a full disk kept from the store's file, held in memory until there is room.

A move to a final status that SQLite could not write for lack of space is kept
here and written as soon as there is room: before every later store call, and
every second while nothing else calls the store. Until then the store shows the
deployment with that final status, so nothing starts it again, waits on it, or
refuses to delete it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from agent.disk import is_sqlite_disk_full
from agent.errors import DiskFull
from agent.models import Deployment

# The store's logger: these events were always its own.
logger = structlog.get_logger("agent.store")
# How often a final status that a full disk kept from the file is tried again.
PENDING_RETRY_S = 1.0


class PendingStatuses:
    """The kept final statuses, by deployment, in the order they were decided.

    Only the store thread changes them; the event loop only reads `statuses` and runs the retry.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory  # the database's: where a lack of space is measured
        self._values: dict[str, dict[str, Any]] = {}
        self._retrier: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._values)

    def __contains__(self, deployment_id: object) -> bool:
        return deployment_id in self._values

    def ids(self) -> list[str]:
        return list(self._values)

    def statuses(self) -> dict[str, str]:
        """Deployments whose final status waits for disk space to be written, with that status."""
        return {deployment_id: values["status"] for deployment_id, values in list(self._values.items())}

    def keep(self, deployment_id: str, values: dict[str, Any]) -> None:
        """Keeps the fields of a final status the disk had no room for."""
        self._values[deployment_id] = values
        logger.warning("the disk is full: the final status is written once there is room",
                       deployment_id=deployment_id, status=values["status"])

    def discard(self, deployment_id: str) -> None:
        self._values.pop(deployment_id, None)

    def apply(self, deployment: Deployment) -> Deployment:
        """The deployment as read from its row, with its final status if one is kept from the row."""
        kept = self._values.get(deployment.id)
        return dataclasses.replace(deployment, **kept) if kept else deployment

    def write(self, write: Callable[[str, dict[str, Any]], None]) -> None:
        """Writes the kept statuses with `write`, oldest first; stops at the first that still does not fit."""
        # No transition was allowed meanwhile, so the row is still as it was when the status was decided.
        for deployment_id, values in list(self._values.items()):
            try:
                write(deployment_id, values)
            except sqlite3.Error as exc:
                if is_sqlite_disk_full(exc, self._directory):
                    return
                raise
            logger.info("final status written once there was room", deployment_id=deployment_id,
                        status=values["status"])
            del self._values[deployment_id]

    def retry_in_background(self, poke: Callable[[], Awaitable[object]], is_open: Callable[[], bool]) -> None:
        """Makes sure a task calls `poke` (a store call) every PENDING_RETRY_S while statuses are kept."""
        if self._values and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.create_task(self._retry(poke, is_open), name="store-pending-statuses")

    async def _retry(self, poke: Callable[[], Awaitable[object]], is_open: Callable[[], bool]) -> None:
        # Nothing else may call the store for a while (an idle agent): space coming back must still be seen.
        while self._values and is_open():
            await asyncio.sleep(PENDING_RETRY_S)
            with contextlib.suppress(DiskFull):
                await poke()

    async def stop_retrying(self) -> None:
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
