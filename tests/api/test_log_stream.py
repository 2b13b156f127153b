"""Followed logs: the caps on follow streams, and the one shared watcher that wakes them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import agent.api.log_stream as log_stream
from agent.api.log_stream import followers_of
from agent.config import TokenConfig, hash_token
from agent.logs import DeploymentLog, LogPolicy
from tests.api.test_app_unit import ADMIN, READER, FakeEngine, auth, envelope_of, read_until

OTHER_READER = "other-read-token-0123456789abcdef"


@pytest.fixture
def engine(tmp_path: Path) -> FakeEngine:
    """The fake engine with small follower caps (3 in all, 2 per token) and a second reader token."""
    fake = FakeEngine(tmp_path / "state")
    fake.config = dataclasses.replace(
        fake.config,
        agent=dataclasses.replace(fake.config.agent, max_log_followers=3, max_log_followers_per_token=2),
        tokens=(*fake.config.tokens, TokenConfig("reader-2", hash_token(OTHER_READER), frozenset({"deployments:read"}))),
    )
    fake.config.logs_dir.mkdir(parents=True)
    return fake


async def eventually(check: Callable[[], Awaitable[Any] | Any], what: str, timeout_s: float = 5.0) -> Any:
    """Polls `check` until it is truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def follow(client: TestClient, deployment_id: str, token: str = READER) -> Any:
    return await client.get(f"/v1/deployments/{deployment_id}/logs", params={"follow": "true"}, headers=auth(token))


async def test_followers_beyond_the_per_token_cap_get_429(client: TestClient, engine: FakeEngine) -> None:
    """A token's third stream is refused with the envelope and Retry-After; another token still gets one."""
    deployment = engine.add(status="building")
    first, second = await follow(client, deployment.id), await follow(client, deployment.id)
    assert first.status == second.status == 200
    refused = await follow(client, deployment.id)
    body = await envelope_of(refused, 429, "too_many_followers")
    assert "max_log_followers_per_token" in body["error"]["message"]
    assert refused.headers["Retry-After"] == "5"
    other = await follow(client, deployment.id, OTHER_READER)
    assert other.status == 200
    for response in (first, second, other):
        response.close()


async def test_followers_beyond_the_global_cap_get_429(client: TestClient, engine: FakeEngine) -> None:
    """Past agent.max_log_followers in all, any token is refused; a plain read is never refused."""
    deployment = engine.add(status="building")
    streams = [await follow(client, deployment.id, token) for token in (READER, OTHER_READER, ADMIN)]
    assert [response.status for response in streams] == [200, 200, 200]
    refused = await follow(client, deployment.id, ADMIN)
    body = await envelope_of(refused, 429, "too_many_followers")
    assert "agent.max_log_followers " in body["error"]["message"]
    assert refused.headers["Retry-After"] == "5"
    plain = await client.get(f"/v1/deployments/{deployment.id}/logs", headers=auth(ADMIN))
    assert plain.status == 200
    for response in streams:
        response.close()


async def test_a_closed_stream_frees_its_place(client: TestClient, engine: FakeEngine, app: web.Application) -> None:
    """A client that goes away is noticed by the watcher even while the log is idle, and its slot is free again."""
    deployment = engine.add(status="building")
    streams = [await follow(client, deployment.id) for _ in range(2)]
    assert (await follow(client, deployment.id)).status == 429
    streams[0].close()
    await eventually(lambda: followers_of(app).count == 1, "the closed stream to be let go")
    again = await follow(client, deployment.id)
    assert again.status == 200
    for response in (streams[1], again):
        response.close()
    await eventually(lambda: followers_of(app).count == 0, "every stream to be let go")


async def test_streams_that_end_release_their_places(client: TestClient, engine: FakeEngine, app: web.Application) -> None:
    """Streams of a final deployment end by themselves and leave no follower, file watch or poll behind."""
    deployment = engine.add(status="succeeded")
    for _ in range(5):  # more than the caps: each ended before the next began
        response = await follow(client, deployment.id)
        assert response.status == 200
        async with asyncio.timeout(5):
            await response.read()
    followers = followers_of(app)
    await eventually(lambda: followers.count == 0, "the streams to be let go")
    assert followers._logs == {} and followers._watcher is None


