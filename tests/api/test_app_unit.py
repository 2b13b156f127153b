"""The HTTP API against an in-memory fake engine: routes, envelopes, query validation, logs."""

from __future__ import annotations

import asyncio
import subprocess
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.changes import ChangeFeed
from agent.api import create_app
from agent.api.context import CLOSING
from agent.api.log_stream import tail_bounds
from agent.config import AgentSettings, Config, TokenConfig, hash_token
from agent.errors import Conflict, NotFound, QueueFull, Unavailable
from agent.logs import READ_CHUNK_BYTES, read_tail
from agent.metrics import Metrics
from agent.engine import ApplicationView
from agent.models import (
    Deployment,
    DeploymentFilter,
    DeploymentSpec,
    new_deployment_id,
    utc_now,
)

ADMIN = "admin-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
WRITER = "write-token-0123456789abcdef"
MAX_BODY = 4096
BUILD = {"image": "local/busybox", "command": ["sh", "-c", "true"]}
JSON = {"Content-Type": "application/json"}


class FakeEngine:
    """Just enough of agent.engine.Engine for the API: deployments in a dict, no Docker."""

    def __init__(self, state_dir: Path, max_body: int = MAX_BODY) -> None:
        self.config = Config(
            agent=AgentSettings(state_dir=state_dir, max_body_bytes=max_body, max_queued=10),
            tokens=(
                TokenConfig("admin", hash_token(ADMIN), frozenset({"admin"})),
                TokenConfig("reader", hash_token(READER), frozenset({"deployments:read"})),
                TokenConfig("writer", hash_token(WRITER), frozenset({"deployments:write"})),
            ),
        )
        self.metrics = Metrics()
        self.accepting = True
        self.queue_full = False
        self.healthy: tuple[bool, dict[str, Any]] = (True, {"docker": "24.0.7"})
        self.deployments: dict[str, Deployment] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        self.queries: list[DeploymentFilter] = []
        self.submissions: list[tuple[DeploymentSpec, str | None, str]] = []
        self.get_error: BaseException | None = None
        self.changes = ChangeFeed()
        self._seq = 0

    def add(self, application: str = "web", status: str = "queued", **fields: Any) -> Deployment:
        self._seq += 1
        deployment_id = new_deployment_id()
        now = utc_now()
        deployment = Deployment(
            id=deployment_id,
            application=application,
            server="local",
            status=status,  # type: ignore[arg-type]
            created_at=now,
            updated_at=now,
            log_path=str(self.config.logs_dir / f"{deployment_id}.log"),
            spec=DeploymentSpec(application=application),
            seq=self._seq,
            **fields,
        )
        self.deployments[deployment_id] = deployment
        self.changes.changed(deployment_id)
        return deployment

    def set_status(self, deployment_id: str, status: str) -> None:
        self.deployments[deployment_id] = dataclasses.replace(self.deployments[deployment_id], status=status)
        self.changes.changed(deployment_id)

    async def submit(
        self, spec: DeploymentSpec, *, idempotency_key: str | None, request_hash: str
    ) -> tuple[Deployment, bool]:
        self.submissions.append((spec, idempotency_key, request_hash))
        if not self.accepting:
            raise Unavailable("the agent is shutting down and accepts no new deployments")
        if idempotency_key is not None and idempotency_key in self.keys:
            deployment_id, earlier_hash = self.keys[idempotency_key]
            if earlier_hash != request_hash:
                raise Conflict("Idempotency-Key was used for a different request", code="idempotency_key_reused")
            return self.deployments[deployment_id], False
        if self.queue_full:
            raise QueueFull("the queue is full (max_queued=10)")
        deployment = self.add(spec.application)
        if idempotency_key is not None:
            self.keys[idempotency_key] = (deployment.id, request_hash)
        return deployment, True

    async def get(self, deployment_id: str) -> Deployment:
        if self.get_error is not None:
            raise self.get_error
        try:
            return self.deployments[deployment_id]
        except KeyError:
            raise NotFound(f"deployment {deployment_id} not found") from None

    async def list(self, query: DeploymentFilter) -> tuple[list[Deployment], int | None]:
        self.queries.append(query)
        rows = sorted(self.deployments.values(), key=lambda d: d.seq, reverse=True)
        rows = [
            d
            for d in rows
            if (query.application is None or d.application == query.application)
            and (query.status is None or d.status == query.status)
            and (query.after_seq is None or d.seq < query.after_seq)
        ]
        page = rows[: query.limit]
        more = len(rows) > query.limit
        return page, page[-1].seq if more else None

    async def kill(self, deployment_id: str) -> Deployment:
        deployment = await self.get(deployment_id)
        if deployment.is_final:
            raise Conflict(f"deployment {deployment_id} is already {deployment.status}", code="already_final")
        self.set_status(deployment_id, "cancelled")
        return self.deployments[deployment_id]

    async def rollback(
        self, deployment_id: str, *, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> tuple[Deployment, bool]:
        target = await self.get(deployment_id)
        if target.status != "succeeded":
            raise Conflict(f"deployment {deployment_id} never put a release into service", code="no_release")
        return self.add(application=target.application, rollback_of=target.id), True

    async def pending_callbacks(self) -> int:
        return 0

    def servers_connected(self) -> dict[str, bool]:
        return {"edge-1": False}

    async def list_applications(self) -> list[ApplicationView]:
        return [await self.get_application("web")]

    async def get_application(self, name: str) -> ApplicationView:
        if name != "web":
            raise NotFound(f"application {name} not found")
        current = next((d for d in self.deployments.values() if d.application == "web"), None) or self.add("web")
        return ApplicationView("web", current.id, "running", None, utc_now(), None, None, None, utc_now())

    async def stop_application(self, name: str) -> ApplicationView:
        return dataclasses.replace(await self.get_application(name), state="stopped")

    async def start_application(self, name: str, scopes: frozenset[str] | None = None) -> ApplicationView:
        return await self.get_application(name)

    async def delete(self, deployment_id: str) -> None:
        deployment = await self.get(deployment_id)
        if deployment.status in ("building", "deploying"):
            raise Conflict(f"deployment {deployment_id} is in progress", code="in_progress")
        del self.deployments[deployment_id]
        Path(deployment.log_path).unlink(missing_ok=True)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return self.healthy

    async def status_counts(self) -> dict[str, int]:
        return dict(Counter(d.status for d in self.deployments.values()))

    def running_count(self) -> int:
        return sum(d.status in ("building", "deploying") for d in self.deployments.values())

    def server_names(self) -> frozenset[str]:
        return frozenset({"edge-1"})


@pytest.fixture
def engine(tmp_path: Path) -> FakeEngine:
    fake = FakeEngine(tmp_path / "state")
    fake.config.logs_dir.mkdir(parents=True)
    return fake


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def envelope_of(response: Any, status: int, error_type: str) -> dict[str, Any]:
    """Asserts the contract's error envelope exactly and returns it."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"success", "status", "error"}
    assert body["success"] is False
    assert body["status"] == status
    assert set(body["error"]) == {"type", "message", "code", "details"}
    assert body["error"]["type"] == error_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def write_log(engine: FakeEngine, deployment: Deployment, data: bytes) -> Path:
    path = Path(deployment.log_path)
    path.write_bytes(data)
    return path


# --- submit ----------------------------------------------------------------------------------


async def test_submit_creates_a_deployment_with_location(client: TestClient, engine: FakeEngine) -> None:
    """POST /v1/deployments answers 201, the deployment object and its Location."""
    response = await client.post("/v1/deployments", json={"application": "web", "build": BUILD}, headers=auth(WRITER))
    assert response.status == 201
    body = await response.json()
    assert body["application"] == "web" and body["status"] == "queued"
    assert response.headers["Location"] == f"/v1/deployments/{body['id']}"
    spec, key, digest = engine.submissions[0]
    assert spec.build is not None and spec.build.timeout_s == 600.0
    assert key is None and len(digest) == 64


async def test_idempotency_key_gives_201_then_200_with_the_same_deployment(client: TestClient) -> None:
    """The same key and the same body (however spelled) give 200 and the first deployment."""
    headers = {**auth(WRITER), "Idempotency-Key": "req-1", "Content-Type": "application/json"}
    first = await client.post("/v1/deployments", data='{"application": "web", "build": {"image": "local/busybox", '
                              '"command": ["sh", "-c", "true"]}}', headers=headers)
    second = await client.post("/v1/deployments", data=json.dumps({"build": BUILD, "application": "web"},
                               separators=(",", ":")), headers=headers)
    assert first.status == 201
    assert second.status == 200
    assert (await second.json())["id"] == (await first.json())["id"]


async def test_idempotency_key_with_another_body_is_409(client: TestClient) -> None:
    """A key reused for a different body is a 409 conflict envelope."""
    headers = {**auth(WRITER), "Idempotency-Key": "req-2"}
    assert (await client.post("/v1/deployments", json={"application": "web"}, headers=headers)).status == 201
    response = await client.post("/v1/deployments", json={"application": "other"}, headers=headers)
    await envelope_of(response, 409, "conflict")


@pytest.mark.parametrize("key", ["x" * 256, "", "clé-1"])
async def test_bad_idempotency_key_is_400(client: TestClient, engine: FakeEngine, key: str) -> None:
    """An Idempotency-Key that is empty, over 255 characters or not printable ASCII is a 400."""
    response = await client.post(
        "/v1/deployments", json={"application": "web"}, headers={**auth(WRITER), "Idempotency-Key": key}
    )
    await envelope_of(response, 400, "bad_request")
    assert engine.submissions == []


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"", b'{"application": "web"} trailing', b"\xff\xfe{}", b'{"a": NaN}', b'{"a": 1e999}',
     b'"\\ud800"', b'{"application": "web", "metadata": {"k": "\\udfff"}}'],
)
async def test_malformed_json_is_400(client: TestClient, engine: FakeEngine, data: bytes) -> None:
    """Bodies that are not strict UTF-8 JSON (or that no later step could store) are 400, never 500."""
    response = await client.post(
        "/v1/deployments", data=data, headers={**auth(WRITER), "Content-Type": "application/json"}
    )
    await envelope_of(response, 400, "bad_request")
    assert engine.submissions == []


async def test_deeply_nested_json_is_refused_not_500(tmp_path: Path) -> None:
    """JSON nested past the recursion limit is 400; nesting that parses but is absurd is 422."""
    engine = FakeEngine(tmp_path, max_body=1 << 20)
    async with TestClient(TestServer(create_app(engine))) as client:  # type: ignore[arg-type]
        response = await client.post(
            "/v1/deployments", data=b"[" * 200_000 + b"]" * 200_000, headers={**auth(WRITER), **JSON}
        )
        await envelope_of(response, 400, "bad_request")
        nested = '{"application": "web", "metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
        response = await client.post("/v1/deployments", data=nested, headers={**auth(WRITER), **JSON})
        body = await envelope_of(response, 422, "validation_failed")
        assert body["error"]["details"][0]["field"].startswith("metadata.a.a")
    assert engine.submissions == []


async def test_validation_failure_is_422_naming_every_field(client: TestClient) -> None:
    """A well-formed but invalid request is 422 with details naming each bad field."""
    response = await client.post(
        "/v1/deployments",
        json={"application": "Bad Name!", "server": "mars", "build": {"image": 3}},
        headers=auth(WRITER),
    )
    body = await envelope_of(response, 422, "validation_failed")
    fields = {problem["field"] for problem in body["error"]["details"]}
    assert {"application", "server", "build.image", "build.command"} <= fields


async def test_configured_server_names_are_accepted_by_validation(client: TestClient) -> None:
    """Validation gets engine.server_names(): a configured name is not an unknown server."""
    response = await client.post(
        "/v1/deployments", json={"application": "web", "server": "edge-1"}, headers=auth(WRITER)
    )
    body = await response.json()
    if response.status == 422:  # remote servers may not be supported by this build yet
        fields = {problem["field"]: problem["message"] for problem in body["error"]["details"]}
        assert "unknown server" not in fields.get("server", "")
    else:
        assert response.status == 201


async def test_undecodable_body_is_400(client: TestClient) -> None:
    """A body that does not match its Content-Encoding is a 400, not a 500."""
    response = await client.post(
        "/v1/deployments", data=b"not gzip", headers={**auth(WRITER), **JSON, "Content-Encoding": "gzip"}
    )
    body = await envelope_of(response, 400, "bad_request")
    assert "gzip" in body["error"]["message"]


async def test_body_over_the_limit_is_413(client: TestClient, engine: FakeEngine) -> None:
    """A body over max_body_bytes is 413, with or without Content-Length."""
    response = await client.post("/v1/deployments", data=b"x" * (MAX_BODY + 10), headers={**auth(WRITER), **JSON})
    body = await envelope_of(response, 413, "payload_too_large")
    assert str(MAX_BODY) in body["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 2000

    response = await client.post("/v1/deployments", data=chunks(), headers={**auth(WRITER), **JSON})
    await envelope_of(response, 413, "payload_too_large")
    assert engine.submissions == []


async def test_full_queue_is_429(client: TestClient, engine: FakeEngine) -> None:
    """QueueFull from the engine is a 429 envelope."""
    engine.queue_full = True
    response = await client.post("/v1/deployments", json={"application": "web"}, headers=auth(WRITER))
    await envelope_of(response, 429, "queue_full")


async def test_submit_while_shutting_down_is_503(client: TestClient, engine: FakeEngine) -> None:
    """Unavailable from the engine is a 503 envelope."""
    engine.accepting = False
    response = await client.post("/v1/deployments", json={"application": "web"}, headers=auth(WRITER))
    await envelope_of(response, 503, "unavailable")


# --- auth over HTTP --------------------------------------------------------------------------


async def test_missing_token_is_401_with_www_authenticate(client: TestClient) -> None:
    """No Authorization header: 401 envelope and WWW-Authenticate: Bearer."""
    response = await client.get("/v1/deployments")
    await envelope_of(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer not-a-real-token", "Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer a b", f"Token {ADMIN}"]
)
async def test_bad_or_malformed_token_is_401(client: TestClient, header: str) -> None:
    """Unknown tokens and malformed Authorization headers are 401."""
    response = await client.get("/v1/deployments", headers={"Authorization": header})
    await envelope_of(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_bearer_scheme_is_case_insensitive(client: TestClient) -> None:
    """`bearer <token>` is accepted like `Bearer <token>`."""
    response = await client.get("/v1/deployments", headers={"Authorization": f"bearer {READER}"})
    assert response.status == 200


async def test_missing_scope_is_403_naming_the_scope(client: TestClient, engine: FakeEngine) -> None:
    """A read token cannot write and a write token cannot read: 403 naming the scope."""
    response = await client.post("/v1/deployments", json={"application": "web"}, headers=auth(READER))
    body = await envelope_of(response, 403, "forbidden")
    assert "deployments:write" in body["error"]["message"]
    response = await client.get("/v1/deployments", headers=auth(WRITER))
    body = await envelope_of(response, 403, "forbidden")
    assert "deployments:read" in body["error"]["message"]
    assert engine.submissions == []


async def test_every_route_needs_its_scope(client: TestClient, engine: FakeEngine) -> None:
    """Reads need deployments:read, writes deployments:write; admin may do both."""
    deployment = engine.add(status="succeeded")
    base = f"/v1/deployments/{deployment.id}"
    reads = [("GET", "/v1/deployments"), ("GET", base), ("GET", f"{base}/logs"), ("GET", "/metrics")]
    writes = [("POST", f"{base}/kill"), ("POST", f"{base}/rollback"), ("DELETE", base), ("POST", "/v1/deployments")]
    for method, path in reads:
        assert (await client.request(method, path, headers=auth(WRITER))).status == 403, path
        assert (await client.request(method, path, headers=auth(READER))).status == 200, path
    for method, path in writes:
        assert (await client.request(method, path, headers=auth(READER))).status == 403, path
        assert (await client.request(method, path)).status == 401, path


# --- routing errors --------------------------------------------------------------------------


async def test_unknown_id_is_404(client: TestClient) -> None:
    """Every per-deployment route answers 404 for an unknown id."""
    for method, suffix in (("GET", ""), ("GET", "/logs"), ("POST", "/kill"), ("POST", "/rollback"), ("DELETE", "")):
        response = await client.request(method, f"/v1/deployments/dep_missing{suffix}", headers=auth())
        body = await envelope_of(response, 404, "not_found")
        assert "dep_missing" in body["error"]["message"]


async def test_unknown_path_is_404_json_even_for_browsers(client: TestClient) -> None:
    """An unknown path is a JSON 404 envelope, never an HTML page."""
    response = await client.get("/nowhere", headers={**auth(), "Accept": "text/html"})
    await envelope_of(response, 404, "not_found")
    response = await client.get("/v1/deployments/", headers=auth())
    await envelope_of(response, 404, "not_found")


async def test_unknown_path_without_token_is_401(client: TestClient) -> None:
    """Only GET /healthz is public: an anonymous caller cannot probe for paths."""
    response = await client.get("/nowhere")
    await envelope_of(response, 401, "unauthorized")


async def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    """A known path with the wrong method is a 405 envelope listing the allowed methods."""
    response = await client.put("/v1/deployments", headers=auth())
    body = await envelope_of(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) == {"GET", "POST"}
    assert "PUT" in body["error"]["message"]
    response = await client.post("/healthz", headers=auth())
    await envelope_of(response, 405, "method_not_allowed")


async def test_unexpected_exception_is_500_envelope_and_logged(client: TestClient, engine: FakeEngine) -> None:
    """A bug becomes a logged 500 envelope of type internal_error, never an HTML page."""
    engine.get_error = RuntimeError("boom")
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/v1/deployments/dep_x", headers={**auth(), "Accept": "text/html"})
    body = await envelope_of(response, 500, "internal_error")
    assert "boom" not in body["error"]["message"]
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert errors and errors[0]["exc_info"] is True and errors[0]["path"] == "/v1/deployments/dep_x"


async def test_token_name_not_secret_is_logged(client: TestClient) -> None:
    """Request logs carry the token's name and never the token itself."""
    with structlog.testing.capture_logs() as logs:
        await client.post("/v1/deployments", json={"application": "web"}, headers=auth(WRITER))
    requests = [entry for entry in logs if entry["event"] == "http request"]
    assert requests and requests[0]["token"] == "writer" and requests[0]["status"] == 201
    assert WRITER not in repr(logs)


# --- get, kill, rollback, delete -------------------------------------------------------------


async def test_get_returns_the_contract_object(client: TestClient, engine: FakeEngine) -> None:
    """GET /v1/deployments/{id} is the deployment's to_json()."""
    deployment = engine.add()
    response = await client.get(f"/v1/deployments/{deployment.id}", headers=auth(READER))
    assert response.status == 200
    assert await response.json() == json.loads(json.dumps(deployment.to_json()))


async def test_kill_is_202_then_409_once_final(client: TestClient, engine: FakeEngine) -> None:
    """Kill answers 202 with the cancelled deployment; killing a final one is 409."""
    deployment = engine.add(status="building")
    response = await client.post(f"/v1/deployments/{deployment.id}/kill", headers=auth(WRITER))
    assert response.status == 202
    assert (await response.json())["status"] == "cancelled"
    again = await client.post(f"/v1/deployments/{deployment.id}/kill", headers=auth(WRITER))
    await envelope_of(again, 409, "conflict")


async def test_rollback_is_201_with_a_new_deployment_or_409(client: TestClient, engine: FakeEngine) -> None:
    """Rollback of a succeeded deployment is 201 + a new deployment; of a failed one 409."""
    deployment = engine.add(status="succeeded")
    response = await client.post(f"/v1/deployments/{deployment.id}/rollback", headers=auth(WRITER))
    assert response.status == 201
    body = await response.json()
    assert body["rollback_of"] == deployment.id and body["id"] != deployment.id
    assert response.headers["Location"] == f"/v1/deployments/{body['id']}"
    failed = engine.add(status="failed")
    refused = await client.post(f"/v1/deployments/{failed.id}/rollback", headers=auth(WRITER))
    await envelope_of(refused, 409, "conflict")
    missing = await client.post("/v1/deployments/dep_nope/rollback", headers=auth(WRITER))
    await envelope_of(missing, 404, "not_found")


async def test_application_routes(client: TestClient, engine: FakeEngine) -> None:
    """Applications: list and get need read; stop and start need write and answer 202."""
    listed = await client.get("/v1/applications", headers=auth(READER))
    assert listed.status == 200 and (await listed.json())["data"][0]["name"] == "web"
    await envelope_of(await client.get("/v1/applications/nope", headers=auth(READER)), 404, "not_found")
    await envelope_of(await client.post("/v1/applications/web/stop", headers=auth(READER)), 403, "forbidden")
    stopped = await client.post("/v1/applications/web/stop", headers=auth(WRITER))
    assert stopped.status == 202 and (await stopped.json())["state"] == "stopped"
    started = await client.post("/v1/applications/web/start", headers=auth(WRITER))
    assert started.status == 202 and (await started.json())["state"] == "running"


async def test_delete_is_204_and_409_while_in_progress(client: TestClient, engine: FakeEngine) -> None:
    """DELETE answers 204 with no body; a deployment in progress is a 409."""
    done = engine.add(status="failed")
    busy = engine.add(status="deploying")
    response = await client.delete(f"/v1/deployments/{done.id}", headers=auth(WRITER))
    assert response.status == 204
    assert await response.read() == b""
    assert done.id not in engine.deployments
    await envelope_of(await client.delete(f"/v1/deployments/{busy.id}", headers=auth(WRITER)), 409, "conflict")


# --- listing ---------------------------------------------------------------------------------


async def test_list_returns_data_and_next_cursor(client: TestClient, engine: FakeEngine) -> None:
    """Pages are newest first; next_cursor leads to the next page and is null at the end."""
    created = [engine.add().id for _ in range(3)]
    first = await (await client.get("/v1/deployments", params={"limit": "2"}, headers=auth(READER))).json()
    assert [d["id"] for d in first["data"]] == created[:0:-1]
    assert first["next_cursor"]
    second = await (
        await client.get("/v1/deployments", params={"limit": "2", "cursor": first["next_cursor"]}, headers=auth(READER))
    ).json()
    assert [d["id"] for d in second["data"]] == created[:1]
    assert second["next_cursor"] is None


async def test_list_passes_normalised_filters_to_the_engine(client: TestClient, engine: FakeEngine) -> None:
    """Filters reach the engine parsed: limit as int, updated_since as a canonical UTC timestamp."""
    params = {"application": "web", "server": "local", "status": "failed", "updated_since": "2026-01-02T05:04:05+02:00"}
    response = await client.get("/v1/deployments", params=params, headers=auth(READER))
    assert response.status == 200
    assert engine.queries[-1] == DeploymentFilter(
        application="web", server="local", status="failed", updated_since="2026-01-02T03:04:05.000Z", limit=50
    )
    await client.get("/v1/deployments", params={"limit": "500"}, headers=auth(READER))
    assert engine.queries[-1].limit == 500


@pytest.mark.parametrize(
    "params, mentions",
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": " 5"}, "limit"),
        ({"status": "nope"}, "status"),
        ({"updated_since": "yesterday"}, "updated_since"),
        ({"updated_since": "2026-01-02T03:04:05"}, "updated_since"),
        ({"updated_since": "2026-01-02T03:04:05 02:00"}, "%2B"),
        ({"updated_since": "9999-12-31T23:59:59-05:00"}, "updated_since"),
        ({"cursor": "zzz"}, "cursor"),
        ({"cursor": "c-1"}, "cursor"),
        ({"colour": "red", "size": "xl"}, "colour, size"),
        ([("status", "failed"), ("status", "queued")], "more than once"),
    ],
)
async def test_bad_list_query_is_400(client: TestClient, engine: FakeEngine, params: Any, mentions: str) -> None:
    """Every malformed or unknown query parameter is a 400 that names it; the engine is not asked."""
    response = await client.get("/v1/deployments", params=params, headers=auth(READER))
    body = await envelope_of(response, 400, "bad_request")
    assert mentions in body["error"]["message"]
    assert engine.queries == []


