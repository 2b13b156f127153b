"""The argparse tree of `deploy-agent`: one subcommand per verb, each with its handler in `handler`."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from agent import __version__
from agent.cli import commands, schedule_commands
from agent.cli.completion import print_completion
from agent.client import DEFAULT_URL

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one subcommand per verb, each with its handler in `handler`."""
    parser = argparse.ArgumentParser(prog="deploy-agent", description="A small, durable deployment daemon and its client.")
    parser.add_argument("--version", action="version", version=f"deploy-agent {__version__}")
    _add_connection(parser, None)
    parser.set_defaults(handler=None)
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = _add(subcommands, "run", commands.run_daemon, "run the daemon in the foreground until SIGTERM/SIGINT")
    run.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    check = _add(
        subcommands, "check-config", commands.check_config, "validate a config file (exit 0 if valid, 2 if not)"
    )
    check.add_argument("file", metavar="FILE", nargs="?", help=f"the config file (default ${commands.CONFIG_ENV})")

    # --url and --token may come before the subcommand or after it: given after, they must not
    # be reset by the subcommand's own default, hence SUPPRESS there.
    connection = argparse.ArgumentParser(add_help=False)
    _add_connection(connection, argparse.SUPPRESS)
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print the full JSON")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="print only deployment ids")
    waiting = argparse.ArgumentParser(add_help=False)
    wait_or_follow = waiting.add_mutually_exclusive_group()
    wait_or_follow.add_argument(
        "--wait", action="store_true", help="wait for a final status; exit 0 only if it succeeded"
    )
    wait_or_follow.add_argument(
        "--follow", action="store_true", help="stream the log until a final status, then exit as --wait"
    )
    _add_submit(subcommands, [connection, json_output, waiting, quiet])

    listing = _add(
        subcommands, "ls", commands.list_deployments, "list deployments, newest first", [connection, json_output, quiet]
    )
    listing.add_argument("--app", help="only this application")
    listing.add_argument("--server", help="only this server")
    listing.add_argument("--status", help="only this status")
    listing.add_argument("--limit", type=int, help="a page of at most this many (server default 50, max 500)")
    listing.add_argument("--cursor", help="the page after this cursor (printed when more exist)")
    listing.add_argument("--all", action="store_true", help="every page, not just the first")

    _add(subcommands, "show", commands.show_deployment, "show one deployment", [connection, json_output], "id")
    logs = _add(subcommands, "logs", commands.show_logs, "print a deployment's log", [connection], "id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream new lines until the deployment is final")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    _add(
        subcommands, "kill", commands.kill_deployment, "cancel a queued or running deployment",
        [connection, json_output], "id",
    )
    _add(subcommands, "rm", commands.remove_deployment, "delete a deployment's record and log", [connection], "id")
    _add(
        subcommands, "rollback", commands.rollback_deployment, "redeploy the release of an earlier deployment",
        [connection, json_output, waiting, quiet], "id",
    )

    apps = _add(
        subcommands, "apps", commands.show_applications,
        "list applications and their current releases, or show one", [connection, json_output],
    )
    apps.add_argument("name", metavar="NAME", nargs="?", help="show only this application")
    _add(
        subcommands, "stop", commands.stop_application, "stop an application's current release",
        [connection, json_output], "application",
    )
    _add(
        subcommands, "start", commands.start_application, "start an application's stopped release again",
        [connection, json_output], "application",
    )

    servers = _add(
        subcommands, "servers", commands.show_servers, "list remote servers, or `servers check NAME` to test one",
        [connection, json_output],
    )
    servers.add_argument("action", metavar="check", nargs="?", choices=["check"], help="test one server")
    servers.add_argument("name", metavar="NAME", nargs="?", help="the server to test")

    schedules = _add(
        subcommands, "schedules", commands.schedules_help, "schedules: ls, show, add, edit, pause, resume, trigger, runs, rm",
        [connection],
    )
    schedule_commands.add_arguments(schedules, [connection, json_output], commands.SCHEDULE_HANDLERS)
    _add(subcommands, "health", commands.check_health, "ask whether the agent can serve", [connection, json_output])
    completion = _add(
        subcommands, "completion", print_completion,
        "print a shell completion script: eval \"$(deploy-agent completion bash)\"",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _add_connection(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--url", default=default,
        help=f"the agent's URL, http://host:port or unix:/path (env DEPLOY_AGENT_URL, else the listen address of "
        f"${commands.CONFIG_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token", default=default,
        help=f"API token (env DEPLOY_AGENT_TOKEN, else the file {commands.LOCAL_TOKEN_FILE} if present)",
    )


_METAVARS = {"id": "ID", "application": "APP"}


def _add(
    subcommands: argparse._SubParsersAction[Any], name: str, handler: Handler, help_text: str,
    parents: Sequence[argparse.ArgumentParser] = (), target: str | None = None,
) -> argparse.ArgumentParser:
    """One subcommand with its handler; `target` names its one positional (`id` as ID, `application` as APP)."""
    command: argparse.ArgumentParser = subcommands.add_parser(name, parents=list(parents), help=help_text)
    if target is not None:
        command.add_argument(target, metavar=_METAVARS[target])
    command.set_defaults(handler=handler)
    return command


def _add_submit(subcommands: argparse._SubParsersAction[Any], parents: Sequence[argparse.ArgumentParser]) -> None:
    submit = _add(
        subcommands, "submit", commands.submit_deployment, "submit a deployment from a JSON file or from flags", parents
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
