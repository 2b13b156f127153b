"""Requests: everything that can be known at submit is refused at submit, with the envelope, never a 500."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests

from tests.e2e.conftest import ADMIN_TOKEN, READ_TOKEN, AgentProcess, build_request
from tests.security.conftest import assert_error, assert_invalid, envelope_of, raw_exchange

METADATA_LIMIT = 16 * 1024
RELEASE = {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080}


def metadata_of_size(size: int) -> dict[str, str]:
    """One string value whose compact JSON object is exactly `size` bytes."""
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    return {"blob": "x" * (size - overhead)}


def submit(agent: AgentProcess, body: Any) -> requests.Response:
    return agent.request("POST", "/v1/deployments", json=body)


def assert_nothing_queued(agent: AgentProcess) -> None:
    assert agent.request("GET", "/v1/deployments").json()["data"] == []


# --- metadata --------------------------------------------------------------------------------


def test_metadata_over_16_kib_is_refused(agent: AgentProcess) -> None:
    """metadata one byte over 16 KiB of JSON is 422 naming metadata; 1 MB is too."""
    assert_invalid(submit(agent, {**build_request(), "metadata": metadata_of_size(METADATA_LIMIT + 1)}), "metadata")
    assert_invalid(submit(agent, {**build_request(), "metadata": metadata_of_size(1_000_000)}), "metadata")
    many_keys = {f"k{i}": i for i in range(3000)}
    assert_invalid(submit(agent, {**build_request(), "metadata": many_keys}), "metadata")
    assert_nothing_queued(agent)


def test_metadata_at_the_limit_is_accepted_and_stored_once(agent: AgentProcess) -> None:
    """Exactly 16 KiB is accepted; the deployment carries it in `metadata` only, not again in `spec`."""
    metadata = metadata_of_size(METADATA_LIMIT)
    response = submit(agent, {**build_request(), "metadata": metadata})
    assert response.status_code == 201, response.text[:500]
    assert response.json()["metadata"] == metadata
    assert "metadata" not in (response.json().get("spec") or {})
    assert len(response.content) < METADATA_LIMIT + 8 * 1024
    listed = agent.request("GET", "/v1/deployments")
    assert listed.json()["data"][0]["metadata"] == metadata
    assert len(listed.content) < METADATA_LIMIT + 8 * 1024


# --- whole-string patterns and NUL -------------------------------------------------------------


@pytest.mark.parametrize("name", ["web\n", "web\r\n", "\nweb", "bad-", "a..b", "a._b", "a-.b", "x_", "a.-b", "web "])
def test_application_names_docker_would_refuse_are_refused_at_submit(agent: AgentProcess, name: str) -> None:
    """Names with a trailing newline, or that Docker's reference grammar refuses, are 422 at submit."""
    assert_invalid(submit(agent, build_request(name)), "application")
    assert_nothing_queued(agent)


def test_application_names_docker_accepts_deploy_a_release(agent: AgentProcess) -> None:
    """Edge names the grammar allows (`a__b`, `a---b`, `0.x`) build, commit and start a release."""
    for name in ("a__b", "a---b", "0.x"):
        body = {"application": name, "build": {"image": "local/busybox", "command": "echo ok > /workspace/index.html"},
                "run": RELEASE, "health_check": {"type": "tcp", "interval_s": 0.2, "retries": 25, "stable_s": 0.2}}
        final = agent.wait_for(agent.submit(body)["id"], timeout=90)
        assert final["status"] == "succeeded", (name, final, agent.log(final["id"])[-2000:])


@pytest.mark.parametrize("part", ["build", "run"])
def test_env_keys_with_a_newline_are_refused(agent: AgentProcess, part: str) -> None:
    """An env key `FOO\\n` (which would break out of a generated `export` line) is 422."""
    body: dict[str, Any] = {**build_request(), "run": dict(RELEASE)}
    body[part] = {**body[part], "env": {"FOO\n": "x"}}
    assert_invalid(submit(agent, body), f"{part}.env")
    body[part]["env"] = {"FOO\nid": "x"}
    assert_invalid(submit(agent, body), f"{part}.env")
    assert_nothing_queued(agent)


NUL_BODIES: dict[str, tuple[dict[str, Any], str]] = {
    "build command string": (build_request(command="echo a\x00b"), "build.command"),
    "build command list": (build_request(command=["echo", "a\x00b"]), "build.command"),
    "build env value": (build_request(env={"KEY": "val\x00ue"}), "build.env"),
    "build env key": (build_request(env={"KE\x00Y": "value"}), "build.env"),
    "build image": ({"application": "web", "build": {"image": "local/busy\x00box", "command": "true"}}, "build.image"),
    "run command": ({**build_request(), "run": {**RELEASE, "command": "httpd\x00 -f"}}, "run.command"),
    "run env value": ({**build_request(), "run": {**RELEASE, "env": {"KEY": "a\x00"}}}, "run.env"),
    "metadata value": ({**build_request(), "metadata": {"commit": "abc\x00def"}}, "metadata"),
    "metadata key": ({**build_request(), "metadata": {"com\x00mit": "abc"}}, "metadata"),
    "nested metadata": ({**build_request(), "metadata": {"a": [{"b": "\x00"}]}}, "metadata"),
    "source path": ({**build_request(), "source": {"type": "path", "path": "/tmp/a\x00b"}}, "source.path"),
    "git ref": ({**build_request(), "source": {"type": "git", "url": "https://example.com/r.git", "ref": "ma\x00in"}}, "source.ref"),
    "health path": ({**build_request(), "run": RELEASE, "health_check": {"path": "/\x00"}}, "health_check.path"),
}