# --- logs ------------------------------------------------------------------------------------


async def test_logs_whole_file_with_offset_header(client: TestClient, engine: FakeEngine) -> None:
    """Without options the whole log is served as text/plain with X-Log-Offset = its size."""
    deployment = engine.add(status="succeeded")
    data = b"".join(b"line %d\n" % i for i in range(20_000))  # several read chunks
    assert len(data) > 2 * READ_CHUNK_BYTES
    write_log(engine, deployment, data)
    response = await client.get(f"/v1/deployments/{deployment.id}/logs", headers=auth(READER))
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.read() == data
    assert int(response.headers["X-Log-Offset"]) == len(data)


async def test_logs_offset_resumes_where_the_header_said(client: TestClient, engine: FakeEngine) -> None:
    """`offset=B` serves the bytes from B on; offsets past the end give an empty body."""
    deployment = engine.add(status="building")
    path = write_log(engine, deployment, b"one\ntwo\n")
    first = await client.get(f"/v1/deployments/{deployment.id}/logs", headers=auth(READER))
    resume = first.headers["X-Log-Offset"]
    with path.open("ab") as handle:
        handle.write(b"three\n")
    second = await client.get(f"/v1/deployments/{deployment.id}/logs", params={"offset": resume}, headers=auth(READER))
    assert await second.read() == b"three\n"
    assert int(second.headers["X-Log-Offset"]) == path.stat().st_size
    beyond = await client.get(f"/v1/deployments/{deployment.id}/logs", params={"offset": "999"}, headers=auth(READER))
    assert await beyond.read() == b""
    assert int(beyond.headers["X-Log-Offset"]) == path.stat().st_size


