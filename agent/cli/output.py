"""What the command line prints: records, tables, verdicts, log chunks and errors."""

from __future__ import annotations

import json
import re
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
        line += f": {inert(str(error['message']))}"
    print(line, file=stream)


def stream(chunks: Iterable[bytes]) -> None:
    """Copies log chunks to stdout as they come; escaped on a terminal (see ControlEscaper)."""
    output = sys.stdout.buffer
    escaper = ControlEscaper() if sys.stdout.isatty() else None
    for chunk in chunks:
        output.write(escaper.feed(chunk) if escaper else chunk)
        output.flush()
    if escaper:
        output.write(escaper.flush())
        output.flush()


# C0 controls but tab and newline, DEL, and the C1 controls as UTF-8 encodes them (0xC2 0x80-0x9F).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")
_CONTROL_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ControlEscaper:
    """Makes build output inert on a terminal: every control character but tab and newline shows
    as `\\xNN`, so that a build cannot move the cursor, retitle the window, rewrite what was
    printed (carriage returns included) or hide text. Bytes are kept as they are otherwise.
    """

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        # A lead byte 0xC2 at the end may start a C1 control that the next chunk completes.
        self._carry = b"\xc2" if data.endswith(b"\xc2") else b""
        if self._carry:
            data = data[:-1]
        return _CONTROL_BYTES.sub(_escaped_bytes, data)

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return data


def _escaped_bytes(match: re.Match[bytes]) -> bytes:
    code = match.group()[-1] if len(match.group()) == 2 else match.group()[0]
    return b"\\x%02x" % code


def inert(value: str) -> str:
    """`value` with control characters escaped when stdout is a terminal (cells, records, errors)."""
    if not sys.stdout.isatty():
        return value
    return _CONTROL_TEXT.sub(lambda match: f"\\x{ord(match.group()):02x}", value)


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
        return json.dumps(value, separators=(", ", ": "))  # JSON escapes control characters itself
    return inert(str(value))


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
