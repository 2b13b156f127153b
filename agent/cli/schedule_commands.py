"""`deploy-agent schedules ...`: the schedules of a running agent, as tables, records or JSON."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from agent.cli.exits import EXIT_OK, UsageError
from agent.cli.output import print_list, print_record, summary, to_json
from agent.cli.request import parse_env, read_request_file, was_given
from agent.client import AgentClient

ClientOf = Callable[[argparse.Namespace], AgentClient]
_COLUMNS = ("ID", "NAME", "APPLICATION", "SCHEDULE", "STATUS", "NEXT", "RUNS", "LAST")
_RUN_COLUMNS = ("ID", "STATUS", "REASON", "ATTEMPT", "CREATED", "FINISHED")
_CONFIG_FLAGS = {
    "max_concurrent": "--max-concurrent", "max_retries": "--max-retries", "timeout_s": "--timeout",
    "pause_after_failures": "--pause-after-failures", "missed": "--missed", "retry_backoff_s": "--retry-backoff",
}


def add_arguments(command: argparse.ArgumentParser, parents: list[argparse.ArgumentParser],
                  handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """The `schedules` verbs under `command`, each with its handler."""
    verbs = command.add_subparsers(title="schedule commands", metavar="VERB")

    def verb(name: str, help_text: str, *, with_id: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, parents=parents, help=help_text)
        if with_id:
            parser.add_argument("id", metavar="ID")
        parser.set_defaults(handler=handlers[name])
        return parser

    listing = verb("ls", "list schedules, newest first", with_id=False)
    listing.add_argument("--app", help="only this application")
    listing.add_argument("--status", choices=("active", "paused", "archived"), help="only this status")
    listing.add_argument("--limit", type=int, help="a page of at most this many")
    listing.add_argument("--cursor", help="the page after this cursor")
    verb("show", "show one schedule")
    add = verb("add", "create a schedule from a JSON file or from flags", with_id=False)
    add.add_argument("file", metavar="FILE", nargs="?", help="schedule request as JSON ('-' for stdin)")
    add.add_argument("--app", help="application name")
    add.add_argument("--idempotency-key", metavar="KEY", help="repeat-safe key for this request")
    _timing_and_template_flags(add)
    edit = verb("edit", "change a schedule: a JSON file of the changes, or flags")
    edit.add_argument("file", metavar="FILE", nargs="?", help="the changes as JSON ('-' for stdin)")
    _timing_and_template_flags(edit)
    verb("pause", "pause a schedule (runs in progress go on)")
    verb("resume", "resume a paused schedule")
    verb("trigger", "start a run now")
    runs = verb("runs", "list a schedule's runs, newest first")
    runs.add_argument("--limit", type=int, help="a page of at most this many")
    runs.add_argument("--cursor", help="the page after this cursor")
    verb("rm", "archive a schedule: no more runs; it and its runs are kept")


def _timing_and_template_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="a name for people")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--cron", metavar="EXPR", help="5-field cron expression, e.g. '0 9 * * *'")
    timing.add_argument("--every", type=int, metavar="SECONDS", help="a fixed interval")
    parser.add_argument("--timezone", metavar="TZ", help="IANA time zone of --cron (default UTC)")
    parser.add_argument("--image", help="build image of each run")
    parser.add_argument("--command", help="build command of each run, run by /bin/sh -c")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="build environment (repeatable)")
    parser.add_argument("--max-concurrent", type=int, metavar="N", help="runs in progress at once (default 1)")
    parser.add_argument("--max-retries", type=int, metavar="N", help="retries of a failed run (default 0)")
    parser.add_argument("--retry-backoff", dest="retry_backoff_s", type=float, metavar="SECONDS", help="wait before the first retry (default 5)")
    parser.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS", help="a run past it is killed and fails")
    parser.add_argument("--pause-after-failures", type=int, metavar="N", help="pause after N failures in a row")
    parser.add_argument("--missed", choices=("skip", "run_once"), help="triggers that fell while the agent was down")


def list_schedules(args: argparse.Namespace, client: AgentClient) -> int:
    page = client.schedules(application=args.app, status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        print(to_json(page))
    else:
        rows = [_row(schedule) for schedule in page.get("data", [])]
        print_list({"data": rows}, False, _COLUMNS, [column.lower() for column in _COLUMNS])
        if page.get("next_cursor"):
            print(f"more exist: deploy-agent schedules ls --cursor {page['next_cursor']}")
    return EXIT_OK


def show_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    print_record(client.schedule(args.id), args.json)
    return EXIT_OK


def add_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    if args.file is not None:
        _refuse_flags_with_file(args)
        body = read_request_file(args.file)
    else:
        if not args.app or not (args.cron or args.every) or not (args.image and args.command):
            raise UsageError("without FILE, --app, --cron or --every, --image and --command are required")
        body = {"application": args.app, **_changes_from_flags(args)}
    schedule = client.create_schedule(body, idempotency_key=args.idempotency_key)
    print(to_json(schedule) if args.json else _line(schedule))
    return EXIT_OK


def edit_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    if args.file is not None:
        _refuse_flags_with_file(args)
        changes = read_request_file(args.file)
    else:
        changes = _changes_from_flags(args)
        if not changes:
            raise UsageError("nothing to change: give FILE or flags such as --cron, --command, --max-retries")
    schedule = client.update_schedule(args.id, changes)
    print(to_json(schedule) if args.json else _line(schedule))
    return EXIT_OK


def pause_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    return _act(args, client, "pause")


def resume_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    return _act(args, client, "resume")


def trigger_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    run = client.schedule_action(args.id, "trigger")
    print(to_json(run) if args.json else summary(run))
    return EXIT_OK


def list_runs(args: argparse.Namespace, client: AgentClient) -> int:
    page = client.schedule_runs(args.id, limit=args.limit, cursor=args.cursor)
    if args.json:
        print(to_json(page))
    else:
        rows = [
            {"id": run.get("id"), "status": run.get("status"), "reason": (run.get("schedule_run") or {}).get("reason"),
             "attempt": (run.get("schedule_run") or {}).get("attempt"), "created": run.get("created_at"),
             "finished": run.get("finished_at")}
            for run in page.get("data", [])
        ]
        print_list({"data": rows}, False, _RUN_COLUMNS, [column.lower() for column in _RUN_COLUMNS])
        if page.get("next_cursor"):
            print(f"more exist: deploy-agent schedules runs {args.id} --cursor {page['next_cursor']}")
    return EXIT_OK


def archive_schedule(args: argparse.Namespace, client: AgentClient) -> int:
    client.archive_schedule(args.id)
    print(f"{args.id} archived")
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace, AgentClient], int]] = {
    "ls": list_schedules, "show": show_schedule, "add": add_schedule, "edit": edit_schedule, "pause": pause_schedule,
    "resume": resume_schedule, "trigger": trigger_schedule, "runs": list_runs, "rm": archive_schedule,
}


def _act(args: argparse.Namespace, client: AgentClient, action: str) -> int:
    schedule = client.schedule_action(args.id, action)
    print(to_json(schedule) if args.json else _line(schedule))
    return EXIT_OK


def _line(schedule: dict[str, Any]) -> str:
    """`ID status (next: TIME)`, or the reason it is paused."""
    line = f"{schedule.get('id')} {schedule.get('status')}"
    if schedule.get("archived_at"):
        return line + f" (archived {schedule['archived_at']})"
    if schedule.get("status") == "paused" and schedule.get("paused_reason"):
        return line + f" ({schedule['paused_reason']})"
    upcoming = schedule.get("upcoming_runs_at") or []
    return line + (f" (next: {upcoming[0]})" if upcoming else "")


def _row(schedule: dict[str, Any]) -> dict[str, Any]:
    timing = schedule.get("schedule") or {}
    if timing.get("type") == "cron":
        shown = f"cron {timing.get('expression')} {timing.get('timezone', 'UTC')}"
    else:
        shown = f"every {timing.get('every_s')}s"
    stats = schedule.get("stats") or {}
    status = "archived" if schedule.get("archived_at") else schedule.get("status")
    return {"id": schedule.get("id"), "name": schedule.get("name"), "application": schedule.get("application"),
            "schedule": shown, "status": status, "next": stats.get("next_trigger_at"), "runs": stats.get("total_runs"),
            "last": stats.get("last_status")}


def _changes_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.name:
        changes["name"] = args.name
    if args.cron:
        changes["schedule"] = {"type": "cron", "expression": args.cron, "timezone": args.timezone or "UTC"}
    elif args.every is not None:
        changes["schedule"] = {"type": "interval", "every_s": args.every}
    elif args.timezone:
        raise UsageError("--timezone goes with --cron")
    if args.image or args.command or args.env:
        if not (args.image and args.command):
            raise UsageError("a run's build needs both --image and --command")
        build: dict[str, Any] = {"image": args.image, "command": args.command}
        if args.env:
            build["env"] = dict(parse_env(item, "--env") for item in args.env)
        changes["template"] = {"build": build}
    config = {key: getattr(args, key) for key in _CONFIG_FLAGS if getattr(args, key) is not None}
    if config:
        changes["config"] = config
    return changes


def _refuse_flags_with_file(args: argparse.Namespace) -> None:
    flags = {"--app": getattr(args, "app", None), "--name": args.name, "--cron": args.cron, "--every": args.every,
             "--timezone": args.timezone, "--image": args.image, "--command": args.command, "--env": args.env,
             **{flag: getattr(args, key) for key, flag in _CONFIG_FLAGS.items()}}
    given = [name for name, value in flags.items() if was_given(value)]
    if given:
        raise UsageError(f"give FILE or flags, not both (got FILE and {', '.join(given)})")
