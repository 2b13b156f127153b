"""The command line: daemon commands (`run`, `check-config`) and clients of a running agent.

The client commands speak HTTP through `agent.client` and know nothing of the engine or the store.
Exit codes (agent.cli.exits): 0 success; 1 an API error or a deployment that failed; with
`--wait`, a failed build's own exit code; 2 a usage or config error; 69 the agent unreachable;
130 interrupted; 143 a deployment that was cancelled.

By job: `parser` (the argparse tree), `commands` (one handler a command), `request` (a deployment
request from flags or a file), `output` (tables, records and errors as printed).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from agent.cli.commands import LOCAL_TOKEN_FILE
from agent.cli.exits import (
    EXIT_CANCELLED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, UsageError,
)
from agent.cli.output import print_client_error
from agent.cli.parser import build_parser
from agent.client import ClientError

__all__ = [
    "EXIT_CANCELLED", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE",
    "LOCAL_TOKEN_FILE", "UsageError",
    "build_parser", "main",
]


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
        if exc.status is None and exc.error_type == "bad_url":
            return EXIT_USAGE
        if exc.status is None and exc.error_type in ("connection_error", "timeout"):
            return EXIT_UNREACHABLE
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
