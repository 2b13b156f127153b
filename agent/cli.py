"""The command line: daemon commands (`run`, `check-config`) and clients of a running agent.

The client commands speak HTTP through `agent.client` and know nothing of the engine or the store.
Exit codes: 0 success, 1 an API or connection error (or a deployment that did not succeed),
2 a usage or config error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from agent import __version__
from agent.client import DEFAULT_URL, AgentClient, ClientError
from agent.config import Config
from agent.errors import ConfigError
from agent.models import FINAL_STATUSES

# Where `deploy-agent run` without a config keeps the token it generates.
LOCAL_TOKEN_FILE = Path(".deploy-agent") / "token"
POLL_INTERVAL_S = 1.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input found after argument parsing (an unreadable request file, say); exits 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command line and returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    if args.handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except ClientError as exc:
        print_client_error(exc)
        return EXIT_FAILED
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`deploy-agent logs x | head`): silence the flush at exit too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one subcommand per verb, each with its handler in `handler`."""
    parser = argparse.ArgumentParser(prog="deploy-agent", description="A small, durable deployment daemon and its client.")
    parser.add_argument("--version", action="version", version=f"deploy-agent {__version__}")
    parser.set_defaults(handler=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground until SIGTERM/SIGINT")
    run.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    run.set_defaults(handler=run_daemon)

    check = commands.add_parser("check-config", help="validate a config file (exit 0 if valid, 2 if not)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=check_config)

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url", help=f"the agent's URL, http://host:port or unix:/path (env DEPLOY_AGENT_URL, default {DEFAULT_URL})"
    )
    connection.add_argument(
        "--token", help=f"API token (env DEPLOY_AGENT_TOKEN, else the file {LOCAL_TOKEN_FILE} if present)"
    )
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print the full JSON")
    waiting = argparse.ArgumentParser(add_help=False)
    wait_or_follow = waiting.add_mutually_exclusive_group()
    wait_or_follow.add_argument(
        "--wait", action="store_true", help="wait for a final status; exit 0 only if it succeeded"
    )
    wait_or_follow.add_argument(
        "--follow", action="store_true", help="stream the log until a final status, then exit as --wait"
    )

    submit = commands.add_parser(
        "submit", parents=[connection, json_output, waiting], help="submit a deployment from a JSON file or from flags"
    )
    submit.add_argument("file", metavar="FILE", nargs="?", help="deployment request as JSON ('-' for stdin)")
    submit.add_argument("--app", help="application name")
    submit.add_argument("--image", help="build image")
    submit.add_argument("--command", help="build command, run by /bin/sh -c")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="build environment (repeatable)")
    submit.add_argument("--source-path", metavar="DIR", help="directory on the agent's host to copy into /workspace")
    submit.add_argument("--timeout", type=float, metavar="SECONDS", help="build timeout")
    submit.add_argument("--server", help="server to deploy to (default: local)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="repeat-safe key for this request")
    release = submit.add_argument_group("release (the request's `run`; without it the deployment is a one-off job)")
    release.add_argument("--run-command", metavar="CMD", help="command that serves the release, run by /bin/sh -c")
    release.add_argument("--run-image", metavar="IMG", help="image to run (default: the build's result image)")
    release.add_argument("--runtime", choices=("container", "process"), help="container (default) or host process")
    release.add_argument("--port", type=int, metavar="N", help="port the application listens on")
    release.add_argument("--host-port", type=int, metavar="N", help="host port to publish it on (default: the agent picks one)")
    release.add_argument(
        "--run-env", action="append", default=[], metavar="KEY=VALUE", help="release environment (repeatable)"
    )
    checking = release.add_mutually_exclusive_group()
    checking.add_argument("--health-path", metavar="PATH", help="HTTP health check of PATH (2xx/3xx is healthy)")
    checking.add_argument("--health-tcp", action="store_true", help="TCP health check (a connection is healthy)")
    submit.set_defaults(handler=submit_deployment)

    listing = commands.add_parser("ls", parents=[connection, json_output], help="list deployments, newest first")
    listing.add_argument("--app", help="only this application")
    listing.add_argument("--server", help="only this server")
    listing.add_argument("--status", help="only this status")
    listing.add_argument("--limit", type=int, help="at most this many (server default 50, max 500)")
    listing.set_defaults(handler=list_deployments)

    show = commands.add_parser("show", parents=[connection, json_output], help="show one deployment")
    show.add_argument("id", metavar="ID")
    show.set_defaults(handler=show_deployment)

    logs = commands.add_parser("logs", parents=[connection], help="print a deployment's log")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="stream new lines until the deployment is final")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.set_defaults(handler=show_logs)

    kill = commands.add_parser("kill", parents=[connection, json_output], help="cancel a queued or running deployment")
    kill.add_argument("id", metavar="ID")
    kill.set_defaults(handler=kill_deployment)

    remove = commands.add_parser("rm", parents=[connection], help="delete a deployment's record and log")
    remove.add_argument("id", metavar="ID")
    remove.set_defaults(handler=remove_deployment)

    rollback = commands.add_parser(
        "rollback", parents=[connection, json_output, waiting], help="redeploy the release of an earlier deployment"
    )
    rollback.add_argument("id", metavar="ID")
    rollback.set_defaults(handler=rollback_deployment)

    apps = commands.add_parser(
        "apps", parents=[connection, json_output], help="list applications and their current releases, or show one"
    )
    apps.add_argument("name", metavar="NAME", nargs="?", help="show only this application")
    apps.set_defaults(handler=show_applications)

    stop = commands.add_parser("stop", parents=[connection, json_output], help="stop an application's current release")
    stop.add_argument("application", metavar="APP")
    stop.set_defaults(handler=stop_application)

    start = commands.add_parser(
        "start", parents=[connection, json_output], help="start an application's stopped release again"
    )
    start.add_argument("application", metavar="APP")
    start.set_defaults(handler=start_application)

    servers = commands.add_parser(
        "servers", parents=[connection, json_output], help="list remote servers, or `servers check NAME` to test one"
    )
    servers.add_argument("action", metavar="check", nargs="?", choices=["check"], help="test one server")
    servers.add_argument("name", metavar="NAME", nargs="?", help="the server to test")
    servers.set_defaults(handler=show_servers)

    health = commands.add_parser("health", parents=[connection, json_output], help="ask whether the agent can serve")
    health.set_defaults(handler=check_health)
    return parser


