"""What the command line prints: records, tables, verdicts, log chunks and errors."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from agent.client import ClientError
from agent.errors import ConfigError


def print_client_error(error: ClientError) -> None:
    """`error: <message>` on stderr, then one indented line per detail."""
    print(f"error: {error.message}", file=sys.stderr)
    details = error.details
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict) and "field" in item and "message" in item:
                print(f"  {item['field']}: {item['message']}", file=sys.stderr)
            else:
                print(f"  {text(item)}", file=sys.stderr)
    elif isinstance(details, dict):
        for key, value in details.items():
            print(f"  {key}: {text(value)}", file=sys.stderr)
    elif details is not None:
        print(f"  {text(details)}", file=sys.stderr)


def print_config_problems(error: ConfigError) -> None:
    """One `config error: ...` line on stderr per problem."""
    for problem in error.problems:
        print(f"config error: {problem}", file=sys.stderr)


def print_verdict(deployment: dict[str, Any], *, as_json: bool, stream: Any) -> None:
    """A final deployment: JSON, or `ID status` with its error's message."""
    if as_json:
        print(to_json(deployment), file=stream)
        return
    line = summary(deployment)
    error = deployment.get("error")
    if isinstance(error, dict) and error.get("message"):
        line += f": {error['message']}"
    print(line, file=stream)


def stream(chunks: Iterable[bytes]) -> None:
    """Copies log chunks to stdout as they come."""
    output = sys.stdout.buffer
    for chunk in chunks:
        output.write(chunk)
        output.flush()


def print_record(record: dict[str, Any], as_json: bool) -> None:
    """One record: JSON, or aligned `key: value` lines."""
    if as_json:
        print(to_json(record))
    else:
        _print_fields(record)


def print_list(page: dict[str, Any], as_json: bool, columns: Sequence[str], keys: Sequence[str]) -> None:
    """A list answer (`{"data": [...]}`): JSON as the agent sent it, or a table of its items."""
    if as_json:
        print(to_json(page))
    else:
        _print_table(page.get("data", []), columns, keys)


def application_line(application: dict[str, Any], name: str) -> str:
    """`web stopped`, or `web running (http://127.0.0.1:32768)` when it answers somewhere."""
    line = f"{application.get('name') or name} {text(application.get('state'))}"
    url = application.get("url")
    if application.get("state") == "running" and url:
        line += f" ({url})"
    return line


def summary(deployment: dict[str, Any]) -> str:
    """`ID status`."""
    return f"{deployment.get('id')} {deployment.get('status')}"


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2)


def text(value: Any) -> str:
    """A value as a table cell: `-` for none, compact JSON for objects and lists."""
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _print_table(items: Iterable[dict[str, Any]], columns: Sequence[str], keys: Sequence[str]) -> None:
    rows = [tuple(columns)] + [tuple(text(item.get(key)) for key in keys) for item in items]
    widths = [max(len(row[index]) for row in rows) for index in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_fields(record: dict[str, Any]) -> None:
    """`key: value` lines, the values aligned."""
    width = max((len(key) for key in record), default=0) + 1
    for key, value in record.items():
        print(f"{key + ':':<{width}} {text(value)}")
