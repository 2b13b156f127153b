"""Bounded resources: log size, log followers, connections and sockets that never send a request."""

from __future__ import annotations

import re
import select
import socket
import time
from pathlib import Path
from typing import Callable

import requests

from tests.conftest import log_entries
from tests.e2e.conftest import ADMIN_TOKEN, READ_TOKEN, AgentProcess
from tests.security.conftest import assert_error, wait_until

MiB = 1024**2
OTHER_READER = "other-reader-token-0123456789"
OTHER_READER_TOML = f"""
[[auth.tokens]]
name = "other-reader"
token = "{OTHER_READER}"
scopes = ["deployments:read"]
"""


# --- log cap ---------------------------------------------------------------------------------


def test_a_5_mib_build_under_a_1_mib_cap_succeeds_with_a_capped_log(agent_factory: Callable[..., AgentProcess]) -> None:
    """Output beyond max_log_bytes is counted, not written; one agent line says how much was dropped."""
    agent = agent_factory(max_log_bytes=MiB)
    line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz"
    command = f"yes {line} | head -c {5 * MiB}; echo; echo build-finished"
    final = agent.wait_for(agent.submit({"application": "noisy", "build": {"image": "local/busybox", "command": command}})["id"],
                           timeout=90)
    assert final["status"] == "succeeded", final
    path = Path(final["log_path"])
    bound = MiB + 1024  # the cap plus one line
    assert path.stat().st_size <= bound, path.stat().st_size
    served = agent.request("GET", f"/v1/deployments/{final['id']}/logs")
    assert served.status_code == 200 and len(served.content) <= bound
    assert served.content.count(line.encode()) > 1000  # it did write up to the cap
    dropped = [text for stage, stream, text in log_entries(path) if stream == "agent" and "dropped" in text]
    assert len(dropped) == 1, dropped
    count = max(int(number.replace(",", "")) for number in re.findall(r"\d[\d,]*", dropped[0]))
    assert 3 * MiB <= count <= 12 * MiB, dropped[0]
    assert "build-finished" not in served.text


# --- log followers -----------------------------------------------------------------------------


def follow(agent: AgentProcess, deployment_id: str, token: str) -> requests.Response:
    """Opens `logs?follow=true` on its own connection and returns once the headers are in."""
    return agent.request("GET", f"/v1/deployments/{deployment_id}/logs?follow=true", token=token, stream=True, timeout=10)


def assert_too_many(response: requests.Response) -> None:
    assert_error(response, 429)
    assert int(response.headers["Retry-After"]) >= 1, response.headers


def test_log_followers_are_capped_per_token_and_in_total(agent_factory: Callable[..., AgentProcess]) -> None:
    """Per-token cap 2, global cap 3: the third stream of a token and the fourth overall get 429; closing frees a slot."""
    agent = agent_factory(max_log_followers_per_token=2, max_log_followers=3, extra_toml=OTHER_READER_TOML)
    created = agent.submit({"application": "job", "build": {"image": "local/busybox", "command": "echo start; sleep 60"}})
    agent.wait_for(created["id"], lambda d: d["status"] == "building")
    streams = []
    try:
        streams += [follow(agent, created["id"], ADMIN_TOKEN), follow(agent, created["id"], ADMIN_TOKEN)]
        assert [s.status_code for s in streams] == [200, 200]
        assert_too_many(follow(agent, created["id"], ADMIN_TOKEN))
        streams.append(follow(agent, created["id"], READ_TOKEN))
        assert streams[-1].status_code == 200, streams[-1].text
        assert_too_many(follow(agent, created["id"], OTHER_READER))
        # Plain reads are not followers and are never capped.
        assert agent.request("GET", f"/v1/deployments/{created['id']}/logs").status_code == 200
        streams.pop(0).close()

        def admin_follows_again() -> bool:
            response = follow(agent, created["id"], ADMIN_TOKEN)
            if response.status_code == 200:
                streams.append(response)
                return True
            assert response.status_code == 429, response.text
            response.close()
            return False

        wait_until(admin_follows_again, 10, "a closed follower's slot was never freed", interval=0.2)
    finally:
        for stream in streams:
            stream.close()
    assert agent.request("POST", f"/v1/deployments/{created['id']}/kill").status_code == 202