async def test_logs_tail_gives_the_last_lines(client: TestClient, engine: FakeEngine) -> None:
    """`tail=N` serves the last N lines and X-Log-Offset = the file size."""
    deployment = engine.add(status="succeeded")
    data = b"".join(b"n%d\n" % i for i in range(1, 21))
    write_log(engine, deployment, data)
    for tail, expected in (("3", b"n18\nn19\nn20\n"), ("0", b""), ("100", data)):
        response = await client.get(
            f"/v1/deployments/{deployment.id}/logs", params={"tail": tail}, headers=auth(READER)
        )
        assert await response.read() == expected, tail
        assert int(response.headers["X-Log-Offset"]) == len(data)


async def test_logs_of_a_deployment_with_no_file_yet_are_empty(client: TestClient, engine: FakeEngine) -> None:
    """A log file that does not exist yet gives an empty body and offset 0."""
    deployment = engine.add()
    for params in ({}, {"tail": "5"}, {"offset": "10"}):
        response = await client.get(f"/v1/deployments/{deployment.id}/logs", params=params, headers=auth(READER))
        assert response.status == 200
        assert await response.read() == b""
        assert response.headers["X-Log-Offset"] == "0"


@pytest.mark.parametrize(
    "params",
    [{"tail": "x"}, {"tail": "-1"}, {"offset": "1.5"}, {"follow": "yes"}, {"tail": "1", "offset": "1"}, {"lines": "3"}],
)
async def test_bad_log_options_are_400(client: TestClient, engine: FakeEngine, params: dict[str, str]) -> None:
    """Malformed tail/offset/follow values, tail with offset, and unknown options are 400."""
    deployment = engine.add()
    response = await client.get(f"/v1/deployments/{deployment.id}/logs", params=params, headers=auth(READER))
    await envelope_of(response, 400, "bad_request")


