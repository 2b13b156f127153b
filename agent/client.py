"""A small synchronous HTTP client for the agent's API, on the standard library only.

The command line uses it; it knows the HTTP contract and nothing of the engine or the store.
URLs are `http://host:port`, `https://host:port` or `unix:/path/to/api.sock`.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator, TypedDict, Unpack
from urllib.parse import quote, urlencode, urlsplit

from agent import __version__

DEFAULT_URL = "http://127.0.0.1:8420"
_CHUNK_SIZE = 64 * 1024


class _RequestOptions(TypedDict, total=False):
    """What a request may carry besides its method and path (see `AgentClient._open`)."""

    query: dict[str, Any] | None
    body: Any
    headers: dict[str, str] | None


class ClientError(Exception):
    """An API error envelope, or a failure to reach the agent at all (`status` is None then)."""

    def __init__(self, status: int | None, error_type: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.details = details


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix domain socket."""

    def __init__(self, socket_path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Calls the agent's HTTP API; every method raises ClientError on failure."""

    def __init__(self, url: str, token: str | None, timeout: float = 30) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self._socket_path: str | None = None
        self._scheme = "http"
        self._host = "localhost"
        self._port: int | None = None
        self._base_path = ""
        if url.startswith("unix:"):
            path = url[len("unix:"):]
            # Accept unix:///run/x.sock as well as unix:/run/x.sock.
            self._socket_path = "/" + path.lstrip("/") if path.startswith("//") else path
            if not self._socket_path:
                raise ClientError(None, "bad_url", f"{url}: a unix URL needs a socket path, as in unix:/run/api.sock")
            return
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(None, "bad_url", f"{url}: the agent URL must be http://host:port or unix:/path")
        try:
            port = parts.port
        except ValueError:
            raise ClientError(None, "bad_url", f"{url}: the port is not a number") from None
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port
        self._base_path = parts.path.rstrip("/")

    # --- the API ---------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/deployments; returns the created (or, for a repeated key, the earlier) deployment."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/deployments", body=body, headers=headers)

    def list(self, **filters: Any) -> dict[str, Any]:
        """GET /v1/deployments with filters such as application, server, status, limit, cursor."""
        return self._json("GET", "/v1/deployments", query=filters)

    def get(self, deployment_id: str) -> dict[str, Any]:
        """GET /v1/deployments/{id}."""
        return self._json("GET", _deployment_path(deployment_id))

    def watch(self, deployment_id: str, etag: str | None, wait_s: float) -> tuple[dict[str, Any] | None, str | None]:
        """A long poll of one deployment: (the deployment, its ETag) once it differs from `etag`, or
        (None, etag) when `wait_s` passed with no change."""
        headers = {"If-None-Match": etag} if etag else {}
        query = {"wait": f"{wait_s:g}"} if etag else None
        response, payload = self._exchange("GET", _deployment_path(deployment_id), query=query, headers=headers)
        if response.status == 304:
            return None, etag
        if not 200 <= response.status < 300:
            raise _error_from(response.status, response.reason, payload)
        return self._object_of(response.status, payload), response.getheader("ETag")

    def kill(self, deployment_id: str) -> dict[str, Any]:
        """POST /v1/deployments/{id}/kill."""
        return self._json("POST", _deployment_path(deployment_id, "kill"))

    def delete(self, deployment_id: str) -> None:
        """DELETE /v1/deployments/{id}."""
        self._call("DELETE", _deployment_path(deployment_id))

    def rollback(self, deployment_id: str) -> dict[str, Any]:
        """POST /v1/deployments/{id}/rollback; returns the new deployment."""
        return self._json("POST", _deployment_path(deployment_id, "rollback"))

    def servers(self) -> dict[str, Any]:
        """GET /v1/servers: `{"data": [server, ...]}`, each probed for reachability."""
        return self._json("GET", "/v1/servers")

    def server(self, name: str) -> dict[str, Any]:
        """GET /v1/servers/{name}: one server, probed now."""
        return self._json("GET", "/v1/servers/" + quote(name, safe=""))

    def applications(self) -> dict[str, Any]:
        """GET /v1/applications: `{"data": [application, ...]}`."""
        return self._json("GET", "/v1/applications")

    def application(self, name: str) -> dict[str, Any]:
        """GET /v1/applications/{name}."""
        return self._json("GET", _application_path(name))

    def stop_application(self, name: str) -> dict[str, Any]:
        """POST /v1/applications/{name}/stop; returns the application, now stopped."""
        return self._json("POST", _application_path(name, "stop"))

    def start_application(self, name: str) -> dict[str, Any]:
        """POST /v1/applications/{name}/start; returns the application, now running."""
        return self._json("POST", _application_path(name, "start"))

    def schedules(self, **filters: Any) -> dict[str, Any]:
        """GET /v1/schedules with filters application, status, limit, cursor."""
        return self._json("GET", "/v1/schedules", query=filters)

    def schedule(self, schedule_id: str) -> dict[str, Any]:
        """GET /v1/schedules/{id}."""
        return self._json("GET", _schedule_path(schedule_id))

    def create_schedule(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/schedules; returns the created (or, for a repeated key, the earlier) schedule."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/schedules", body=body, headers=headers)

    def update_schedule(self, schedule_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """PATCH /v1/schedules/{id}: replaces what `changes` names (config members are merged)."""
        return self._json("PATCH", _schedule_path(schedule_id), body=changes)

    def schedule_action(self, schedule_id: str, action: str) -> dict[str, Any]:
        """POST /v1/schedules/{id}/{pause,resume,trigger}: the schedule (the run's deployment for trigger)."""
        return self._json("POST", _schedule_path(schedule_id, action))

    def schedule_runs(self, schedule_id: str, **filters: Any) -> dict[str, Any]:
        """GET /v1/schedules/{id}/runs: a page of its runs, newest first."""
        return self._json("GET", _schedule_path(schedule_id, "runs"), query=filters)

    def archive_schedule(self, schedule_id: str) -> None:
        """DELETE /v1/schedules/{id}: no more runs; it and its runs are kept."""
        self._call("DELETE", _schedule_path(schedule_id))

    def logs(self, deployment_id: str, tail: int | None = None, offset: int | None = None) -> bytes:
        """GET /v1/deployments/{id}/logs: the log so far, or its last `tail` lines, or from byte `offset`."""
        _, body = self._call("GET", _deployment_path(deployment_id, "logs"), query={"tail": tail, "offset": offset})
        return body

    def follow_logs(self, deployment_id: str, tail: int | None = None) -> Iterator[bytes]:
        """Yields log chunks as they arrive until the agent ends the stream (the deployment is final)."""
        query = {"follow": "true", "tail": tail}
        connection, response = self._open("GET", _deployment_path(deployment_id, "logs"), query=query)
        try:
            if not 200 <= response.status < 300:
                raise _error_from(response.status, response.reason, self._read(response))
            # A followed log may stay quiet for as long as a build runs.
            if connection.sock is not None:
                connection.sock.settimeout(None)
            while True:
                try:
                    chunk = response.read1(_CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as exc:
                    raise ClientError(None, "connection_error", f"lost the log stream from {self.url}: {exc}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            connection.close()

    def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return self._json("GET", "/healthz")

    # --- transport -------------------------------------------------------------------------

    def _json(self, method: str, path: str, **options: Unpack[_RequestOptions]) -> dict[str, Any]:
        return self._object_of(*self._call(method, path, **options))

    def _object_of(self, status: int, payload: bytes) -> dict[str, Any]:
        """An answer's body as the JSON object it must be; ClientError otherwise."""
        try:
            data = json.loads(payload)
        except ValueError:
            raise ClientError(status, "bad_response", f"the agent at {self.url} answered with something not JSON") from None
        if not isinstance(data, dict):
            raise ClientError(status, "bad_response", f"the agent at {self.url} answered with JSON that is not an object")
        return data

    def _call(self, method: str, path: str, **options: Unpack[_RequestOptions]) -> tuple[int, bytes]:
        response, payload = self._exchange(method, path, **options)
        if not 200 <= response.status < 300:
            raise _error_from(response.status, response.reason, payload)
        return response.status, payload

    def _exchange(
        self, method: str, path: str, **options: Unpack[_RequestOptions]
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request, its response read whole, the connection closed; whatever the status."""
        connection, response = self._open(method, path, **options)
        try:
            return response, self._read(response)
        finally:
            connection.close()

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        target = self._base_path + path
        params = {key: _query_value(value) for key, value in (query or {}).items() if value is not None}
        if params:
            target += "?" + urlencode(params)
        request_headers = {"Accept": "application/json", "User-Agent": f"deploy-agent-cli/{__version__}"}
        if self.token:
            request_headers["Authorization"] = f"Bearer {self.token}"
        encoded: bytes | None = None
        if body is not None:
            encoded = json.dumps(body).encode("utf-8")
            request_headers["Content-Type"] = "application/json"
        request_headers.update(headers or {})
        connection = self._connection()
        try:
            connection.request(method, target, body=encoded, headers=request_headers)
            response = connection.getresponse()
        except TimeoutError:
            connection.close()
            raise ClientError(None, "timeout", f"the agent at {self.url} did not answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ClientError(None, "connection_error", f"cannot reach the agent at {self.url}: {_describe(exc)}") from None
        return connection, response

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except TimeoutError:
            raise ClientError(None, "timeout", f"the agent at {self.url} did not answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(None, "connection_error", f"lost the connection to {self.url}: {_describe(exc)}") from None

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return UnixHTTPConnection(self._socket_path, timeout=self.timeout)
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)


def _deployment_path(deployment_id: str, action: str | None = None) -> str:
    path = "/v1/deployments/" + quote(deployment_id, safe="")
    return f"{path}/{action}" if action else path


def _schedule_path(schedule_id: str, action: str | None = None) -> str:
    path = "/v1/schedules/" + quote(schedule_id, safe="")
    return f"{path}/{action}" if action else path


def _application_path(name: str, action: str | None = None) -> str:
    path = "/v1/applications/" + quote(name, safe="")
    return f"{path}/{action}" if action else path


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _error_from(status: int, reason: str, payload: bytes) -> ClientError:
    """Builds a ClientError from the contract's error envelope, or from whatever a proxy sent instead."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return ClientError(status, str(error.get("type") or "error"), error["message"], error.get("details"))
    text = payload.decode("utf-8", "replace").strip()
    summary = f"HTTP {status} {reason}".rstrip()
    if text:
        summary += ": " + (text if len(text) <= 200 else text[:200] + "...")
    return ClientError(status, "http_error", summary)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
