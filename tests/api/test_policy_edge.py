"""Security at the API edge against a fake engine: 415, host-process policy, source roots, redaction, bounds."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api import create_app
from agent.config import SecuritySettings, TokenConfig, hash_token
from agent.models import Deployment, DeploymentSpec, RunSpec
from tests.api.test_app_unit import ADMIN, BUILD, JSON, READER, WRITER, FakeEngine, auth, envelope_of

PROCESSES = "processes-token-0123456789abcdef"
SECRET = "s3cr3t-value-that-must-not-show"


class SpecEngine(FakeEngine):
    """A FakeEngine that keeps the submitted spec on the deployment, as the real engine does."""

    async def submit(
        self, spec: DeploymentSpec, *, idempotency_key: str | None, request_hash: str
    ) -> tuple[Deployment, bool]:
        deployment, created = await super().submit(spec, idempotency_key=idempotency_key, request_hash=request_hash)
        if created:
            deployment = dataclasses.replace(deployment, spec=spec)
            self.deployments[deployment.id] = deployment
        return deployment, created

    def add_spec(self, spec: DeploymentSpec, status: str) -> Deployment:
        deployment = dataclasses.replace(self.add(spec.application, status), spec=spec)
        self.deployments[deployment.id] = deployment
        return deployment


@pytest.fixture
def engine(tmp_path: Path) -> SpecEngine:
    fake = SpecEngine(tmp_path / "state", max_body=64 * 1024)
    fake.config.logs_dir.mkdir(parents=True)
    (tmp_path / "src").mkdir()
    tokens = fake.config.tokens + (
        TokenConfig("processes", hash_token(PROCESSES), frozenset({"deployments:write", "processes:write"})),
    )
    fake.config = dataclasses.replace(fake.config, tokens=tokens)
    configure(fake, allow_host_processes=True, source_roots=(tmp_path / "src",))
    return fake


def configure(engine: FakeEngine, **security: Any) -> None:
    """Replaces the engine's [security] settings, as a reload would."""
    if "source_roots" in security:
        security["source_roots"] = tuple(Path(os.path.realpath(root)) for root in security["source_roots"])
    engine.config = dataclasses.replace(engine.config, security=SecuritySettings(**security))


@pytest.fixture
async def client(engine: SpecEngine) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(engine))) as test_client:  # type: ignore[arg-type]
        yield test_client


async def submit(client: TestClient, body: Any, token: str = WRITER, **headers: str) -> Any:
    return await client.post("/v1/deployments", json=body, headers={**auth(token), **headers})


# --- 415 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/json",
                     "application/json; charset=latin-1", "multipart/form-data; boundary=x"],
)
async def test_submit_with_a_non_json_content_type_is_415(
    client: TestClient, engine: SpecEngine, content_type: str
) -> None:
    """A JSON body declared as anything but application/json (UTF-8) is 415, before it is parsed."""
    body = json.dumps({"application": "web", "build": BUILD})
    response = await client.post(
        "/v1/deployments", data=body, headers={**auth(WRITER), "Content-Type": content_type}
    )
    envelope = await envelope_of(response, 415, "unsupported_media_type")
    assert "application/json" in envelope["error"]["message"]
    assert engine.submissions == []


async def test_submit_without_a_content_type_is_415(client: TestClient, engine: SpecEngine) -> None:
    """A JSON body sent with no Content-Type at all is not declared application/json: 415."""
    response = await client.post(
        "/v1/deployments", data=b'{"application": "web"}', headers=auth(WRITER), skip_auto_headers=["Content-Type"]
    )
    assert "Content-Type" not in response.request_info.headers
    await envelope_of(response, 415, "unsupported_media_type")
    assert engine.submissions == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON; charset=UTF-8"]
)
async def test_submit_accepts_application_json_with_or_without_charset(client: TestClient, content_type: str) -> None:
    """application/json, in any case and with or without charset=utf-8, is accepted."""
    response = await client.post(
        "/v1/deployments",
        data=json.dumps({"application": "web"}),
        headers={**auth(WRITER), "Content-Type": content_type},
    )
    assert response.status == 201