async def read_until(response: Any, needle: bytes, timeout: float = 5) -> bytes:
    """Reads a streamed body until it contains `needle` (or fails after `timeout`)."""
    received = b""
    async with asyncio.timeout(timeout):
        while needle not in received:
            chunk = await response.content.readany()
            assert chunk, f"stream ended before {needle!r}: {received!r}"
            received += chunk
    return received


async def test_follow_streams_appended_lines_and_ends_when_final(client: TestClient, engine: FakeEngine) -> None:
    """`follow=true` sends lines as they are appended and closes once the deployment is final."""
    deployment = engine.add(status="building")
    path = write_log(engine, deployment, b"first\n")
    response = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "true"}, headers=auth(READER)
    )
    assert response.status == 200
    assert response.headers["X-Log-Offset"] == "0"
    received = await read_until(response, b"first\n")
    with path.open("ab") as handle:
        handle.write(b"second\n")
    received += await read_until(response, b"second\n")
    with path.open("ab") as handle:
        handle.write(b"last words\n")
    engine.set_status(deployment.id, "succeeded")
    async with asyncio.timeout(5):
        received += await response.read()
    assert received == path.read_bytes()


async def test_follow_with_tail_and_offset_starts_there(client: TestClient, engine: FakeEngine) -> None:
    """tail+follow starts at the last N lines, offset+follow at byte B; X-Log-Offset is the start."""
    deployment = engine.add(status="succeeded")
    write_log(engine, deployment, b"a\nb\nc\n")
    tail = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "1", "tail": "1"}, headers=auth(READER)
    )
    async with asyncio.timeout(5):
        assert await tail.read() == b"c\n"
    assert tail.headers["X-Log-Offset"] == "4"
    offset = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "true", "offset": "2"}, headers=auth(READER)
    )
    async with asyncio.timeout(5):
        assert await offset.read() == b"b\nc\n"
    assert offset.headers["X-Log-Offset"] == "2"