async def test_a_writer_in_this_process_wakes_every_follower_of_its_file(
    client: TestClient, engine: FakeEngine, app: web.Application
) -> None:
    """One write reaches every stream of the file through one shared watch, without waiting for the poll."""
    deployment = engine.add(status="building")
    streams = [await follow(client, deployment.id, token) for token in (READER, OTHER_READER, ADMIN)]
    assert len(followers_of(app)._logs) == 1
    log = DeploymentLog(Path(deployment.log_path), LogPolicy(secrets=("hidden-value-123",)))
    try:
        log.write("build", "stdout", "hello hidden-value-123")
        started = time.monotonic()
        received = await asyncio.gather(*(read_until(response, b"hello ***\n") for response in streams))
        # Well before the slow poll: the writer woke them.
        assert time.monotonic() - started < log_stream.WATCH_POLL_S
        assert all(b"hidden-value-123" not in data for data in received)
    finally:
        log.close()
    engine.set_status(deployment.id, "succeeded")
    for response in streams:
        async with asyncio.timeout(5):
            await response.read()


async def test_a_writer_in_another_process_is_seen_by_the_poll(client: TestClient, engine: FakeEngine) -> None:
    """Bytes appended by someone who does not notify (a release supervisor) arrive through the stat poll."""
    deployment = engine.add(status="deploying")
    response = await follow(client, deployment.id)
    path = Path(deployment.log_path)
    with path.open("ab") as handle:
        handle.write(b"from the supervisor\n")
    await read_until(response, b"from the supervisor\n")
    with path.open("ab") as handle:
        handle.write(b"its last line\n")
    engine.set_status(deployment.id, "succeeded")
    async with asyncio.timeout(5):
        rest = await response.read()
    assert rest.endswith(b"its last line\n")


async def test_idle_followers_do_not_read(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once caught up, streams of an idle log sleep: no reads, and one status check per poll for all of them."""
    reads: list[int] = []
    real_read = log_stream.read_chunk

    def counting_read(*args: Any, **kwargs: Any) -> bytes:
        reads.append(1)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(log_stream, "read_chunk", counting_read)
    deployment = engine.add(status="building")
    gets: list[str] = []
    real_get = engine.get

    async def counting_get(deployment_id: str) -> Any:
        gets.append(deployment_id)
        return await real_get(deployment_id)

    monkeypatch.setattr(engine, "get", counting_get)
    streams = [await follow(client, deployment.id, token) for token in (READER, OTHER_READER, ADMIN)]
    await asyncio.sleep(log_stream.WATCH_POLL_S * 2)  # let the first reads and the first poll pass
    reads_before, gets_before = len(reads), len(gets)
    await asyncio.sleep(log_stream.STATUS_POLL_S * 2.5)
    assert len(reads) == reads_before
    assert len(gets) - gets_before <= 3  # ~one status read per STATUS_POLL_S for the three streams together
    for response in streams:
        response.close()


async def test_the_stream_waits_for_the_dropped_bytes_note(
    client: TestClient, engine: FakeEngine, app: web.Application
) -> None:
    """A log that hit its cap still ends with the note its writer adds when it closes after the final status."""
    deployment = engine.add(status="building")
    response = await follow(client, deployment.id)
    log = DeploymentLog(Path(deployment.log_path), LogPolicy(max_bytes=200))
    log.write("build", "stdout", "x" * 100)
    log.write("build", "stdout", "y" * 300)  # dropped
    await read_until(response, b"x" * 100)
    engine.set_status(deployment.id, "succeeded")
    followed = followers_of(app)._logs[deployment.id]
    await eventually(lambda: followed.final, "the watcher to see the final status")
    await asyncio.sleep(log_stream.WATCH_POLL_S)  # the stream has read to the end and waits
    assert not response.content.at_eof()
    log.close()
    async with asyncio.timeout(5):
        rest = await response.read()
    assert b"bytes of output dropped" in rest
