"""The deployment request `submit` sends: the JSON of a file, or one built from the flags."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli.exits import UsageError


def build_request(args: argparse.Namespace) -> dict[str, Any]:
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
    given = [name for name, value in flags.items() if was_given(value)]
    if args.file is not None:
        if given:
            raise UsageError(f"give FILE or flags, not both (got FILE and {', '.join(given)})")
        return read_request_file(args.file)
    has_build = any(was_given(value) for value in build_flags.values())
    has_run = any(was_given(value) for value in run_flags.values())
    # Without a run the request is a one-off job, so it needs a build; with a run the build is optional.
    required = ("--app", "--image", "--command") if has_build or not has_run else ("--app",)
    missing = [name for name in required if flags[name] is None]
    if missing and has_run and "--app" not in missing:
        partial = [name for name, value in build_flags.items() if was_given(value)]
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
            build["env"] = dict(parse_env(item, "--env") for item in args.env)
        if args.timeout is not None:
            build["timeout_s"] = args.timeout
        body["build"] = build
    if has_run:
        body["run"] = _run_object(args, has_build=has_build)
    health_flag = next((name for name, value in health_flags.items() if was_given(value)), None)
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
        run["env"] = dict(parse_env(item, "--run-env") for item in args.run_env)
    return run


def was_given(value: Any) -> bool:
    """Whether a flag was given: not its default None, [] (repeatable) or False (switch); 0 counts."""
    return not (value is None or value is False or value == [])


def read_request_file(name: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{name}: the request must be a JSON object")
    return body


def parse_env(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value