# --- daemon commands ---------------------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    """`run`: loads the config (or the defaults) and serves until stopped."""
    if args.config is None:
        config = Config()
    else:
        try:
            config = Config.load(args.config)
        except ConfigError as exc:
            print_config_problems(exc)
            return EXIT_USAGE
    from agent.daemon import serve  # only `run` needs the daemon and its heavy imports

    return serve(config)


def check_config(args: argparse.Namespace) -> int:
    """`check-config FILE`: exit 0 if the file is valid, 2 with one line per problem if not."""
    try:
        Config.load(args.file)
    except ConfigError as exc:
        print_config_problems(exc)
        return EXIT_USAGE
    print(f"{args.file}: ok")
    return EXIT_OK


def print_config_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(f"config error: {problem}", file=sys.stderr)


# --- client commands ---------------------------------------------------------------------------


def submit_deployment(args: argparse.Namespace) -> int:
    """`submit`: sends a deployment request; with --wait or --follow, exits on its final status."""
    body = _request_body(args)
    client = _client(args)
    deployment = client.submit(body, idempotency_key=args.idempotency_key)
    return _report_new_deployment(client, deployment, args)


def list_deployments(args: argparse.Namespace) -> int:
    """`ls`: a table of deployments, newest first."""
    page = _client(args).list(
        application=args.app, server=args.server, status=args.status, limit=args.limit
    )
    _print_list(
        page, args.json,
        ("ID", "APPLICATION", "SERVER", "STATUS", "CREATED", "UPDATED"),
        ("id", "application", "server", "status", "created_at", "updated_at"),
    )
    return EXIT_OK


