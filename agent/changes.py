"""Which deployments changed, for ETags and long polls, without reading the store.

Every write of a deployment (submit, status change, field update, delete) counts one change
here. A deployment's tag is the count at its last change, a list's the count of all changes,
both under an epoch drawn at start: a restart changes every tag, so a tag never names two
different answers. Long polls wait on futures that a change of what they watch resolves: a
thousand idle ones are a thousand futures, and cost nothing until something changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets


class ChangeFeed:
    """Counts deployment changes and wakes the requests waiting for one."""

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(4)
        self._count = 0
        # The count at each deployment's last change, for those changed since the start.
        self._last: dict[str, int] = {}
        self._waiting_for: dict[str, set[asyncio.Future[None]]] = {}
        self._waiting_for_any: set[asyncio.Future[None]] = set()
        self._closed = False

    def changed(self, deployment_id: str) -> None:
        """Records a change of the deployment and wakes whoever waits for it, or for any change."""
        self._count += 1
        self._last[deployment_id] = self._count
        _wake(self._waiting_for.pop(deployment_id, set()))
        _wake(self._waiting_for_any)
        self._waiting_for_any = set()

    def deployment_tag(self, deployment_id: str) -> str:
        """The ETag of `GET /v1/deployments/{id}`: it changes whenever the deployment does."""
        return f'"{self.epoch}.{self._last.get(deployment_id, 0)}"'

    def list_tag(self, query: str) -> str:
        """The ETag of a list query (its normalised query string): it changes whenever any deployment does."""
        digest = hashlib.blake2s(query.encode("utf-8"), digest_size=6).hexdigest()
        return f'"{self.epoch}.{self._count}.{digest}"'

    async def wait(self, timeout_s: float, deployment_id: str | None = None) -> None:
        """Returns at the next change of the deployment (of any, for None), after `timeout_s`, or at close."""
        if self._closed or timeout_s <= 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if deployment_id is None:
            waiters = self._waiting_for_any
        else:
            waiters = self._waiting_for.setdefault(deployment_id, set())
        waiters.add(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._forget(future, deployment_id)

    def close(self) -> None:
        """Answers every waiting request now (the agent is stopping) and every later one at once."""
        self._closed = True
        for waiters in self._waiting_for.values():
            _wake(waiters)
        self._waiting_for.clear()
        _wake(self._waiting_for_any)
        self._waiting_for_any = set()

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting(self) -> int:
        """How many requests wait now."""
        return len(self._waiting_for_any) + sum(len(waiters) for waiters in self._waiting_for.values())

    def _forget(self, future: asyncio.Future[None], deployment_id: str | None) -> None:
        if deployment_id is None:
            self._waiting_for_any.discard(future)
            return
        waiters = self._waiting_for.get(deployment_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiting_for[deployment_id]


def _wake(futures: set[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
