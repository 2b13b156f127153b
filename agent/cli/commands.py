"""One handler a command: the daemon commands, and the client commands that call a running agent."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from agent.cli import schedule_commands
from agent.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, exit_code_of
from agent.cli.output import (
    application_line, print_config_problems, print_list, print_record, print_verdict, stream, summary, text,
    to_json,
)
from agent.cli.request import build_request
from agent.client import DEFAULT_URL, AgentClient
from agent.config import Config
from agent.errors import ConfigError
from agent.models import FINAL_STATUSES

# Where `deploy-agent run` without a config keeps the token it generates.
LOCAL_TOKEN_FILE = Path(".deploy-agent") / "token"
# The config file `run` and `check-config` use when none is named, and whose `listen` clients call.
CONFIG_ENV = "DEPLOY_AGENT_CONFIG"
# How long one long poll of --wait is held; the agent answers the moment the deployment changes.
WATCH_S = 20.0
# Between plain polls, when an agent sends no ETag to long poll with.
POLL_INTERVAL_S = 1.0


# --- daemon commands ---------------------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    """`run`: loads the config (--config, else $DEPLOY_AGENT_CONFIG, else the defaults) and serves until stopped."""
    path = args.config or os.environ.get(CONFIG_ENV) or None
    if path is None:
        config = Config()
    else:
        try:
            config = Config.load(path)
        except ConfigError as exc:
            print_config_problems(exc)
            return EXIT_USAGE
    from agent.daemon import serve  # only `run` needs the daemon and its heavy imports

    return serve(config)


def check_config(args: argparse.Namespace) -> int:
    """`check-config [FILE]`: exit 0 if the file is valid, 2 with one line per problem if not."""
    path = args.file or os.environ.get(CONFIG_ENV)
    if not path:
        raise UsageError(f"check-config needs a FILE (or ${CONFIG_ENV})")
    try:
        Config.load(path)
    except ConfigError as exc:
        print_config_problems(exc)
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK


# --- client commands ---------------------------------------------------------------------------


def submit_deployment(args: argparse.Namespace) -> int:
    """`submit`: sends a deployment request; with --wait or --follow, exits on its final status."""
    body = build_request(args)
    client = _client(args)
    deployment = client.submit(body, idempotency_key=args.idempotency_key)
    return _report_new_deployment(client, deployment, args)


def list_deployments(args: argparse.Namespace) -> int:
    """`ls`: a page of deployments, newest first (every page with --all); says on stderr when more exist."""
    client = _client(args)
    filters = {"application": args.app, "server": args.server, "status": args.status, "limit": args.limit}
    page = client.list(**filters, cursor=args.cursor)
    data = list(page.get("data", []))
    while args.all and page.get("next_cursor"):
        page = client.list(**filters, cursor=page["next_cursor"])
        data.extend(page.get("data", []))
    next_cursor = page.get("next_cursor")
    if args.quiet:
        for deployment in data:
            print(deployment.get("id"))
    else:
        print_list(
            {"data": data, "next_cursor": next_cursor}, args.json,
            ("ID", "APPLICATION", "SERVER", "STATUS", "CREATED", "UPDATED"),
            ("id", "application", "server", "status", "created_at", "updated_at"),
        )
    if next_cursor:
        print(f"more exist: deploy-agent ls --cursor {next_cursor} (or --all)", file=sys.stderr)
    return EXIT_OK


def show_deployment(args: argparse.Namespace) -> int:
    """`show ID`: one deployment as `key: value` lines, or JSON."""
    print_record(_client(args).get(args.id), args.json)
    return EXIT_OK


def show_logs(args: argparse.Namespace) -> int:
    """`logs ID`: prints the log; with -f keeps streaming until the deployment is final."""
    client = _client(args)
    if args.follow:
        stream(client.follow_logs(args.id, tail=args.tail))
    else:
        stream([client.logs(args.id, tail=args.tail)])
    return EXIT_OK


def kill_deployment(args: argparse.Namespace) -> int:
    """`kill ID`: asks the agent to cancel a deployment."""
    deployment = _client(args).kill(args.id)
    print(to_json(deployment) if args.json else summary(deployment))
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
        print_record(client.application(args.name), args.json)
        return EXIT_OK
    print_list(
        client.applications(), args.json,
        ("NAME", "STATE", "DEPLOYMENT", "URL", "SINCE"),
        ("name", "state", "current_deployment_id", "url", "since"),
    )
    return EXIT_OK


def stop_application(args: argparse.Namespace) -> int:
    """`stop APP`: stops the application's current release; prints `APP stopped`."""
    application = _client(args).stop_application(args.application)
    print(to_json(application) if args.json else application_line(application, args.application))
    return EXIT_OK


