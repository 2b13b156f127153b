"""Security acceptance tests: the e2e daemon fixtures, and helpers that assert a refusal as a client sees it."""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

import requests

# Fixtures of a sibling package are not visible here; importing them into this conftest registers them.
from tests.e2e.conftest import agent, agent_factory, source_dir  # noqa: F401


def assert_error(response: requests.Response, status: int, error_type: str | None = None, naming: str | None = None) -> dict[str, Any]:
    """Asserts the contract's error envelope with this status; `naming` must appear in the message."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    body = response.json()
    assert body["success"] is False and body["status"] == status, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    if naming is not None:
        assert naming in body["error"]["message"], body
    return body


def assert_invalid(response: requests.Response, field: str) -> dict[str, Any]:
    """Asserts a 422 whose message and details name `field` (or a field under it)."""
    body = assert_error(response, 422, "validation_failed", naming=field)
    fields = [problem.get("field", "") for problem in body["error"]["details"] or []]
    assert any(name == field or name.startswith(field + ".") for name in fields), body
    return body


def wait_until(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05) -> Any:
    """Polls `predicate` until it returns something truthy; fails with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(interval)


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[str, dict[str, str], bytes]:
    """Sends raw bytes to the agent and reads one HTTP response: status line, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in received:
            chunk = _recv(sock, deadline)
            if not chunk:
                raise AssertionError(f"connection closed before a full response head: {received!r}")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            chunk = _recv(sock, deadline)
            if not chunk:
                break
            body += chunk
        return status_line, headers, body


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def envelope_of(body: bytes) -> dict[str, Any]:
    """The JSON error envelope in a raw response body; fails clearly when it is not one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        raise AssertionError(f"not a JSON body: {body[:300]!r}") from None
    assert parsed.get("success") is False, parsed
    return parsed