def test_followers_end_with_the_deployment(agent_factory: Callable[..., AgentProcess]) -> None:
    """A follower gets every line and its stream ends when the deployment does, freeing its slot."""
    agent = agent_factory(max_log_followers_per_token=1, max_log_followers=1)
    created = agent.submit({"application": "job", "build": {"image": "local/busybox",
                                                            "command": "for i in 1 2 3 4 5; do echo line-$i; sleep 0.3; done"}})
    began = time.monotonic()
    stream = follow(agent, created["id"], ADMIN_TOKEN)
    assert stream.status_code == 200
    text = stream.content.decode()  # reads until the agent ends the stream
    assert time.monotonic() - began < 30
    assert all(f"line-{i}" in text for i in range(1, 6)), text
    second = follow(agent, created["id"], ADMIN_TOKEN)
    assert second.status_code == 200
    second.close()


# --- connections -------------------------------------------------------------------------------


def healthz_answers(agent: AgentProcess) -> bool:
    try:
        return requests.get(f"{agent.url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Reads until EOF or reset (an error response before it is fine); False if still open at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def test_idle_sockets_beyond_the_connection_cap_do_not_starve_healthz(
    agent_factory: Callable[..., AgentProcess]
) -> None:
    """60 idle sockets against max_connections = 50: /healthz answers again and every idle socket is closed."""
    agent = agent_factory(max_connections=50, header_timeout_s=1)
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=5) for _ in range(60)]
    try:
        began = time.monotonic()
        wait_until(lambda: healthz_answers(agent), 15, "/healthz never answered while idle sockets were open", 0.1)
        assert time.monotonic() - began < 8
        deadline = time.monotonic() + 8
        still_open = [index for index, sock in enumerate(idle) if not closed_by_peer(sock, deadline)]
        assert still_open == [], f"{len(still_open)} idle sockets still open"
        assert healthz_answers(agent)
    finally:
        for sock in idle:
            sock.close()


def test_a_socket_that_sends_nothing_is_closed_after_the_header_timeout(
    agent_factory: Callable[..., AgentProcess]
) -> None:
    """An idle connection is closed by the agent within header_timeout_s plus a margin."""
    agent = agent_factory(header_timeout_s=1)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        began = time.monotonic()
        assert closed_by_peer(sock, began + 4), "the agent kept an idle socket open past its header timeout"
        assert time.monotonic() - began < 3.5


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(agent_factory: Callable[..., AgentProcess]) -> None:
    """A client trickling header bytes (slowloris) is closed within header_timeout_s plus a margin."""
    agent = agent_factory(header_timeout_s=1)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.monotonic() - began < 6 and not closed:
            try:
                sock.sendall(b"X-Slow: a\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                closed = closed_by_peer(sock, time.monotonic() + 1)
        assert closed, "the agent kept a trickling request head open"
        assert time.monotonic() - began < 4


# --- disk space --------------------------------------------------------------------------------


def test_post_answers_503_disk_full_below_min_free_bytes(agent_factory: Callable[..., AgentProcess]) -> None:
    """With less free space in state_dir than agent.min_free_bytes, POST is 503 disk_full with Retry-After; reads work."""
    agent = agent_factory(start=False, min_free_bytes=2**60)
    try:
        agent.start(timeout=10)
    except AssertionError:
        # /healthz may rightly say the agent cannot take work; the daemon must still be up and answering.
        assert agent.process is not None and agent.process.poll() is None, agent.output()
    response = agent.request("POST", "/v1/deployments", json={"application": "job", "build": {
        "image": "local/busybox", "command": "true"}})
    assert_error(response, 503, "disk_full")
    assert int(response.headers["Retry-After"]) >= 1
    listed = agent.request("GET", "/v1/deployments")
    assert listed.status_code == 200 and listed.json()["data"] == []