def show_deployment(args: argparse.Namespace) -> int:
    """`show ID`: one deployment as `key: value` lines, or JSON."""
    _print_record(_client(args).get(args.id), args.json)
    return EXIT_OK


def show_logs(args: argparse.Namespace) -> int:
    """`logs ID`: prints the log; with -f keeps streaming until the deployment is final."""
    client = _client(args)
    if args.follow:
        _stream(client.follow_logs(args.id, tail=args.tail))
    else:
        _stream([client.logs(args.id, tail=args.tail)])
    return EXIT_OK


def kill_deployment(args: argparse.Namespace) -> int:
    """`kill ID`: asks the agent to cancel a deployment."""
    deployment = _client(args).kill(args.id)
    print(_to_json(deployment) if args.json else _summary(deployment))
    return EXIT_OK


def remove_deployment(args: argparse.Namespace) -> int:
    """`rm ID`: deletes a deployment's record and log (not its running application)."""
    _client(args).delete(args.id)
    print(f"{args.id} deleted")
    return EXIT_OK


def rollback_deployment(args: argparse.Namespace) -> int:
    """`rollback ID`: a new deployment that brings back the release of ID; --wait/--follow as for submit."""
    client = _client(args)
    deployment = client.rollback(args.id)
    return _report_new_deployment(client, deployment, args, note=f" (rollback of {args.id})")


def show_applications(args: argparse.Namespace) -> int:
    """`apps [NAME]`: a table of applications, or one as `key: value` lines; JSON with --json."""
    client = _client(args)
    if args.name is not None:
        _print_record(client.application(args.name), args.json)
        return EXIT_OK
    _print_list(
        client.applications(), args.json,
        ("NAME", "STATE", "DEPLOYMENT", "URL", "SINCE"),
        ("name", "state", "current_deployment_id", "url", "since"),
    )
    return EXIT_OK


def stop_application(args: argparse.Namespace) -> int:
    """`stop APP`: stops the application's current release; prints `APP stopped`."""
    application = _client(args).stop_application(args.application)
    print(_to_json(application) if args.json else _application_line(application, args.application))
    return EXIT_OK


def start_application(args: argparse.Namespace) -> int:
    """`start APP`: starts the application's release again; prints `APP running (url)`."""
    application = _client(args).start_application(args.application)
    print(_to_json(application) if args.json else _application_line(application, args.application))
    return EXIT_OK


def show_servers(args: argparse.Namespace) -> int:
    """`servers`: a table of remote servers; `servers check NAME`: test one, exit 1 if unreachable."""
    client = _client(args)
    if args.action == "check":
        if args.name is None:
            raise UsageError("servers check needs a server NAME")
        server = client.server(args.name)
        _print_record(server, args.json)
        return EXIT_OK if server.get("reachable") else EXIT_FAILED
    _print_list(
        client.servers(), args.json,
        ("NAME", "HOST", "REACHABLE", "LATENCY_MS", "DOCKER", "ERROR"),
        ("name", "host", "reachable", "latency_ms", "docker_version", "error"),
    )
    return EXIT_OK


def check_health(args: argparse.Namespace) -> int:
    """`health`: the agent's /healthz answer."""
    answer = _client(args).health()
    print(_to_json(answer) if args.json else _text(answer.get("status")))
    return EXIT_OK


