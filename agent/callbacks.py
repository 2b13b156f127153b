"""Signed status callbacks: sends the store's outbox (agent.callback_outbox) to each deployment's URL.

A deployment's events go one at a time and in order (only the oldest pending one is sent);
different deployments' go side by side, up to `CONCURRENCY`. An event is delivered when the
receiver answers 2xx; otherwise it is tried again after `backoff_s`, doubling up to
`max_backoff_s`, until `max_attempts`. The outbox is in the store, so an event waiting at a
restart is sent after it (at least once: one whose answer was lost is sent again). Nothing
here is awaited by a deployment: a slow or dead receiver only holds up its own events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
from typing import Callable

import aiohttp
import structlog

from agent import __version__
from agent.callback_outbox import CallbackEvent
from agent.config import CallbackSettings
from agent.errors import AgentError
from agent.specs import redact_url
from agent.store import Store

logger = structlog.get_logger("agent.callbacks")

CONCURRENCY = 8
EVENT_HEADER = "X-Deploy-Agent-Event"
TIMESTAMP_HEADER = "X-Deploy-Agent-Timestamp"
SIGNATURE_HEADER = "X-Deploy-Agent-Signature"
# When the store cannot record an attempt (a full disk), the loop looks again this much later.
_STORE_RETRY_S = 5.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: `v1=` + hex HMAC-SHA256 of "<timestamp>.<body>"."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + digest.hexdigest()


def backoff(settings: CallbackSettings, attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones, with ±20 % jitter so retries spread."""
    delay = min(settings.max_backoff_s, settings.backoff_s * 2 ** max(0, attempts - 1))
    return delay * random.uniform(0.8, 1.2)


class CallbackSender:
    """One task that sends what the outbox holds; `wake` after a status change queued an event."""

    def __init__(self, store: Store, settings_of: Callable[[], CallbackSettings | None]) -> None:
        self._store = store
        self._settings_of = settings_of  # read per event: a reload may change the secret or the policy
        self._wakeup = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"deploy-agent/{__version__}", "Content-Type": "application/json"},
            trust_env=False,
        )
        self._task = asyncio.create_task(self._run(), name="callbacks")

    def wake(self) -> None:
        self._wakeup.set()

    async def close(self) -> None:
        """Stops sending; an event being sent stays pending and goes out after the next start."""
        tasks = [task for task in (self._task, *self._in_flight.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            timeout: float | None = _STORE_RETRY_S
            with contextlib.suppress(AgentError):
                timeout = await self._send_due()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _send_due(self) -> float | None:
        """Starts every due event there is room for; returns how long until the next one falls due."""
        settings = self._settings_of()
        if settings is None:
            return None  # no secret to sign with (events stay queued until a reload brings one)
        room = CONCURRENCY - len(self._in_flight)
        if room > 0:
            busy = frozenset(self._in_flight)
            for event in await self._store.due_callbacks(room, busy.__contains__):
                self._in_flight[event.deployment_id] = asyncio.create_task(self._deliver(event))
        if len(self._in_flight) >= CONCURRENCY:
            return None  # a finished delivery wakes the loop
        moment = await self._store.next_callback_due(frozenset(self._in_flight))
        return None if moment is None else max(0.0, moment - time.time())

    async def _deliver(self, event: CallbackEvent) -> None:
        try:
            settings = self._settings_of()
            if settings is None:
                return
            error = await self._post(event, settings)
            attempts = event.attempts + 1
            if error is None:
                state, next_at = "delivered", time.time()
            elif attempts >= settings.max_attempts:
                state, next_at = "failed", time.time()
                logger.warning("callback given up", deployment_id=event.deployment_id, event_id=event.event_id,
                               url=redact_url(event.url), attempts=attempts, error=error)
            else:
                state, next_at = "pending", time.time() + backoff(settings, attempts)
                logger.info("callback failed; will retry", deployment_id=event.deployment_id,
                            event_id=event.event_id, url=redact_url(event.url), attempts=attempts, error=error,
                            retry_in_s=round(next_at - time.time(), 1))
            try:
                await self._store.record_callback_attempt(event.seq, state=state, error=error, next_attempt_at=next_at)
            except AgentError as exc:
                logger.warning("callback attempt not recorded; it will be sent again", error=exc.message)
        finally:
            self._in_flight.pop(event.deployment_id, None)
            self._wakeup.set()

    async def _post(self, event: CallbackEvent, settings: CallbackSettings) -> str | None:
        """POSTs the event, signed now; None on a 2xx, else what went wrong (shown on the deployment)."""
        assert self._session is not None
        timestamp = str(int(time.time()))
        headers = {
            EVENT_HEADER: event.event_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(settings.secret, timestamp, event.body),
        }
        try:
            async with self._session.post(
                event.url, data=event.body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"the receiver answered HTTP {response.status}"
        except asyncio.TimeoutError:
            return f"no answer within {settings.timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"cannot reach the receiver: {exc or type(exc).__name__}"