async def test_415_comes_after_authentication(client: TestClient) -> None:
    """An anonymous or under-scoped caller learns 401/403 first, not how bodies are read."""
    for headers, status in (({}, 401), (auth(READER), 403)):
        response = await client.post("/v1/deployments", data="x", headers={**headers, "Content-Type": "text/plain"})
        assert response.status == status


async def test_routes_without_a_body_refuse_a_non_json_one(client: TestClient, engine: SpecEngine) -> None:
    """kill, rollback, delete, stop and start take no body: a non-empty non-JSON one is 415, none is fine."""
    deployment = engine.add_spec(DeploymentSpec(application="web", run=RunSpec(image="busybox")), "succeeded")
    paths = [
        ("POST", f"/v1/deployments/{deployment.id}/rollback", 201),
        ("POST", "/v1/applications/web/stop", 202),
        ("POST", "/v1/applications/web/start", 202),
        ("POST", f"/v1/deployments/{engine.add(status='building').id}/kill", 202),
        ("DELETE", f"/v1/deployments/{engine.add(status='failed').id}", 204),
    ]
    for method, path, success in paths:
        text = await client.request(method, path, data="x", headers={**auth(WRITER), "Content-Type": "text/plain"})
        await envelope_of(text, 415, "unsupported_media_type")
        bare = await client.request(
            method, path, data=b"x", headers=auth(WRITER), skip_auto_headers=["Content-Type"]
        )
        await envelope_of(bare, 415, "unsupported_media_type")
        empty_text = await client.request(
            method, path, data=b"", headers={**auth(WRITER), "Content-Type": "text/plain"}
        )
        assert empty_text.status == success, (path, await empty_text.text())
        if method == "DELETE":
            continue  # gone now; the other routes can be called again
        as_json = await client.request(method, path, data=b"{}", headers={**auth(WRITER), **JSON})
        assert as_json.status in (success, 409), path
        nothing = await client.request(method, path, headers=auth(WRITER))
        assert nothing.status in (success, 409), path


# --- bounds of query parameters ------------------------------------------------------------


@pytest.mark.parametrize("cursor", [f"c{2**63:x}", f"c{2**64 - 1:x}", "c" + "f" * 19, "c1_0", "c 10", "c+1"])
async def test_cursor_beyond_a_sqlite_integer_is_400(client: TestClient, engine: SpecEngine, cursor: str) -> None:
    """A cursor at or above 2**63 (or not one this agent makes) is 400 bad_query, never a 500."""
    response = await client.get("/v1/deployments", params={"cursor": cursor}, headers=auth(READER))
    body = await envelope_of(response, 400, "bad_request")
    assert body["error"]["code"] == "bad_query" and "cursor" in body["error"]["message"]
    assert engine.queries == []


@pytest.mark.parametrize(
    "params", [{"tail": str(2**63)}, {"offset": str(2**63)}, {"offset": "9" * 20}, {"limit": str(2**63)}]
)
async def test_integer_query_parameters_are_bounded(
    client: TestClient, engine: SpecEngine, params: dict[str, str]
) -> None:
    """tail, offset and limit beyond a signed 64-bit integer are 400 naming the parameter."""
    deployment = engine.add(status="succeeded")
    path = "/v1/deployments" if "limit" in params else f"/v1/deployments/{deployment.id}/logs"
    response = await client.get(path, params=params, headers=auth(READER))
    body = await envelope_of(response, 400, "bad_request")
    assert next(iter(params)) in body["error"]["message"]


# --- host processes --------------------------------------------------------------------------

PROCESS_RUN = {"application": "web", "run": {"runtime": "process", "command": "sleep 1"}}
PROCESS_BUILD = {"application": "web", "server": "edge-1", "build": {"runtime": "process", "command": "make"}}