async def test_follow_ends_when_the_deployment_is_deleted(client: TestClient, engine: FakeEngine) -> None:
    """A followed deployment that is deleted ends the stream instead of hanging."""
    deployment = engine.add(status="queued")
    response = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "true"}, headers=auth(READER)
    )
    del engine.deployments[deployment.id]
    async with asyncio.timeout(5):
        assert await response.read() == b""


async def test_follow_ends_when_the_server_shuts_down(
    client: TestClient, engine: FakeEngine, app: web.Application
) -> None:
    """The server's shutdown ends open follows, so they cannot hold the daemon's exit."""
    deployment = engine.add(status="queued")
    response = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "true"}, headers=auth(READER)
    )
    app[CLOSING].set()
    async with asyncio.timeout(5):
        assert await response.read() == b""


async def test_error_mid_stream_cuts_the_connection_instead_of_appending_an_envelope(
    client: TestClient, engine: FakeEngine
) -> None:
    """Once log bytes are out, a failure ends the transfer incomplete; no JSON is glued onto the log."""
    deployment = engine.add(status="building")
    write_log(engine, deployment, b"partial\n")
    response = await client.get(
        f"/v1/deployments/{deployment.id}/logs", params={"follow": "true"}, headers=auth(READER)
    )
    await read_until(response, b"partial\n")
    engine.get_error = RuntimeError("store exploded")
    with structlog.testing.capture_logs() as logs, pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(5):
            await response.read()
    assert any(entry["event"] == "stream failed" for entry in logs)


