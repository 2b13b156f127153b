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

    submit = commands.add_parser(
        "submit", parents=[connection, json_output], help="submit a deployment from a JSON file or from flags"
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
    waiting = submit.add_mutually_exclusive_group()
    waiting.add_argument("--wait", action="store_true", help="wait for a final status; exit 0 only if it succeeded")
    waiting.add_argument("--follow", action="store_true", help="stream the log until a final status, then exit as --wait")
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
        "rollback", parents=[connection, json_output], help="redeploy the release of an earlier deployment"
    )
    rollback.add_argument("id", metavar="ID")
    rollback.set_defaults(handler=rollback_deployment)

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
    if args.follow:
        _stream(client.follow_logs(deployment["id"]))
        final = _wait_for_final(client, deployment["id"])
        # stdout holds the log; the verdict goes to stderr.
        _print_verdict(final, as_json=args.json, stream=sys.stderr)
        return EXIT_OK if final["status"] == "succeeded" else EXIT_FAILED
    if args.wait:
        if not args.json:
            print(_summary(deployment), flush=True)
        final = _wait_for_final(client, deployment["id"])
        _print_verdict(final, as_json=args.json, stream=sys.stdout)
        return EXIT_OK if final["status"] == "succeeded" else EXIT_FAILED
    print(_to_json(deployment) if args.json else _summary(deployment))
    return EXIT_OK


def list_deployments(args: argparse.Namespace) -> int:
    """`ls`: a table of deployments, newest first."""
    page = _client(args).list(
        application=args.app, server=args.server, status=args.status, limit=args.limit
    )
    if args.json:
        print(_to_json(page))
        return EXIT_OK
    columns = ("ID", "APPLICATION", "SERVER", "STATUS", "CREATED", "UPDATED")
    keys = ("id", "application", "server", "status", "created_at", "updated_at")
    rows = [columns] + [tuple(_text(item.get(key)) for key in keys) for item in page.get("data", [])]
    widths = [max(len(row[index]) for row in rows) for index in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


def show_deployment(args: argparse.Namespace) -> int:
    """`show ID`: one deployment as `key: value` lines, or JSON."""
    deployment = _client(args).get(args.id)
    if args.json:
        print(_to_json(deployment))
        return EXIT_OK
    width = max((len(key) for key in deployment), default=0) + 1
    for key, value in deployment.items():
        print(f"{key + ':':<{width}} {_text(value)}")
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
    """`rollback ID`: a new deployment that brings back the release of ID."""
    deployment = _client(args).rollback(args.id)
    print(_to_json(deployment) if args.json else f"{_summary(deployment)} (rollback of {args.id})")
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
    flags = {
        "--app": args.app, "--image": args.image, "--command": args.command, "--env": args.env,
        "--source-path": args.source_path, "--timeout": args.timeout, "--server": args.server,
    }
    given = [name for name, value in flags.items() if value not in (None, [])]
    if args.file is not None:
        if given:
            raise UsageError(f"give FILE or flags, not both (got FILE and {', '.join(given)})")
        return _read_request_file(args.file)
    missing = [name for name in ("--app", "--image", "--command") if flags[name] is None]
    if missing:
        raise UsageError(f"without FILE, {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    build: dict[str, Any] = {"image": args.image, "command": args.command}
    if args.env:
        build["env"] = dict(_parse_env(item) for item in args.env)
    if args.timeout is not None:
        build["timeout_s"] = args.timeout
    body: dict[str, Any] = {"application": args.app, "build": build}
    if args.server:
        body["server"] = args.server
    if args.source_path:
        # The agent resolves paths on its own host and from its own directory: send an absolute one.
        body["source"] = {"type": "path", "path": os.path.abspath(args.source_path)}
    return body


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


def _parse_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--env {item!r}: expected KEY=VALUE")
    return key, value


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