@pytest.mark.parametrize("body", [PROCESS_RUN, PROCESS_BUILD])
async def test_host_processes_are_off_by_default_even_for_admin(
    client: TestClient, engine: SpecEngine, body: dict[str, Any]
) -> None:
    """Without security.allow_host_processes a process build or release is 403, whatever the token."""
    configure(engine)
    for token in (WRITER, PROCESSES, ADMIN):
        response = await submit(client, body, token)
        envelope = await envelope_of(response, 403, "forbidden")
        assert "security.allow_host_processes" in envelope["error"]["message"]
    assert engine.submissions == []


@pytest.mark.parametrize("body", [PROCESS_RUN, PROCESS_BUILD])
async def test_host_processes_need_the_processes_scope(
    client: TestClient, engine: SpecEngine, body: dict[str, Any]
) -> None:
    """With host processes allowed, a deployments:write token is still 403 naming processes:write."""
    envelope = await envelope_of(await submit(client, body, WRITER), 403, "forbidden")
    assert "processes:write" in envelope["error"]["message"]
    assert "security.allow_host_processes" in envelope["error"]["message"]
    assert engine.submissions == []
    assert (await submit(client, body, PROCESSES)).status == 201
    assert (await submit(client, body, ADMIN)).status == 201


async def test_local_process_build_is_422_before_policy(client: TestClient) -> None:
    """A local process build cannot run anywhere: a 422 saying where process builds run, not a 403."""
    body = {"application": "web", "build": {"runtime": "process", "command": "make"}}
    envelope = await envelope_of(await submit(client, body, ADMIN), 422, "validation_failed")
    assert envelope["error"]["details"][0]["field"] == "build.runtime"
    assert "remote servers" in envelope["error"]["message"]


async def test_rollback_to_a_process_release_needs_the_processes_scope(client: TestClient, engine: SpecEngine) -> None:
    """A rollback starts a host process again: it needs the scope and the config a submit would."""
    spec = DeploymentSpec(application="web", run=RunSpec(runtime="process", command="sleep 1"))
    target = engine.add_spec(spec, "succeeded")
    path = f"/v1/deployments/{target.id}/rollback"
    envelope = await envelope_of(await client.post(path, headers=auth(WRITER)), 403, "forbidden")
    assert "processes:write" in envelope["error"]["message"]
    assert (await client.post(path, headers=auth(PROCESSES))).status == 201
    configure(engine)
    await envelope_of(await client.post(path, headers=auth(ADMIN)), 403, "forbidden")


# --- source roots ----------------------------------------------------------------------------


async def test_path_sources_outside_the_roots_are_403_even_when_missing(
    client: TestClient, engine: SpecEngine, tmp_path: Path
) -> None:
    """Outside security.source_roots it is 403 naming source.path, whether or not the path exists."""
    for path in ("/etc", "/nonexistent/deploy-agent-probe", str(tmp_path / "state")):
        body = {"application": "web", "source": {"type": "path", "path": path}}
        envelope = await envelope_of(await submit(client, body, ADMIN), 403, "forbidden")
        assert "source.path" in envelope["error"]["message"], path
    assert engine.submissions == []


async def test_path_sources_inside_the_roots_must_be_directories(client: TestClient, tmp_path: Path) -> None:
    """Inside a root, a missing path is a 422 naming source.path and a directory is accepted."""
    missing = {"application": "web", "source": {"type": "path", "path": str(tmp_path / "src" / "missing")}}
    envelope = await envelope_of(await submit(client, missing), 422, "validation_failed")
    assert envelope["error"]["details"] == [
        {"field": "source.path", "message": f"{tmp_path / 'src' / 'missing'} is not a directory on the agent's host"}
    ]
    present = {"application": "web", "source": {"type": "path", "path": str(tmp_path / "src")}}
    assert (await submit(client, present)).status == 201


