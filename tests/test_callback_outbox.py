"""The callback outbox in a real SQLite store: events with their status changes, heads only, delivery summary."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from agent.callbacks import backoff, sign
from agent.config import CallbackSettings
from agent.models import CallbackSpec
from agent.store import Store
from tests.test_store import make


@pytest.fixture
async def store(tmp_path: Path):
    store = Store(tmp_path / "agent.db")
    await store.open()
    yield store
    await store.close()


def hooked(application: str = "web"):
    record = make(application)
    return dataclasses.replace(record, spec=dataclasses.replace(record.spec, callback=CallbackSpec("http://cp/hook")))


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"type":"deployment.status"}'
    expected = hmac.new(b"s" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s" * 16, "1700000000", body) == f"v1={expected}"


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = CallbackSettings(secret="s" * 16, backoff_s=1.0, max_backoff_s=10.0)
    assert 0.8 <= backoff(settings, 1) <= 1.2
    assert 3.2 <= backoff(settings, 3) <= 4.8
    assert 8.0 <= backoff(settings, 30) <= 12.0


async def test_each_status_change_queues_one_event_and_only_heads_are_due(store: Store) -> None:
    first, _ = await store.insert(hooked("a"))
    await store.transition(first.id, "building")
    second, _ = await store.insert(hooked("b"))
    plain, _ = await store.insert(make("c"))
    await store.transition(plain.id, "building")
    due = await store.due_callbacks(10, lambda _: False)
    # One event per deployment at a time, oldest first: a's queued (not its building), b's queued.
    assert [(e.deployment_id, json.loads(e.body)["deployment"]["status"]) for e in due] == [
        (first.id, "queued"), (second.id, "queued")
    ]
    assert await store.due_callbacks(10, {first.id}.__contains__) == [due[1]]
    assert await store.pending_callbacks() == 3
    assert (await store.get(plain.id)).callbacks is None
    assert (await store.get(first.id)).callbacks["pending"] == 2


async def test_a_failed_attempt_holds_the_deployments_later_events(store: Store) -> None:
    deployment, _ = await store.insert(hooked())
    await store.transition(deployment.id, "building")
    (head,) = await store.due_callbacks(10, lambda _: False)
    later = time.time() + 60
    await store.record_callback_attempt(head.seq, state="pending", error="HTTP 503", next_attempt_at=later)
    assert await store.due_callbacks(10, lambda _: False) == []
    assert abs((await store.next_callback_due(frozenset())) - later) < 1
    shown = (await store.get(deployment.id)).callbacks
    assert shown["state"] == "failing" and shown["last_error"] == "HTTP 503" and shown["attempts"] == 1
    await store.record_callback_attempt(head.seq, state="delivered", error=None, next_attempt_at=time.time())
    (next_event,) = await store.due_callbacks(10, lambda _: False)
    assert json.loads(next_event.body)["deployment"]["status"] == "building"
    await store.record_callback_attempt(next_event.seq, state="delivered", error=None, next_attempt_at=time.time())
    shown = (await store.get(deployment.id)).callbacks
    assert shown["state"] == "delivered" and shown["delivered"] == 2 and shown["pending"] == 0
    assert await store.next_callback_due(frozenset()) is None


async def test_deleting_a_deployment_drops_its_events(store: Store) -> None:
    deployment, _ = await store.insert(hooked())
    await store.transition(deployment.id, "cancelled")
    await store.delete(deployment.id)
    assert await store.pending_callbacks() == 0