async def test_follow_false_is_a_plain_read(client: TestClient, engine: FakeEngine) -> None:
    """`follow=false` (or 0) returns the log so far even while the deployment runs."""
    deployment = engine.add(status="building")
    write_log(engine, deployment, b"so far\n")
    for value in ("false", "0"):
        response = await client.get(
            f"/v1/deployments/{deployment.id}/logs", params={"follow": value}, headers=auth(READER)
        )
        async with asyncio.timeout(5):
            assert await response.read() == b"so far\n"


@pytest.mark.parametrize(
    "data",
    [b"", b"a", b"a\n", b"a\nb", b"a\nb\n", b"\n\n\n", b"x\n\ny\n", b"".join(b"%06d\n" % i for i in range(40_000))],
)
def test_tail_bounds_agree_with_read_tail(tmp_path: Path, data: bytes) -> None:
    """The streaming tail starts exactly where agent.logs.read_tail's text starts."""
    path = tmp_path / "log"
    path.write_bytes(data)
    for lines in (0, 1, 2, 3, 10, 9_999, 40_000, 10**9):
        start, end = tail_bounds(path, lines)
        expected, expected_end = read_tail(path, lines)
        assert (data[start:end], end) == (expected, expected_end), lines


# --- health, metrics and the API description ----------------------------------------------


