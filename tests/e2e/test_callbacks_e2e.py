"""Signed status callbacks from a real agent to a real HTTP receiver: signature, order, retries, restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from tests.e2e.conftest import AgentProcess, build_request, free_port

SECRET = "callback-secret-0123456789"


class Receiver:
    """A control plane's webhook endpoint: records every POST and answers `status` (settable)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/agent?token=cp-secret"
        self.status = 200
        self.received: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body, "status": receiver.status,
                                          "path": self.path})
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted(self, deployment_id: str) -> list[dict[str, Any]]:
        """The events of a deployment the receiver answered 2xx to, in arrival order, bodies parsed."""
        return [
            json.loads(item["body"]) for item in list(self.received)
            if item["status"] < 300 and json.loads(item["body"])["deployment"]["id"] == deployment_id
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


def callback_agent(agent_factory: Callable[..., AgentProcess], url: str | None = None, **settings: Any) -> AgentProcess:
    table = {"secret": SECRET, "backoff_s": 0.2, "max_backoff_s": 0.5, **settings}
    if url is not None:
        table["url"] = url
    toml = "[callbacks]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
    return agent_factory("callbacks", extra_toml=toml)


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [event["deployment"]["status"] for event in events]


def test_every_status_change_is_posted_signed_and_in_order(agent_factory: Callable[..., AgentProcess], receiver: Receiver) -> None:
    agent = callback_agent(agent_factory)
    created = agent.submit({**build_request("hooked"), "callback": {"url": receiver.url}})
    agent.wait_for(created["id"])
    wait_until(lambda: statuses(receiver.accepted(created["id"])) == ["queued", "building", "succeeded"], what="events")
    for item in receiver.received:
        headers, body = item["headers"], item["body"]
        timestamp = headers["X-Deploy-Agent-Timestamp"]
        assert abs(int(timestamp) - time.time()) < 60
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert headers["X-Deploy-Agent-Signature"] == f"v1={expected}"
        event = json.loads(body)
        assert event["type"] == "deployment.status"
        assert headers["X-Deploy-Agent-Event"] == event["id"]
        assert headers["Content-Type"] == "application/json"
        assert item["path"] == "/hooks/agent?token=cp-secret"
    assert len({json.loads(item["body"])["id"] for item in receiver.received}) == 3
    shown = wait_until(lambda: (d := agent.get(created["id"]))["callbacks"]["state"] == "delivered" and d, what="delivered")
    assert shown["callbacks"]["delivered"] == 3 and shown["callbacks"]["pending"] == 0
    # The URL's query may carry the receiver's token: responses never show it.
    assert "cp-secret" not in json.dumps(shown)
    assert "cp-secret" not in agent.output()


def test_a_dead_receiver_delays_nothing_and_gets_every_event_once_it_is_back(
    agent_factory: Callable[..., AgentProcess], receiver: Receiver
) -> None:
    receiver.status = 503
    agent = callback_agent(agent_factory, url=receiver.url)  # the config's default URL
    began = time.monotonic()
    created = agent.submit(build_request("retried"))
    done = agent.wait_for(created["id"])
    assert done["status"] == "succeeded" and time.monotonic() - began < 20
    failing = wait_until(lambda: (d := agent.get(created["id"]))["callbacks"]["state"] == "failing" and d, what="failing")
    assert "503" in failing["callbacks"]["last_error"]
    wait_until(lambda: len(receiver.received) >= 3, what="retries")
    receiver.status = 200
    wait_until(lambda: statuses(receiver.accepted(created["id"])) == ["queued", "building", "succeeded"], what="events")
    shown = wait_until(lambda: (d := agent.get(created["id"]))["callbacks"]["state"] == "delivered" and d, what="delivered")
    assert shown["callbacks"]["last_error"] is None or "503" in shown["callbacks"]["last_error"]


def test_the_outbox_survives_a_restart(agent_factory: Callable[..., AgentProcess]) -> None:
    receiver = Receiver()  # not listening yet: every attempt is refused
    agent = callback_agent(agent_factory, url=receiver.url)
    created = agent.submit(build_request("restarted"))
    agent.wait_for(created["id"])
    wait_until(lambda: agent.get(created["id"])["callbacks"]["state"] == "failing", what="failing")
    assert agent.stop() == 0
    receiver.start()
    try:
        agent.start()
        wait_until(lambda: statuses(receiver.accepted(created["id"])) == ["queued", "building", "succeeded"],
                   what="events after the restart")
    finally:
        receiver.stop()


def test_an_event_is_given_up_after_max_attempts(agent_factory: Callable[..., AgentProcess], receiver: Receiver) -> None:
    receiver.status = 500
    agent = callback_agent(agent_factory, max_attempts=2)
    created = agent.submit({**build_request("givenup", command="true"), "callback": {"url": receiver.url}})
    agent.wait_for(created["id"])
    shown = wait_until(lambda: (d := agent.get(created["id"]))["callbacks"]["state"] == "failed" and d, what="failed")
    assert shown["callbacks"]["failed"] == 3 and shown["callbacks"]["pending"] == 0
    assert "500" in shown["callbacks"]["last_error"]
    time.sleep(1)
    assert len(receiver.received) == 6  # two attempts of each of the three events, no more


def test_a_callback_needs_a_secret_and_a_url(agent_factory: Callable[..., AgentProcess], agent: AgentProcess) -> None:
    refused = agent.request("POST", "/v1/deployments", json={**build_request("nosecret"), "callback": {"url": "http://x/"}})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["field"] == "callback.url"
    assert "secret" in refused.json()["error"]["details"][0]["message"]
    configured = callback_agent(agent_factory)
    for bad in ({"url": "ftp://x/"}, {"url": "http://"}, {}, {"url": "http://x/", "extra": 1}, "http://x/"):
        response = configured.request("POST", "/v1/deployments", json={**build_request("bad"), "callback": bad})
        assert response.status_code == 422, (bad, response.text)
