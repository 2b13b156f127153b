"""ETag / If-None-Match / 304 and `?wait=` long polls on a deployment and on the list."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.api.test_app_unit import FakeEngine, auth, envelope_of


@pytest.fixture
def engine(tmp_path: Path) -> FakeEngine:
    fake = FakeEngine(tmp_path / "state")
    fake.config.logs_dir.mkdir(parents=True)
    return fake


async def test_a_deployment_answers_304_while_its_tag_is_current(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    first = await client.get(f"/v1/deployments/{deployment.id}", headers=auth())
    tag = first.headers["ETag"]
    assert first.status == 200 and tag.startswith('"')
    again = await client.get(f"/v1/deployments/{deployment.id}", headers={**auth(), "If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag
    assert await again.read() == b""
    # Weak comparison, and one tag among several.
    weak = await client.get(f"/v1/deployments/{deployment.id}", headers={**auth(), "If-None-Match": f'"x", W/{tag}'})
    assert weak.status == 304
    engine.set_status(deployment.id, "building")
    changed = await client.get(f"/v1/deployments/{deployment.id}", headers={**auth(), "If-None-Match": tag})
    assert changed.status == 200 and changed.headers["ETag"] != tag
    assert (await changed.json())["status"] == "building"


async def test_a_change_of_another_deployment_keeps_the_tag(client: TestClient, engine: FakeEngine) -> None:
    watched, other = engine.add(), engine.add()
    tag = (await client.get(f"/v1/deployments/{watched.id}", headers=auth())).headers["ETag"]
    engine.set_status(other.id, "building")
    again = await client.get(f"/v1/deployments/{watched.id}", headers={**auth(), "If-None-Match": tag})
    assert again.status == 304


async def test_a_matching_tag_needs_no_read_of_the_store(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    tag = (await client.get(f"/v1/deployments/{deployment.id}", headers=auth())).headers["ETag"]
    engine.get_error = RuntimeError("the store must not be read")
    again = await client.get(f"/v1/deployments/{deployment.id}", headers={**auth(), "If-None-Match": tag})
    assert again.status == 304


async def test_a_long_poll_answers_within_100ms_of_the_change(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    tag = (await client.get(f"/v1/deployments/{deployment.id}", headers=auth())).headers["ETag"]

    async def change_later() -> float:
        await asyncio.sleep(0.5)
        engine.set_status(deployment.id, "building")
        return time.monotonic()

    changer = asyncio.ensure_future(change_later())
    began = time.monotonic()
    response = await client.get(
        f"/v1/deployments/{deployment.id}?wait=10", headers={**auth(), "If-None-Match": tag}
    )
    answered = time.monotonic()
    changed_at = await changer
    assert response.status == 200
    assert (await response.json())["status"] == "building"
    assert answered - began >= 0.45
    assert answered - changed_at < 0.1


async def test_a_long_poll_ends_at_its_deadline_with_304(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    tag = (await client.get(f"/v1/deployments/{deployment.id}", headers=auth())).headers["ETag"]
    began = time.monotonic()
    response = await client.get(
        f"/v1/deployments/{deployment.id}?wait=0.6", headers={**auth(), "If-None-Match": tag}
    )
    assert response.status == 304
    assert 0.55 <= time.monotonic() - began < 2
    assert engine.changes.waiting() == 0


async def test_wait_without_a_matching_tag_answers_at_once(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    began = time.monotonic()
    response = await client.get(f"/v1/deployments/{deployment.id}?wait=30", headers=auth())
    assert response.status == 200 and time.monotonic() - began < 1


@pytest.mark.parametrize("value", ["0", "-1", "61", "soon", "nan", "inf", ""])
async def test_a_bad_wait_is_400(client: TestClient, engine: FakeEngine, value: str) -> None:
    deployment = engine.add()
    for path in (f"/v1/deployments/{deployment.id}", "/v1/deployments"):
        body = await envelope_of(await client.get(f"{path}?wait={value}", headers=auth()), 400, "bad_request")
        assert "wait" in body["error"]["message"]


async def test_an_unknown_parameter_of_a_deployment_is_400(client: TestClient, engine: FakeEngine) -> None:
    deployment = engine.add()
    await envelope_of(await client.get(f"/v1/deployments/{deployment.id}?wiat=3", headers=auth()), 400, "bad_request")


async def test_the_list_answers_304_until_any_deployment_changes(client: TestClient, engine: FakeEngine) -> None:
    first = engine.add()
    response = await client.get("/v1/deployments?limit=10", headers=auth())
    tag = response.headers["ETag"]
    assert (await client.get("/v1/deployments?limit=10", headers={**auth(), "If-None-Match": tag})).status == 304
    # Another query is another answer: its own tag.
    other = await client.get("/v1/deployments?limit=5", headers=auth())
    assert other.headers["ETag"] != tag
    engine.set_status(first.id, "building")
    assert (await client.get("/v1/deployments?limit=10", headers={**auth(), "If-None-Match": tag})).status == 200
    engine.add()
    assert (await client.get("/v1/deployments?limit=10", headers={**auth(), "If-None-Match": tag})).status == 200


async def test_an_empty_page_is_held_until_a_deployment_comes(client: TestClient, engine: FakeEngine) -> None:
    async def submit_later() -> None:
        await asyncio.sleep(0.4)
        engine.add("late")

    adder = asyncio.ensure_future(submit_later())
    began = time.monotonic()
    response = await client.get("/v1/deployments?application=late&wait=10", headers=auth())
    await adder
    body = await response.json()
    assert response.status == 200
    assert [d["application"] for d in body["data"]] == ["late"]
    assert 0.35 <= time.monotonic() - began < 0.6


async def test_an_empty_page_answers_empty_at_the_deadline(client: TestClient, engine: FakeEngine) -> None:
    engine.add("web")
    began = time.monotonic()
    response = await client.get("/v1/deployments?application=none&wait=0.5", headers=auth())
    assert response.status == 200 and (await response.json())["data"] == []
    assert 0.45 <= time.monotonic() - began < 2


async def test_a_thousand_idle_long_polls_are_answered_when_the_agent_stops(engine: FakeEngine) -> None:
    deployment = engine.add()
    tag = engine.changes.deployment_tag(deployment.id)
    waiters = [asyncio.ensure_future(engine.changes.wait(30, deployment.id)) for _ in range(500)]
    waiters += [asyncio.ensure_future(engine.changes.wait(30)) for _ in range(500)]
    await asyncio.sleep(0.05)
    assert engine.changes.waiting() == 1000
    engine.changes.close()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert engine.changes.waiting() == 0
    assert engine.changes.deployment_tag(deployment.id) == tag


async def test_a_list_polled_without_a_tag_is_read_once_until_something_changes(
    client: TestClient, engine: FakeEngine
) -> None:
    """The body of an unchanged list query is kept: no query, same bytes and tag; any change reads it again."""
    first_deployment = engine.add()
    first = await client.get("/v1/deployments?limit=5", headers=auth())
    body, tag = await first.read(), first.headers["ETag"]
    reads = len(engine.queries)
    again = await client.get("/v1/deployments?limit=5", headers=auth())
    assert again.status == 200 and await again.read() == body and again.headers["ETag"] == tag
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert len(engine.queries) == reads
    other_query = await client.get("/v1/deployments?limit=4", headers=auth())
    assert other_query.status == 200 and len(engine.queries) == reads + 1
    engine.set_status(first_deployment.id, "building")
    changed = await client.get("/v1/deployments?limit=5", headers=auth())
    assert changed.headers["ETag"] != tag and len(engine.queries) == reads + 2
    assert (await changed.json())["data"][0]["status"] == "building"