async def test_openapi_document_is_public_and_other_v1_paths_are_not(client: TestClient) -> None:
    response = await client.get("/v1/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    assert (await response.json())["openapi"] == "3.1.0"
    await envelope_of(await client.get("/v1/openapi.yaml"), 401, "unauthorized")
    await envelope_of(await client.post("/v1/openapi.json"), 401, "unauthorized")


async def test_healthz_is_public_and_ok(client: TestClient) -> None:
    """GET /healthz needs no token and then reports only the status, no Docker version."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize("token", [READER, WRITER, ADMIN])
async def test_healthz_with_a_token_adds_the_details(client: TestClient, token: str) -> None:
    """A valid token of any scope gets the engine's details (Docker version) with the status."""
    response = await client.get("/healthz", headers=auth(token))
    assert response.status == 200
    assert await response.json() == {"status": "ok", "docker": "24.0.7"}


@pytest.mark.parametrize("header", ["Bearer not-a-real-token", "Basic YWRtaW46YWRtaW4=", "Bearer"])
async def test_healthz_with_a_bad_token_is_anonymous(client: TestClient, header: str) -> None:
    """An invalid token on /healthz is not a 401: the caller is anonymous and gets only the status."""
    response = await client.get("/healthz", headers={"Authorization": header})
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_healthz_503_tells_anonymous_callers_no_docker_version(client: TestClient, engine: FakeEngine) -> None:
    """An unhealthy agent answers 503 with the reason, and never the details, to an anonymous caller."""
    engine.healthy = (False, {"reason": "recovering the deployments of the previous run", "docker": "24.0.7"})
    body = await envelope_of(await client.get("/healthz"), 503, "unavailable")
    assert "recovering" in body["error"]["message"] and "24.0.7" not in json.dumps(body)


async def test_healthz_is_503_when_docker_is_unreachable(client: TestClient, engine: FakeEngine) -> None:
    """An unhealthy engine makes /healthz a 503 envelope carrying the reason."""
    engine.healthy = (False, {"reason": "Docker engine unreachable: connection refused"})
    body = await envelope_of(await client.get("/healthz"), 503, "unavailable")
    assert body["error"]["message"] == "Docker engine unreachable: connection refused"


async def test_healthz_is_503_while_shutting_down(client: TestClient, engine: FakeEngine) -> None:
    """While the engine no longer accepts work /healthz is a 503 saying so."""
    engine.accepting = False
    body = await envelope_of(await client.get("/healthz"), 503, "unavailable")
    assert "shutting down" in body["error"]["message"]


async def test_metrics_endpoint_serves_prometheus_text(client: TestClient, engine: FakeEngine) -> None:
    """/metrics is Prometheus text with status gauges (zeros too), queue depth and running count."""
    engine.add(status="queued")
    engine.add(status="queued")
    engine.add(status="building")
    engine.metrics.observe_build(2.0, "succeeded")
    response = await client.get("/metrics", headers=auth(READER))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'deploy_agent_deployments{status="queued"} 2.0' in text
    assert 'deploy_agent_deployments{status="cancelled"} 0.0' in text
    assert "deploy_agent_queue_depth 2.0" in text
    assert "deploy_agent_running_deployments 1.0" in text
    assert 'deploy_agent_build_duration_seconds_count{outcome="succeeded"} 1.0' in text


async def test_metrics_cover_the_process_requests_and_outbox_and_pass_promtool(
    client: TestClient, engine: FakeEngine
) -> None:
    """Process and platform collectors, build info, request durations by route, no `_created` series;
    `promtool check metrics` (Debian's prometheus package, installed by setup-machine.sh) finds nothing wrong."""
    deployment = engine.add(status="queued")
    await client.get(f"/v1/deployments/{deployment.id}", headers=auth(READER))
    await client.get("/no/such/path", headers=auth(READER))
    text = await (await client.get("/metrics", headers=auth(READER))).text()
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text
    assert 'deploy_agent_build_info{python="' in text
    assert (
        'deploy_agent_http_request_duration_seconds_count{method="GET",route="/v1/deployments/{id}",status="200"} 1.0'
        in text
    )
    assert 'route="unmatched",status="404"' in text
    assert "deploy_agent_callback_outbox_depth 0.0" in text
    assert 'deploy_agent_server_connected{server="edge-1"} 0.0' in text
    assert 'deploy_agent_releases_total{outcome="succeeded"} 0.0' in text
    assert 'deploy_agent_health_checks_total{result="passed"} 0.0' in text
    assert "_created" not in text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert checked.stdout.decode().strip() == "" and checked.stderr.decode().strip() == ""