def print_client_error(error: ClientError) -> None:
    """`error: <message>` on stderr, then one indented line per detail."""
    print(f"error: {error.message}", file=sys.stderr)
    details = error.details
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict) and "field" in item and "message" in item:
                print(f"  {item['field']}: {item['message']}", file=sys.stderr)
            else:
                print(f"  {_text(item)}", file=sys.stderr)
    elif isinstance(details, dict):
        for key, value in details.items():
            print(f"  {key}: {_text(value)}", file=sys.stderr)
    elif details is not None:
        print(f"  {_text(details)}", file=sys.stderr)


# --- helpers -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AgentClient:
    url = args.url or os.environ.get("DEPLOY_AGENT_URL") or DEFAULT_URL
    return AgentClient(url, _resolve_token(args.token))


def _resolve_token(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    from_environment = os.environ.get("DEPLOY_AGENT_TOKEN")
    if from_environment:
        return from_environment
    try:
        return LOCAL_TOKEN_FILE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment request: the JSON of FILE, or one built from the flags (not both)."""
    build_flags = {"--image": args.image, "--command": args.command, "--env": args.env, "--timeout": args.timeout}
    run_flags = {
        "--run-command": args.run_command, "--run-image": args.run_image, "--runtime": args.runtime,
        "--port": args.port, "--host-port": args.host_port, "--run-env": args.run_env,
    }
    health_flags = {"--health-path": args.health_path, "--health-tcp": args.health_tcp}
    flags = {
        "--app": args.app, **build_flags, "--source-path": args.source_path, "--server": args.server,
        **run_flags, **health_flags,
    }
    given = [name for name, value in flags.items() if _given(value)]
    if args.file is not None:
        if given:
            raise UsageError(f"give FILE or flags, not both (got FILE and {', '.join(given)})")
        return _read_request_file(args.file)
    has_build = any(_given(value) for value in build_flags.values())
    has_run = any(_given(value) for value in run_flags.values())
    # Without a run the request is a one-off job, so it needs a build; with a run the build is optional.
    required = ("--app", "--image", "--command") if has_build or not has_run else ("--app",)
    missing = [name for name in required if flags[name] is None]
    if missing and has_run and "--app" not in missing:
        partial = [name for name, value in build_flags.items() if _given(value)]
        raise UsageError(f"a build needs --image and --command (got {', '.join(partial)})")
    if missing:
        raise UsageError(f"without FILE, {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")

    body: dict[str, Any] = {"application": args.app}
    if args.server:
        body["server"] = args.server
    if args.source_path:
        # The agent resolves paths on its own host and from its own directory: send an absolute one.
        body["source"] = {"type": "path", "path": os.path.abspath(args.source_path)}
    if has_build:
        build: dict[str, Any] = {"image": args.image, "command": args.command}
        if args.env:
            build["env"] = dict(_parse_env(item, "--env") for item in args.env)
        if args.timeout is not None:
            build["timeout_s"] = args.timeout
        body["build"] = build
    if has_run:
        body["run"] = _run_object(args, has_build=has_build)
    health_flag = next((name for name, value in health_flags.items() if _given(value)), None)
    if health_flag is not None:
        if not has_run:
            raise UsageError(f"{health_flag} checks a release: give --run-command, --run-image or --port too")
        body["health_check"] = {"type": "tcp"} if args.health_tcp else {"type": "http", "path": args.health_path}
    return body


def _run_object(args: argparse.Namespace, *, has_build: bool) -> dict[str, Any]:
    """The request's `run` from the --run-* flags, holding only what was given."""
    runtime = args.runtime or "container"
    if runtime == "process" and args.run_command is None:
        raise UsageError("--runtime process needs --run-command")
    if runtime == "container" and args.run_image is None and not has_build:
        raise UsageError("a container release needs a build (--image and --command) or --run-image")
    run: dict[str, Any] = {}
    if args.runtime is not None:
        run["runtime"] = args.runtime
    if args.run_image is not None:
        run["image"] = args.run_image
    if args.run_command is not None:
        run["command"] = args.run_command  # a string: the agent runs it with /bin/sh -c
    if args.port is not None:
        run["port"] = args.port
    if args.host_port is not None:
        run["host_port"] = args.host_port
    if args.run_env:
        run["env"] = dict(_parse_env(item, "--run-env") for item in args.run_env)
    return run


def _given(value: Any) -> bool:
    """Whether a flag was given: not its default None, [] (repeatable) or False (switch); 0 counts."""
    return not (value is None or value is False or value == [])


def _read_request_file(name: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{name}: the deployment request must be a JSON object")
    return body


def _parse_env(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value


def _report_new_deployment(
    client: AgentClient, deployment: dict[str, Any], args: argparse.Namespace, *, note: str = ""
) -> int:
    """Prints a just-created deployment (`ID status` + note); with --wait or --follow, exits on its final status."""
    if args.follow:
        _stream(client.follow_logs(deployment["id"]))
        final = _wait_for_final(client, deployment["id"])
        # stdout holds the log; the verdict goes to stderr.
        _print_verdict(final, as_json=args.json, stream=sys.stderr)
        return EXIT_OK if final["status"] == "succeeded" else EXIT_FAILED
    if args.wait:
        if not args.json:
            print(_summary(deployment) + note, flush=True)
        final = _wait_for_final(client, deployment["id"])
        _print_verdict(final, as_json=args.json, stream=sys.stdout)
        return EXIT_OK if final["status"] == "succeeded" else EXIT_FAILED
    print(_to_json(deployment) if args.json else _summary(deployment) + note)
    return EXIT_OK


def _wait_for_final(client: AgentClient, deployment_id: str) -> dict[str, Any]:
    while True:
        deployment = client.get(deployment_id)
        if deployment.get("status") in FINAL_STATUSES:
            return deployment
        time.sleep(POLL_INTERVAL_S)


def _print_verdict(deployment: dict[str, Any], *, as_json: bool, stream: Any) -> None:
    if as_json:
        print(_to_json(deployment), file=stream)
        return
    line = _summary(deployment)
    error = deployment.get("error")
    if isinstance(error, dict) and error.get("message"):
        line += f": {error['message']}"
    print(line, file=stream)


def _stream(chunks: Iterable[bytes]) -> None:
    output = sys.stdout.buffer
    for chunk in chunks:
        output.write(chunk)
        output.flush()


def _print_record(record: dict[str, Any], as_json: bool) -> None:
    """One record: JSON, or aligned `key: value` lines."""
    if as_json:
        print(_to_json(record))
    else:
        _print_fields(record)


def _print_list(page: dict[str, Any], as_json: bool, columns: Sequence[str], keys: Sequence[str]) -> None:
    """A list answer (`{"data": [...]}`): JSON as the agent sent it, or a table of its items."""
    if as_json:
        print(_to_json(page))
    else:
        _print_table(page.get("data", []), columns, keys)


def _print_table(items: Iterable[dict[str, Any]], columns: Sequence[str], keys: Sequence[str]) -> None:
    rows = [tuple(columns)] + [tuple(_text(item.get(key)) for key in keys) for item in items]
    widths = [max(len(row[index]) for row in rows) for index in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_fields(record: dict[str, Any]) -> None:
    """`key: value` lines, the values aligned."""
    width = max((len(key) for key in record), default=0) + 1
    for key, value in record.items():
        print(f"{key + ':':<{width}} {_text(value)}")


def _application_line(application: dict[str, Any], name: str) -> str:
    """`web stopped`, or `web running (http://127.0.0.1:32768)` when it answers somewhere."""
    line = f"{application.get('name') or name} {_text(application.get('state'))}"
    url = application.get("url")
    if application.get("state") == "running" and url:
        line += f" ({url})"
    return line


def _summary(deployment: dict[str, Any]) -> str:
    return f"{deployment.get('id')} {deployment.get('status')}"


def _to_json(value: Any) -> str:
    return json.dumps(value, indent=2)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)