def start_application(args: argparse.Namespace) -> int:
    """`start APP`: starts the application's release again; prints `APP running (url)`."""
    application = _client(args).start_application(args.application)
    print(to_json(application) if args.json else application_line(application, args.application))
    return EXIT_OK


def show_servers(args: argparse.Namespace) -> int:
    """`servers`: a table of remote servers; `servers check NAME`: test one, exit 1 if unreachable."""
    client = _client(args)
    if args.action == "check":
        if args.name is None:
            raise UsageError("servers check needs a server NAME")
        server = client.server(args.name)
        print_record(server, args.json)
        return EXIT_OK if server.get("reachable") else EXIT_FAILED
    print_list(
        client.servers(), args.json,
        ("NAME", "HOST", "REACHABLE", "LATENCY_MS", "DOCKER", "ERROR"),
        ("name", "host", "reachable", "latency_ms", "docker_version", "error"),
    )
    return EXIT_OK


def check_health(args: argparse.Namespace) -> int:
    """`health`: the agent's /healthz answer."""
    answer = _client(args).health()
    print(to_json(answer) if args.json else text(answer.get("status")))
    return EXIT_OK


def schedules_help(args: argparse.Namespace) -> int:
    """`schedules` alone: names its verbs."""
    raise UsageError("schedules needs a verb: ls, show, add, edit, pause, resume, trigger, runs or rm")


def _schedule_handler(verb: Callable[[argparse.Namespace, AgentClient], int]) -> Callable[[argparse.Namespace], int]:
    return lambda args: verb(args, _client(args))


SCHEDULE_HANDLERS = {name: _schedule_handler(verb) for name, verb in schedule_commands.HANDLERS.items()}


# --- helpers -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AgentClient:
    url = args.url or os.environ.get("DEPLOY_AGENT_URL") or _configured_url() or DEFAULT_URL
    return AgentClient(url, _resolve_token(args.token))


def _configured_url() -> str | None:
    """The URL of the agent that $DEPLOY_AGENT_CONFIG configures (its `agent.listen`), if it names one."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    try:
        listen = Config.load(path).agent.listen
    except ConfigError as exc:
        raise UsageError(f"${CONFIG_ENV}={path}: {'; '.join(exc.problems)}") from None
    if listen.unix_path:
        return f"unix:{listen.unix_path}"
    host = listen.host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # the agent listens everywhere: this host is one of them
    return f"http://{'[' + host + ']' if ':' in host else host}:{listen.port}"


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


def _report_new_deployment(
    client: AgentClient, deployment: dict[str, Any], args: argparse.Namespace, *, note: str = ""
) -> int:
    """Prints a just-created deployment (`ID status` + note); with --wait or --follow, exits on its final status."""
    if args.follow:
        stream(client.follow_logs(deployment["id"]))
        final = _wait_for_final(client, deployment["id"])
        # stdout holds the log; the verdict goes to stderr.
        print_verdict(final, as_json=args.json, stream=sys.stderr)
        return exit_code_of(final)
    if args.wait:
        if args.quiet:
            print(deployment["id"], flush=True)
        elif not args.json:
            print(summary(deployment) + note, flush=True)
        final = _wait_for_final(client, deployment["id"])
        if not args.quiet:
            print_verdict(final, as_json=args.json, stream=sys.stdout)
        return exit_code_of(final)
    if args.quiet:
        print(deployment["id"])
    else:
        print(to_json(deployment) if args.json else summary(deployment) + note)
    return EXIT_OK


def _wait_for_final(client: AgentClient, deployment_id: str) -> dict[str, Any]:
    """Long polls until the deployment is final: each answer comes as soon as it changes."""
    deployment, etag = client.watch(deployment_id, None, WATCH_S)
    while deployment is None or deployment.get("status") not in FINAL_STATUSES:
        if etag is None:
            time.sleep(POLL_INTERVAL_S)
        changed, etag = client.watch(deployment_id, etag, WATCH_S)
        deployment = changed or deployment
    return deployment
