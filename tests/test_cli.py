"""The command line and its HTTP client, against a small fake agent (the real daemon is in e2e)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

import agent
from agent import cli
from agent.cli import main
from agent.client import AgentClient, ClientError
from agent.config import Config

TOKEN = "secret-token-for-tests"


def envelope(status: int, error_type: str, message: str, details: Any = None) -> web.Response:
    body = {"success": False, "status": status, "error": {"type": error_type, "message": message, "code": None, "details": details}}
    return web.json_response(body, status=status)


def deployment(deployment_id: str, status: str = "queued", **fields: Any) -> dict[str, Any]:
    record = {
        "id": deployment_id,
        "application": "web",
        "server": "local",
        "status": status,
        "created_at": "2026-11-22T12:00:00.000Z",
        "updated_at": "2026-11-22T12:00:01.000Z",
        "error": None,
        "metadata": {},
    }
    record.update(fields)
    return record


def application(name: str, state: str = "running", **fields: Any) -> dict[str, Any]:
    record = {
        "name": name,
        "current_deployment_id": f"dep_{name}_1",
        "state": state,
        "url": "http://127.0.0.1:32768" if state == "running" else None,
        "since": "2026-11-22T12:00:02.000Z",
        "runtime": "container",
        "container_id": "c0ffee" if state == "running" else None,
        "pid": 4242 if state == "running" else None,
        "updated_at": "2026-11-22T12:00:02.000Z",
    }
    record.update(fields)
    return record


class FakeAgent:
    """Just enough of the HTTP contract to drive the CLI; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        # Statuses GET /v1/deployments/{id} walks through, one per request; the last one sticks.
        self.statuses: dict[str, list[str]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.exit_codes: dict[str, int] = {}
        self.paged = False
        self.log_chunks: list[bytes] = [b"step 1\n", b"step 2\n", b"done\n"]
        self.chunk_delay_s = 0.0
        self.release_second_chunk: threading.Event | None = None
        self.applications: dict[str, dict[str, Any]] = {
            "web": application("web"),
            "api-server": application("api-server", "stopped", url=None, since="2026-11-22T12:09:00.000Z"),
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record_and_authenticate])
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/v1/deployments", self.list)
        app.router.add_post("/v1/deployments", self.submit)
        app.router.add_get("/v1/deployments/{id}", self.get)
        app.router.add_delete("/v1/deployments/{id}", self.delete)
        app.router.add_post("/v1/deployments/{id}/kill", self.kill)
        app.router.add_post("/v1/deployments/{id}/rollback", self.rollback)
        app.router.add_get("/v1/deployments/{id}/logs", self.logs)
        app.router.add_get("/v1/applications", self.list_applications)
        app.router.add_get("/v1/applications/{name}", self.get_application)
        app.router.add_post("/v1/applications/{name}/stop", self.stop_application)
        app.router.add_post("/v1/applications/{name}/start", self.start_application)
        return app

    @web.middleware
    async def record_and_authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "json": json.loads(body) if body else None,
            }
        )
        if request.path != "/healthz" and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return envelope(401, "unauthorized", "missing or unknown token")
        deployment_id = request.match_info.get("id")
        if deployment_id == "dep_proxy":
            return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")
        if deployment_id == "dep_missing":
            return envelope(404, "not_found", "deployment dep_missing not found")
        name = request.match_info.get("name")
        if name is not None and name not in self.applications:
            return envelope(404, "not_found", f"application {name} not found")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "test"})

    async def list(self, request: web.Request) -> web.Response:
        items = [
            deployment("dep_02", "building", application="api", updated_at="2026-11-22T12:05:00.000Z"),
            deployment("dep_01", "succeeded", server="edge-1"),
        ]
        if not self.paged:
            return web.json_response({"data": items, "next_cursor": None})
        # Three pages of one: dep_02, dep_01, dep_00.
        pages = {None: ([items[0]], "c1"), "c1": ([items[1]], "c2"), "c2": ([deployment("dep_00", "failed")], None)}
        data, next_cursor = pages[request.query.get("cursor")]
        return web.json_response({"data": data, "next_cursor": next_cursor})

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("application") == "BAD":
            details = [{"field": "application", "message": "must match ^[a-z0-9]..."}, {"field": "build.image", "message": "is required"}]
            return envelope(422, "validation_failed", "application: must match; build.image: is required", details)
        self.statuses.setdefault("dep_new", ["queued"])
        return web.json_response(deployment("dep_new", "queued", application=body["application"]), status=201)

    async def get(self, request: web.Request) -> web.Response:
        deployment_id = request.match_info["id"]
        statuses = self.statuses.get(deployment_id, ["succeeded"])
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        record = deployment(deployment_id, status, error=self.errors.get(deployment_id), exit_code=self.exit_codes.get(deployment_id))
        return web.json_response(record)

    async def delete(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def kill(self, request: web.Request) -> web.Response:
        if request.match_info["id"] == "dep_final":
            return envelope(409, "conflict", "deployment dep_final is already succeeded")
        return web.json_response(deployment(request.match_info["id"], "building"), status=202)

    async def rollback(self, request: web.Request) -> web.Response:
        if request.match_info["id"] == "dep_pruned":
            return envelope(409, "conflict", "deployment dep_pruned has no release to return to: its image was pruned")
        self.statuses.setdefault("dep_rb", ["queued"])
        return web.json_response(deployment("dep_rb", "queued", rollback_of=request.match_info["id"]), status=201)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("follow") != "true":
            text = b"".join(self.log_chunks)
            if "tail" in request.query:
                text = b"".join(text.splitlines(keepends=True)[-int(request.query["tail"]):])
            return web.Response(body=text, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        for index, chunk in enumerate(self.log_chunks):
            if index == 1 and self.release_second_chunk is not None:
                deadline = time.monotonic() + 5
                while not self.release_second_chunk.is_set():
                    if time.monotonic() > deadline:
                        chunk = b"never released: the client waited for the whole response\n"
                        break
                    await asyncio.sleep(0.01)
            elif index and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await response.write(chunk)
        await response.write_eof()
        return response


    async def list_applications(self, request: web.Request) -> web.Response:
        return web.json_response({"data": list(self.applications.values())})

    async def get_application(self, request: web.Request) -> web.Response:
        return web.json_response(self.applications[request.match_info["name"]])

    async def stop_application(self, request: web.Request) -> web.Response:
        return self.change_state(request.match_info["name"], "stopped", url=None)

    async def start_application(self, request: web.Request) -> web.Response:
        return self.change_state(request.match_info["name"], "running", url="http://127.0.0.1:32769")

    def change_state(self, name: str, state: str, url: str | None) -> web.Response:
        record = self.applications[name]
        if record["state"] == state:
            verb = "stop" if state == "stopped" else "start"
            return envelope(409, "conflict", f"application {name} has nothing to {verb}: it is already {state}")
        record.update(state=state, url=url, since="2026-11-22T13:00:00.000Z")
        return web.json_response(record, status=202)


@contextmanager
def serve_app(app: web.Application, unix_path: str | None = None) -> Iterator[str]:
    """Runs an aiohttp app on its own loop in a thread; yields its URL and always stops it."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    loop.run_until_complete(runner.setup())
    site: web.BaseSite = web.UnixSite(runner, unix_path) if unix_path else web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    url = f"unix:{unix_path}" if unix_path else "http://127.0.0.1:{}".format(runner.addresses[0][1])
    thread = threading.Thread(target=loop.run_forever, name="fake-agent", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def fake_agent() -> FakeAgent:
    """The fake agent's state, to script and inspect."""
    return FakeAgent()


@pytest.fixture
def agent_url(fake_agent: FakeAgent) -> Iterator[str]:
    """The fake agent served over TCP on a free port."""
    with serve_app(fake_agent.app()) as url:
        yield url


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DEPLOY_AGENT_* variables and no ./.deploy-agent/token leak into a test."""
    monkeypatch.delenv("DEPLOY_AGENT_URL", raising=False)
    monkeypatch.delenv("DEPLOY_AGENT_TOKEN", raising=False)
    monkeypatch.delenv("DEPLOY_AGENT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.commands, "POLL_INTERVAL_S", 0.01)


def run_cli(*args: str) -> int:
    return main(list(args))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the daemon commands -----------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints `deploy-agent <version>` and exits 0."""
    assert run_cli("--version") == 0
    assert capsys.readouterr().out == f"deploy-agent {agent.__version__}\n"


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """No subcommand: usage on stderr, exit 2."""
    assert run_cli() == 2
    assert "usage: deploy-agent" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand exits 2 through argparse, without a traceback."""
    assert run_cli("deploy-everything") == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replaces agent.daemon with a module whose serve() records the config it was given."""
    served: list[Config] = []

    def serve(config: Config, *, token_file_hint: bool = True) -> int:
        served.append(config)
        return 0

    module = types.ModuleType("agent.daemon")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agent.daemon", module)
    return served


def test_run_without_config_serves_the_defaults(fake_daemon: list[Config]) -> None:
    """`run` with no --config hands the built-in defaults to the daemon."""
    assert run_cli("run") == 0
    assert fake_daemon == [Config()]


def test_run_with_config_serves_it(fake_daemon: list[Config], tmp_path: Path) -> None:
    """`run --config FILE` loads FILE and hands it to the daemon."""
    path = tmp_path / "config.toml"
    path.write_text('[agent]\nlisten = "127.0.0.1:9999"\nmax_concurrent = 2\n', encoding="utf-8")
    assert run_cli("run", "--config", str(path)) == 0
    (config,) = fake_daemon
    assert (config.agent.listen.port, config.agent.max_concurrent) == (9999, 2)


def test_run_refuses_an_invalid_config(
    fake_daemon: list[Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid config: one `config error:` line per problem, exit 2, the daemon never starts."""
    path = tmp_path / "config.toml"
    path.write_text("[agent]\nlisten = 1\nbogus = true\n", encoding="utf-8")
    assert run_cli("run", "--config", str(path)) == 2
    assert fake_daemon == []
    assert capsys.readouterr().err.splitlines() == [
        "config error: agent.bogus: unknown key",
        "config error: agent.listen: must be a string, got an integer",
    ]


# --- errors ------------------------------------------------------------------------------------


def test_api_error_prints_message_and_exits_1(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 404 envelope becomes `error: <message>` on stderr and exit 1, with no traceback."""
    assert run_cli("show", "dep_missing", "--url", agent_url, "--token", TOKEN) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: deployment dep_missing not found\n"
    assert captured.out == ""


def test_validation_details_are_listed(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 422 prints the message and then one indented line per bad field."""
    code = run_cli("submit", "--url", agent_url, "--token", TOKEN, "--app", "BAD", "--image", "x", "--command", "true")
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: application: must match; build.image: is required",
        "  application: must match ^[a-z0-9]...",
        "  build.image: is required",
    ]


def test_conflict_on_kill(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 409 from kill is an error line and exit 1."""
    assert run_cli("kill", "dep_final", "--url", agent_url, "--token", TOKEN) == 1
    assert capsys.readouterr().err == "error: deployment dep_final is already succeeded\n"


def test_missing_token_is_reported(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a token the agent's 401 message is shown."""
    assert run_cli("ls", "--url", agent_url) == 1
    assert capsys.readouterr().err == "error: missing or unknown token\n"


def test_non_envelope_error_is_summarised(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An error body that is not the envelope (a proxy's HTML) is shown as status and text."""
    assert run_cli("show", "dep_proxy", "--url", agent_url, "--token", TOKEN) == 1
    assert capsys.readouterr().err == "error: HTTP 502 Bad Gateway: <html>Bad Gateway</html>\n"


def test_connection_refused_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: `error: cannot reach the agent at URL: ...`, exit 69, no traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    assert run_cli("ls", "--url", url, "--token", TOKEN) == cli.EXIT_UNREACHABLE == 69
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the agent at {url}: ")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_unix_socket_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A unix URL whose socket does not exist is a one-line error, exit 69."""
    url = f"unix:{tmp_path}/api.sock"
    assert run_cli("ls", "--url", url) == cli.EXIT_UNREACHABLE
    assert capsys.readouterr().err == f"error: cannot reach the agent at {url}: No such file or directory\n"


def test_bad_url_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL that is neither http(s) nor unix is rejected with one line."""
    assert run_cli("ls", "--url", "ftp://example.com") == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: ftp://example.com: the agent URL must be")


def test_client_raises_client_error_with_the_envelope(agent_url: str) -> None:
    """AgentClient turns the envelope into ClientError(status, type, message, details)."""
    client = AgentClient(agent_url, TOKEN)
    with pytest.raises(ClientError) as caught:
        client.get("dep_missing")
    error = caught.value
    assert (error.status, error.error_type, error.message, error.details) == (
        404, "not_found", "deployment dep_missing not found", None,
    )


def test_ctrl_c_exits_130_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """KeyboardInterrupt during a command exits 130 and prints nothing."""
    def interrupted(self: AgentClient, **filters: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(AgentClient, "list", interrupted)
    assert run_cli("ls") == 130
    assert capsys.readouterr() == ("", "")


# --- URL and token resolution ------------------------------------------------------------------


def test_url_and_token_from_environment(
    agent_url: str, fake_agent: FakeAgent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DEPLOY_AGENT_URL and DEPLOY_AGENT_TOKEN stand in for --url and --token."""
    monkeypatch.setenv("DEPLOY_AGENT_URL", agent_url)
    monkeypatch.setenv("DEPLOY_AGENT_TOKEN", TOKEN)
    assert run_cli("ls") == 0
    assert fake_agent.requests[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"


def test_flags_override_environment(
    agent_url: str, fake_agent: FakeAgent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--url and --token win over the environment."""
    monkeypatch.setenv("DEPLOY_AGENT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DEPLOY_AGENT_TOKEN", "wrong-token")
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN) == 0


def test_token_file_of_a_local_agent_is_used(
    agent_url: str, fake_agent: FakeAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no --token or env variable, ./.deploy-agent/token (written by `run`) is used."""
    (tmp_path / ".deploy-agent").mkdir()
    (tmp_path / ".deploy-agent" / "token").write_text(TOKEN + "\n", encoding="utf-8")
    assert run_cli("ls", "--url", agent_url) == 0
    assert fake_agent.requests[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"


def test_unix_socket_url(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """A unix:/path URL reaches an agent listening on a unix socket."""
    # Socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="da-") as directory:
        with serve_app(fake_agent.app(), unix_path=f"{directory}/api.sock") as url:
            assert run_cli("show", "dep_01", "--url", url, "--token", TOKEN, "--json") == 0
            assert json.loads(capsys.readouterr().out)["id"] == "dep_01"
            assert AgentClient(url.replace("unix:", "unix://"), TOKEN).health()["status"] == "ok"
            assert b"".join(AgentClient(url, TOKEN).follow_logs("dep_01")) == b"step 1\nstep 2\ndone\n"


# --- the client commands -----------------------------------------------------------------------


def test_submit_from_flags(agent_url: str, fake_agent: FakeAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flags build the request (absolute source path, env, timeout, server, key); output is `ID status`."""
    (tmp_path / "src").mkdir()
    code = run_cli(
        "submit", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "local/busybox",
        "--command", "echo hi > /workspace/index.html", "--env", "A=1", "--env", "B=x=y", "--source-path", "src",
        "--timeout", "30", "--server", "edge-1", "--idempotency-key", "key-1",
    )
    assert code == 0
    assert capsys.readouterr().out == "dep_new queued\n"
    request = fake_agent.requests[-1]
    assert request["headers"]["Idempotency-Key"] == "key-1"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["json"] == {
        "application": "web",
        "server": "edge-1",
        "source": {"type": "path", "path": str(tmp_path / "src")},
        "build": {"image": "local/busybox", "command": "echo hi > /workspace/index.html", "env": {"A": "1", "B": "x=y"}, "timeout_s": 30.0},
    }


def test_submit_from_file_and_stdin(
    agent_url: str, fake_agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`submit FILE` sends the file's JSON as is; `-` reads it from stdin; --json prints the full object."""
    body = {"application": "web", "build": {"image": "i", "command": ["true"]}, "metadata": {"commit": "abc"}}
    (tmp_path / "request.json").write_text(json.dumps(body), encoding="utf-8")
    assert run_cli("submit", "request.json", "--url", agent_url, "--token", TOKEN, "--json") == 0
    assert fake_agent.requests[-1]["json"] == body
    assert json.loads(capsys.readouterr().out)["id"] == "dep_new"

    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(read=lambda: json.dumps(body)))
    assert run_cli("submit", "-", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["json"] == body


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "web"], "error: without FILE, --image and --command are required"),
        (["request.json", "--app", "web"], "error: give FILE or flags, not both (got FILE and --app)"),
        (["missing.json"], "error: missing.json: cannot read: No such file or directory"),
        (["--app", "w", "--image", "i", "--command", "c", "--env", "NOVALUE"], "error: --env 'NOVALUE': expected KEY=VALUE"),
        (["--app", "w", "--run-image", "i", "--run-env", "NOVALUE"], "error: --run-env 'NOVALUE': expected KEY=VALUE"),
        (["request.json", "--port", "80", "--health-tcp"], "error: give FILE or flags, not both (got FILE and --port, --health-tcp)"),
        (["--run-image", "nginx"], "error: without FILE, --app is required"),
        (["--app", "w", "--run-image", "nginx", "--env", "A=1"], "error: a build needs --image and --command (got --env)"),
        (["--app", "w", "--port", "80"], "error: a container release needs a build (--image and --command) or --run-image"),
        (["--app", "w", "--runtime", "process"], "error: --runtime process needs --run-command"),
        (["--app", "w", "--image", "i", "--command", "c", "--health-path", "/"],
         "error: --health-path checks a release: give --run-command, --run-image or --port too"),
    ],
)
def test_submit_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """Bad submit input is a one-line error and exit 2, before any request is sent."""
    (tmp_path / "request.json").write_text("{}", encoding="utf-8")
    assert run_cli("submit", *args) == 2
    assert capsys.readouterr().err == message + "\n"


def test_submit_rejects_a_file_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A request file that is not JSON is a one-line error and exit 2."""
    (tmp_path / "request.json").write_text("application: web", encoding="utf-8")
    assert run_cli("submit", "request.json") == 2
    assert capsys.readouterr().err.startswith("error: request.json: not valid JSON: ")


def test_submit_wait_succeeds(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """--wait polls until a final status and exits 0 when it is succeeded."""
    fake_agent.statuses["dep_new"] = ["queued", "building", "deploying", "succeeded"]
    code = run_cli("submit", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "i", "--command", "c", "--wait")
    assert code == 0
    assert capsys.readouterr().out.splitlines() == ["dep_new queued", "dep_new succeeded"]


def test_submit_wait_fails(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """--wait exits 1 when the deployment fails, printing the final status and its error."""
    fake_agent.statuses["dep_new"] = ["queued", "building", "failed"]
    fake_agent.errors["dep_new"] = {"type": "build_failed", "message": "build exited with code 3"}
    code = run_cli("submit", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "i", "--command", "c", "--wait")
    assert code == 1
    assert capsys.readouterr().out.splitlines() == ["dep_new queued", "dep_new failed: build exited with code 3"]


def test_submit_follow_streams_then_exits_on_status(
    agent_url: str, fake_agent: FakeAgent, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """--follow writes the log to stdout, the verdict to stderr, and exits like --wait."""
    fake_agent.statuses["dep_new"] = ["cancelled"]
    code = run_cli("submit", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "i", "--command", "c", "--follow")
    assert code == cli.EXIT_CANCELLED == 143
    captured = capsysbinary.readouterr()
    assert captured.out == b"step 1\nstep 2\ndone\n"
    assert captured.err == b"dep_new cancelled\n"


def test_ls_table(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """ls prints aligned columns in the agent's (newest first) order and passes the filters on."""
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN, "--app", "web", "--status", "failed", "--limit", "5") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "APPLICATION", "SERVER", "STATUS", "CREATED", "UPDATED"]
    assert lines[1].split() == ["dep_02", "api", "local", "building", "2026-11-22T12:00:00.000Z", "2026-11-22T12:05:00.000Z"]
    assert lines[2].split()[:4] == ["dep_01", "web", "edge-1", "succeeded"]
    assert lines[0].index("STATUS") == lines[1].index("building") == lines[2].index("succeeded")
    assert fake_agent.requests[-1]["query"] == {"application": "web", "status": "failed", "limit": "5"}


def test_ls_json(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """ls --json prints the agent's page as JSON."""
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN, "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert [item["id"] for item in page["data"]] == ["dep_02", "dep_01"] and page["next_cursor"] is None


def test_show_human_readable(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints `key: value` lines; null is `-`, objects are compact JSON."""
    assert run_cli("show", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()}
    assert lines["id"] == "dep_01" and lines["status"] == "succeeded"
    assert lines["error"] == "-" and lines["metadata"] == "{}"


def test_logs_and_tail(agent_url: str, fake_agent: FakeAgent, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """logs prints the log bytes; --tail N is passed to the agent."""
    assert run_cli("logs", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    assert capsysbinary.readouterr().out == b"step 1\nstep 2\ndone\n"
    assert run_cli("logs", "dep_01", "--tail", "1", "--url", agent_url, "--token", TOKEN) == 0
    assert capsysbinary.readouterr().out == b"done\n"
    assert fake_agent.requests[-1]["query"] == {"tail": "1"}


def test_logs_follow(agent_url: str, fake_agent: FakeAgent, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """logs -f streams until the agent ends the response, asking with follow=true."""
    assert run_cli("logs", "-f", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    assert capsysbinary.readouterr().out == b"step 1\nstep 2\ndone\n"
    assert fake_agent.requests[-1]["query"] == {"follow": "true"}


def test_follow_logs_yields_chunks_as_they_arrive(agent_url: str, fake_agent: FakeAgent) -> None:
    """follow_logs hands over the first chunk before the agent has written the second."""
    fake_agent.release_second_chunk = threading.Event()
    chunks = AgentClient(agent_url, TOKEN).follow_logs("dep_01")
    assert next(chunks) == b"step 1\n"
    fake_agent.release_second_chunk.set()
    assert b"".join(chunks) == b"step 2\ndone\n"


def test_follow_logs_has_no_read_timeout(agent_url: str, fake_agent: FakeAgent) -> None:
    """A followed log may stay silent for longer than the client's timeout."""
    fake_agent.chunk_delay_s = 0.6
    client = AgentClient(agent_url, TOKEN, timeout=0.3)
    assert b"".join(client.follow_logs("dep_01")) == b"step 1\nstep 2\ndone\n"


def test_follow_logs_error_is_client_error(agent_url: str) -> None:
    """An error answer to a followed log raises ClientError like any other call."""
    with pytest.raises(ClientError, match="deployment dep_missing not found"):
        list(AgentClient(agent_url, TOKEN).follow_logs("dep_missing"))


def test_kill_rm_rollback(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """kill, rm and rollback call the right endpoints and print one line each."""
    assert run_cli("kill", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["method"] == "POST" and fake_agent.requests[-1]["path"] == "/v1/deployments/dep_01/kill"
    assert run_cli("rm", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["method"] == "DELETE" and fake_agent.requests[-1]["path"] == "/v1/deployments/dep_01"
    assert run_cli("rollback", "dep_01", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["path"] == "/v1/deployments/dep_01/rollback"
    assert capsys.readouterr().out.splitlines() == [
        "dep_01 building",
        "dep_01 deleted",
        "dep_rb queued (rollback of dep_01)",
    ]


def test_submit_with_release_flags(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """Build and --run-*/--port/--health-path flags make `build`, `run` and an http `health_check` in the body."""
    code = run_cli(
        "submit", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "local/busybox",
        "--command", "echo hi > /workspace/index.html", "--run-command", "httpd -f -p 8080 -h /workspace",
        "--runtime", "container", "--port", "8080", "--host-port", "18080", "--run-env", "MODE=prod",
        "--run-env", "X=a=b", "--health-path", "/healthz",
    )
    assert code == 0
    assert capsys.readouterr().out == "dep_new queued\n"
    assert fake_agent.requests[-1]["json"] == {
        "application": "web",
        "build": {"image": "local/busybox", "command": "echo hi > /workspace/index.html"},
        "run": {
            "runtime": "container",
            "command": "httpd -f -p 8080 -h /workspace",
            "port": 8080,
            "host_port": 18080,
            "env": {"MODE": "prod", "X": "a=b"},
        },
        "health_check": {"type": "http", "path": "/healthz"},
    }


def test_submit_release_without_build(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """A run image needs no build: the body has `run` and a tcp `health_check` but no `build`."""
    code = run_cli(
        "submit", "--url", agent_url, "--token", TOKEN, "--app", "cache", "--run-image", "redis:7", "--port", "6379",
        "--health-tcp",
    )
    assert code == 0
    assert fake_agent.requests[-1]["json"] == {
        "application": "cache",
        "run": {"image": "redis:7", "port": 6379},
        "health_check": {"type": "tcp"},
    }


def test_submit_process_release(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """--runtime process with --run-command sends a process run; the command stays one /bin/sh -c string."""
    code = run_cli(
        "submit", "--url", agent_url, "--token", TOKEN, "--app", "worker", "--runtime", "process",
        "--run-command", "python3 -m http.server $PORT", "--run-env", "PORT=9000", "--port", "9000",
    )
    assert code == 0
    assert fake_agent.requests[-1]["json"] == {
        "application": "worker",
        "run": {"runtime": "process", "command": "python3 -m http.server $PORT", "port": 9000, "env": {"PORT": "9000"}},
    }


def test_submit_health_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    """--health-path and --health-tcp together are an argparse usage error, exit 2."""
    assert run_cli("submit", "--app", "w", "--run-image", "i", "--health-path", "/", "--health-tcp") == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_rollback_conflict(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 409 from rollback (no release to return to) prints the agent's reason and exits 1, even with --wait."""
    assert run_cli("rollback", "dep_pruned", "--wait", "--url", agent_url, "--token", TOKEN) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: deployment dep_pruned has no release to return to: its image was pruned\n"
    assert captured.out == ""


def test_rollback_wait_succeeds(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """rollback --wait polls the new deployment and exits 0 when it succeeds."""
    fake_agent.statuses["dep_rb"] = ["queued", "deploying", "succeeded"]
    assert run_cli("rollback", "dep_01", "--wait", "--url", agent_url, "--token", TOKEN) == 0
    assert capsys.readouterr().out.splitlines() == ["dep_rb queued (rollback of dep_01)", "dep_rb succeeded"]
    assert fake_agent.requests[-1]["path"] == "/v1/deployments/dep_rb"


def test_rollback_wait_fails(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """rollback --wait exits 1 when the new deployment fails, printing its error."""
    fake_agent.statuses["dep_rb"] = ["queued", "deploying", "failed"]
    fake_agent.errors["dep_rb"] = {"type": "health_check_failed", "message": "health check never passed"}
    assert run_cli("rollback", "dep_01", "--wait", "--url", agent_url, "--token", TOKEN) == 1
    assert capsys.readouterr().out.splitlines() == [
        "dep_rb queued (rollback of dep_01)",
        "dep_rb failed: health check never passed",
    ]


def test_rollback_wait_json(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """rollback --wait --json prints only the final deployment as JSON."""
    fake_agent.statuses["dep_rb"] = ["queued", "succeeded"]
    assert run_cli("rollback", "dep_01", "--wait", "--json", "--url", agent_url, "--token", TOKEN) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"


def test_rollback_follow(agent_url: str, fake_agent: FakeAgent, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """rollback --follow streams the new deployment's log, then exits on its status like submit --follow."""
    fake_agent.statuses["dep_rb"] = ["succeeded"]
    assert run_cli("rollback", "dep_01", "--follow", "--url", agent_url, "--token", TOKEN) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"step 1\nstep 2\ndone\n"
    assert captured.err == b"dep_rb succeeded\n"
    assert any(request["path"] == "/v1/deployments/dep_rb/logs" for request in fake_agent.requests)


def test_rollback_wait_and_follow_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    """rollback --wait --follow is a usage error, exit 2."""
    assert run_cli("rollback", "dep_01", "--wait", "--follow") == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_apps_table(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """apps prints NAME, STATE, DEPLOYMENT, URL, SINCE in aligned columns; a null URL is `-`."""
    assert run_cli("apps", "--url", agent_url, "--token", TOKEN) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "DEPLOYMENT", "URL", "SINCE"]
    assert lines[1].split() == ["web", "running", "dep_web_1", "http://127.0.0.1:32768", "2026-11-22T12:00:02.000Z"]
    assert lines[2].split() == ["api-server", "stopped", "dep_api-server_1", "-", "2026-11-22T12:09:00.000Z"]
    assert lines[0].index("STATE") == lines[1].index("running") == lines[2].index("stopped")
    assert lines[0].index("URL") == lines[1].index("http:") == lines[2].index("-  ")
    assert fake_agent.requests[-1]["method"] == "GET" and fake_agent.requests[-1]["path"] == "/v1/applications"


def test_apps_json(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """apps --json prints the agent's answer as is."""
    assert run_cli("apps", "--json", "--url", agent_url, "--token", TOKEN) == 0
    assert json.loads(capsys.readouterr().out) == {"data": list(fake_agent.applications.values())}


def test_apps_show_one(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """apps NAME prints one application as `key: value` lines; --json prints its object."""
    assert run_cli("apps", "api-server", "--url", agent_url, "--token", TOKEN) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert lines["name"] == "api-server" and lines["state"] == "stopped"
    assert lines["current_deployment_id"] == "dep_api-server_1" and lines["url"] == "-" and lines["pid"] == "-"
    assert fake_agent.requests[-1]["path"] == "/v1/applications/api-server"
    assert run_cli("apps", "web", "--json", "--url", agent_url, "--token", TOKEN) == 0
    assert json.loads(capsys.readouterr().out) == application("web")


def test_apps_unknown_is_an_error(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """apps NAME for an unknown application prints the 404 message and exits 1."""
    assert run_cli("apps", "nope", "--url", agent_url, "--token", TOKEN) == 1
    assert capsys.readouterr() == ("", "error: application nope not found\n")


def test_stop_and_start(agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """stop prints `APP stopped`, start prints `APP running (url)`; both POST to the application's path."""
    assert run_cli("stop", "web", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["method"] == "POST" and fake_agent.requests[-1]["path"] == "/v1/applications/web/stop"
    assert run_cli("start", "web", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["method"] == "POST" and fake_agent.requests[-1]["path"] == "/v1/applications/web/start"
    assert capsys.readouterr().out.splitlines() == ["web stopped", "web running (http://127.0.0.1:32769)"]


def test_stop_json(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """stop --json prints the application object the agent returned."""
    assert run_cli("stop", "web", "--json", "--url", agent_url, "--token", TOKEN) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["name"], answer["state"], answer["url"]) == ("web", "stopped", None)


@pytest.mark.parametrize(
    ("command", "app", "message"),
    [
        ("stop", "api-server", "error: application api-server has nothing to stop: it is already stopped"),
        ("start", "web", "error: application web has nothing to start: it is already running"),
        ("stop", "nope", "error: application nope not found"),
        ("start", "nope", "error: application nope not found"),
    ],
)
def test_stop_start_errors(agent_url: str, capsys: pytest.CaptureFixture[str], command: str, app: str, message: str) -> None:
    """A 409 (nothing to stop/start) or 404 (unknown application) is one error line and exit 1."""
    assert run_cli(command, app, "--url", agent_url, "--token", TOKEN) == 1
    assert capsys.readouterr() == ("", message + "\n")


def test_client_application_methods(agent_url: str) -> None:
    """AgentClient's application methods return the agent's objects and raise ClientError with the status."""
    client = AgentClient(agent_url, TOKEN)
    assert [item["name"] for item in client.applications()["data"]] == ["web", "api-server"]
    assert client.application("web")["state"] == "running"
    assert client.stop_application("web")["state"] == "stopped"
    assert client.start_application("web")["state"] == "running"
    with pytest.raises(ClientError) as caught:
        client.start_application("web")
    assert (caught.value.status, caught.value.error_type) == (409, "conflict")


def test_health(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """health prints the agent's status, without needing a token."""
    assert run_cli("health", "--url", agent_url) == 0
    assert capsys.readouterr().out == "ok\n"


# --- paging, quiet, exit codes, global flags, config, completion, terminals -------------------


def test_ls_says_on_stderr_when_more_exist_and_pages_with_cursor_and_all(
    agent_url: str, fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.paged = True
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN) == 0
    out, err = capsys.readouterr()
    assert "dep_02" in out and "dep_01" not in out
    assert err == "more exist: deploy-agent ls --cursor c1 (or --all)\n"
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN, "--cursor", "c1") == 0
    out, err = capsys.readouterr()
    assert "dep_01" in out and "dep_02" not in out and "--cursor c2" in err
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN, "--all", "-q") == 0
    out, err = capsys.readouterr()
    assert out == "dep_02\ndep_01\ndep_00\n" and err == ""
    assert [r["query"].get("cursor") for r in fake_agent.requests[-3:]] == [None, "c1", "c2"]
    assert run_cli("ls", "--url", agent_url, "--token", TOKEN, "--all", "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in page["data"]] == ["dep_02", "dep_01", "dep_00"] and page["next_cursor"] is None


def test_submit_quiet_prints_only_the_id(agent_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("submit", "-q", "--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "i", "--command", "c") == 0
    assert capsys.readouterr().out == "dep_new\n"


@pytest.mark.parametrize(
    ("status", "error", "exit_code", "expected"),
    [
        ("succeeded", None, 0, 0),
        ("failed", {"type": "build_failed", "message": "build command exited with code 7"}, 7, 7),
        ("failed", {"type": "timeout", "message": "build timed out"}, 137, 137),
        ("failed", {"type": "health_check_failed", "message": "never healthy"}, 3, 1),
        ("failed", {"type": "runtime_failure", "message": "no such image"}, None, 1),
        ("cancelled", {"type": "cancelled", "message": "killed on request"}, 143, 143),
    ],
)
def test_submit_wait_exits_with_the_builds_own_code(
    agent_url: str, fake_agent: FakeAgent, status: str, error: Any, exit_code: int | None, expected: int
) -> None:
    """Like `docker run`: a failed build's code is passed on; a cancelled deployment is 143."""
    fake_agent.statuses["dep_new"] = ["queued", "building", status]
    if error:
        fake_agent.errors["dep_new"] = error
    if exit_code is not None:
        fake_agent.exit_codes["dep_new"] = exit_code
    args = ("--url", agent_url, "--token", TOKEN, "--app", "web", "--image", "i", "--command", "c", "--wait")
    assert run_cli("submit", *args) == expected


def test_url_and_token_may_come_before_the_subcommand(agent_url: str, fake_agent: FakeAgent) -> None:
    assert run_cli("--url", agent_url, "--token", TOKEN, "ls") == 0
    assert run_cli("--url", "http://127.0.0.1:1", "--token", "wrong", "ls", "--url", agent_url, "--token", TOKEN) == 0
    assert fake_agent.requests[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"


def test_deploy_agent_config_names_the_agent_to_call_and_the_file_to_check(
    agent_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = agent_url.rsplit(":", 1)[1]
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nlisten = "0.0.0.0:{port}"\nstate_dir = "{tmp_path}/state"\n')
    monkeypatch.setenv("DEPLOY_AGENT_CONFIG", str(config))
    assert run_cli("ls", "--token", TOKEN) == 0
    assert run_cli("check-config") == 0
    assert capsys.readouterr().out.endswith(f"{config}: ok\n")
    config.write_text("[agent]\nlisten = 5\n")
    assert run_cli("check-config") == cli.EXIT_USAGE
    assert run_cli("ls", "--token", TOKEN) == cli.EXIT_USAGE
    assert "DEPLOY_AGENT_CONFIG" in capsys.readouterr().err


def test_completion_scripts_complete_commands_and_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The bash script, run by bash; zsh gets the same one through bashcompinit."""
    import subprocess

    assert run_cli("completion", "bash") == 0
    script = tmp_path / "completion.sh"
    script.write_text(capsys.readouterr().out)
    assert run_cli("completion", "zsh") == 0
    assert capsys.readouterr().out == "#compdef deploy-agent\nautoload -U +X bashcompinit && bashcompinit\n" + script.read_text()
    probe = (
        f"source {script}; "
        "COMP_WORDS=(deploy-agent --url http://x l); COMP_CWORD=3; _deploy_agent; echo \"${COMPREPLY[@]}\"; "
        "COMP_WORDS=(deploy-agent ls --a); COMP_CWORD=2; _deploy_agent; echo \"${COMPREPLY[@]}\""
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ls logs", "--app --all"]


def test_control_characters_in_build_output_are_escaped_on_a_terminal(agent_url: str, fake_agent: FakeAgent) -> None:
    """On a TTY, escape sequences from a build show as text; piped, the bytes are passed as they are."""
    import os
    import pty
    import subprocess

    fake_agent.log_chunks = [b"plain \x1b]0;owned\x07title\n", b"red \x1b[31mtext\r\x1b[2Jcleared\xc2", b"\x9b \xc3\xa9\n"]
    command = [sys.executable, "-m", "agent", "logs", "dep_x", "--url", agent_url, "--token", TOKEN]
    piped = subprocess.run(command, capture_output=True, timeout=30)
    assert piped.stdout == b"".join(fake_agent.log_chunks)
    leader, follower = pty.openpty()
    try:
        process = subprocess.run(command, stdout=follower, stderr=subprocess.PIPE, timeout=30)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert process.returncode == 0, process.stderr
    text_shown = shown.replace(b"\r\n", b"\n")  # the terminal's own newline translation
    assert b"\x1b" not in text_shown and b"\x07" not in text_shown and b"\xc2\x9b" not in text_shown
    assert text_shown == (
        b"plain \\x1b]0;owned\\x07title\nred \\x1b[31mtext\\x0d\\x1b[2Jcleared\\x9b \xc3\xa9\n"
    )


def test_control_escaper_handles_a_c1_control_split_between_chunks() -> None:
    from agent.cli.output import ControlEscaper

    escaper = ControlEscaper()
    assert escaper.feed(b"a\xc2") + escaper.feed(b"\x9bb\xc2") + escaper.feed(b"\xa9") + escaper.flush() == b"a\\x9bb\xc2\xa9"
    assert escaper.feed(b"tab\tok\n") == b"tab\tok\n"