@pytest.mark.parametrize("case", sorted(NUL_BODIES))
def test_nul_is_refused_in_every_string(agent: AgentProcess, case: str) -> None:
    """A NUL anywhere (command, env key or value, image, metadata, paths) is 422 at submit, not a later failure."""
    body, field = NUL_BODIES[case]
    assert_invalid(submit(agent, body), field)
    assert_nothing_queued(agent)


# --- null is absent --------------------------------------------------------------------------


def test_null_build_is_the_same_as_no_build(agent: AgentProcess) -> None:
    """`"build": null` with a run that names no image is 422 run.image, as without the key."""
    assert_invalid(submit(agent, {"application": "x", "build": None, "run": {"command": "sleep 3"}}), "run.image")
    assert_invalid(submit(agent, {"application": "x", "run": {"command": "sleep 3"}}), "run.image")
    assert_nothing_queued(agent)


def test_null_run_with_a_health_check_is_refused(agent: AgentProcess) -> None:
    """`"run": null` with a health_check is 422 naming health_check (it needs a run), not silently dropped."""
    check = {"type": "http", "path": "/"}
    assert_invalid(submit(agent, {**build_request("x"), "run": None, "health_check": check}), "health_check")
    assert_invalid(submit(agent, {**build_request("x"), "health_check": check}), "health_check")
    assert_nothing_queued(agent)


# --- content type, cursors, bounds -------------------------------------------------------------


def test_a_body_that_is_not_declared_json_gets_415(agent: AgentProcess) -> None:
    """A JSON body sent as text/plain (or with no Content-Type) is 415 with the envelope; nothing is queued."""
    body = json.dumps(build_request())
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        response = agent.request("POST", "/v1/deployments", data=body.encode(), headers=headers)
        assert_error(response, 415)
    assert_nothing_queued(agent)
    accepted = agent.request(
        "POST", "/v1/deployments", data=body.encode(), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert accepted.status_code == 201, accepted.text


@pytest.mark.parametrize("cursor", [f"c{2**63:x}", f"c{2**64 - 1:x}", f"c{2**70:x}", "c-1", "c", "cffffffffffffffffff"])
def test_huge_or_bad_cursors_are_400(agent: AgentProcess, cursor: str) -> None:
    """A cursor at or above 2^63 (or negative, or empty) is 400, never a 500 from SQLite."""
    assert_error(agent.request("GET", "/v1/deployments", params={"cursor": cursor}), 400)


@pytest.mark.parametrize("query", [{"limit": str(2**63)}, {"limit": str(2**70)}, {"limit": "-1"}, {"limit": "0"}])
def test_out_of_range_limits_are_400(agent: AgentProcess, query: dict[str, str]) -> None:
    """A list `limit` outside 1..500 is a 400 with the envelope."""
    assert_error(agent.request("GET", "/v1/deployments", params=query), 400)


@pytest.mark.parametrize("field,value", [("build.timeout_s", 2**70), ("run.port", 2**63), ("run.host_port", 2**64),
                                         ("health_check.retries", 2**63)])
def test_huge_integers_are_422(agent: AgentProcess, field: str, value: int) -> None:
    """Integers beyond their range are 422 naming the field before anything reaches SQLite."""
    body: dict[str, Any] = {**build_request(), "run": dict(RELEASE), "health_check": {"type": "tcp"}}
    part, key = field.split(".")
    body[part] = {**body[part], key: value}
    assert_invalid(submit(agent, body), field)


def test_unknown_applications_answer_404_quickly(agent: AgentProcess) -> None:
    """stop/start of 200 names that do not exist: each a 404 envelope, all within a few seconds."""
    session = agent.session()
    began = time.monotonic()
    for index in range(200):
        for action in ("stop", "start"):
            response = session.post(f"{agent.url}/v1/applications/ghost-{index}/{action}", timeout=10)
            assert_error(response, 404, "not_found")
    assert time.monotonic() - began < 20
    assert agent.request("GET", "/v1/applications").json()["data"] == []


def test_anonymous_healthz_says_only_the_status(agent: AgentProcess) -> None:
    """/healthz without a token has only `status`; with a token it has the details (Docker version...)."""
    anonymous = agent.request("GET", "/healthz", token=None)
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok"}
    detailed = agent.request("GET", "/healthz", token=READ_TOKEN)
    assert detailed.status_code == 200
    assert detailed.json()["status"] == "ok" and set(detailed.json()) > {"status"}, detailed.json()
    assert set(agent.request("GET", "/healthz", token=ADMIN_TOKEN).json()) > {"status"}


# --- protocol errors aiohttp raises ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FOO /v1/deployments HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/deployments HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ],
    ids=["unknown-method", "unknown-method-on-api", "garbage-request-line", "bad-version", "oversized-header",
         "malformed-header", "bad-content-length"],
)
def test_protocol_errors_answer_with_the_envelope(agent: AgentProcess, raw: bytes) -> None:
    """A bad request line, an unknown method, an oversized or malformed header: 4xx with the JSON envelope."""
    status_line, headers, body = raw_exchange(agent.port, raw)
    status = int(status_line.split(" ")[1])
    assert 400 <= status < 500, status_line
    assert headers.get("content-type", "").startswith("application/json"), (status_line, headers, body[:300])
    envelope = envelope_of(body)
    assert envelope["status"] == status and envelope["error"]["message"], envelope