async def test_the_scopes_reach_the_policy_unchanged(
    client: TestClient, engine: SpecEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """authorize_spec gets the validated spec, the engine's config and the token's scopes."""
    calls: list[tuple[DeploymentSpec, Any, frozenset[str]]] = []
    monkeypatch.setattr("agent.api.intake.authorize_spec", lambda *args: calls.append(args))
    assert (await submit(client, {"application": "web"}, PROCESSES)).status == 201
    assert calls == [(engine.submissions[0][0], engine.config, frozenset({"deployments:write", "processes:write"}))]


# --- validation over HTTP --------------------------------------------------------------------


async def test_env_values_never_come_back(client: TestClient) -> None:
    """Env values are "***" in the submit answer, GET and the list; the keys are shown."""
    body = {
        "application": "web",
        "build": {**BUILD, "env": {"DB_PASSWORD": SECRET}},
        "run": {"env": {"API_KEY": SECRET + "-run"}, "port": 8080},
        "metadata": {"commit": "abc"},
    }
    created = await submit(client, body)
    assert created.status == 201
    deployment_id = (await created.json())["id"]
    answers = [
        await created.text(),
        await (await client.get(f"/v1/deployments/{deployment_id}", headers=auth(READER))).text(),
        await (await client.get("/v1/deployments", headers=auth(READER))).text(),
    ]
    for text in answers:
        assert SECRET not in text
    shown = json.loads(answers[1])
    assert shown["spec"]["build"]["env"] == {"DB_PASSWORD": "***"}
    assert shown["spec"]["run"]["env"] == {"API_KEY": "***"}
    assert shown["metadata"] == {"commit": "abc"} and "metadata" not in shown["spec"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"application": "web\n"}, "application"),
        ({"application": "bad-"}, "application"),
        ({"application": "web", "build": {**BUILD, "env": {"FOO\n": "x"}}}, "build.env.FOO\n"),
        ({"application": "web", "build": {**BUILD, "env": {"A": "x\u0000y"}}}, "build.env.A"),
        ({"application": "web", "build": {**BUILD, "command": ["sh", "-c", "echo \u0000"]}}, "build.command"),
        ({"application": "web", "build": None, "run": {"command": "sleep 3"}}, "run.image"),
        ({"application": "web", "run": None, "health_check": {"type": "tcp", "port": 80}}, "health_check"),
        ({"application": "web", "run": {"image": "busybox", "bind": "0.0.0.0"}}, "run.bind"),
        ({"application": "web", "run": {"image": "busybox", "memory": "1k"}}, "run.memory"),
        ({"application": "web", "metadata": {"blob": "x" * 17_000}}, "metadata"),
    ],
)
async def test_requests_that_would_fail_later_are_422_at_submit(
    client: TestClient, engine: SpecEngine, body: dict[str, Any], field: str
) -> None:
    """Trailing newlines, NUL, null-for-absent, bind addresses, limits and metadata size: 422 naming the field."""
    envelope = await envelope_of(await submit(client, body), 422, "validation_failed")
    assert field in {problem["field"] for problem in envelope["error"]["details"]}
    assert engine.submissions == []


async def test_bind_addresses_follow_the_config(client: TestClient, engine: SpecEngine) -> None:
    """An address listed in docker.bind_addresses may be bound; the refusal lists the allowed ones."""
    body = {"application": "web", "run": {"image": "busybox", "bind": "0.0.0.0"}}
    envelope = await envelope_of(await submit(client, body), 422, "validation_failed")
    assert "127.0.0.1" in envelope["error"]["message"]
    docker = dataclasses.replace(engine.config.docker, bind_addresses=("127.0.0.1", "0.0.0.0"))
    engine.config = dataclasses.replace(engine.config, docker=docker)
    assert (await submit(client, body)).status == 201
    assert engine.submissions[-1][0].run == RunSpec(image="busybox", bind="0.0.0.0")


async def test_a_declared_length_over_the_limit_is_413_before_415(client: TestClient, engine: SpecEngine) -> None:
    """An oversized body is 413 whatever its Content-Type says, so a client learns the real problem first."""
    response = await client.post(
        "/v1/deployments", data=b"x" * (64 * 1024 + 1), headers=auth(WRITER), skip_auto_headers=["Content-Type"]
    )
    await envelope_of(response, 413, "payload_too_large")
    assert engine.submissions == []
