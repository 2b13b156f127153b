"""structlog configuration for the daemon's own logs and the libraries it logs through."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Libraries whose stdlib logs go through the same chain as ours.
ROUTED_LOGGERS: tuple[str, ...] = ("aiohttp", "asyncssh", "urllib3", "docker")
# These log every packet or connection at INFO/DEBUG; keep them at WARNING unless asked for less.
CHATTY_LOGGERS: tuple[str, ...] = ("asyncssh", "urllib3")


# syslog priorities, which journald reads from a `<N>` prefix on each line (sd-daemon(3)).
PRIORITIES: dict[int, int] = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever `sys.stdout` is when a record is emitted.

    Looking the stream up late means a swapped stdout (pytest's capture, a redirect) is honoured
    and a handler never writes to a stream that has since been closed. With `journal`, each
    line starts with its syslog priority so that `journalctl -p err` finds the errors.
    """

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__(sys.stdout)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        priority = PRIORITIES.get(record.levelno, 3 if record.levelno > logging.WARNING else 6)
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Sends structlog and the stdlib loggers of aiohttp, asyncssh, urllib3 and docker to stdout.

    `json=None` picks JSON lines when stdout is not a terminal (journald, files, pipes) and a
    console renderer when it is. Calling it again replaces the previous configuration.
    """
    numeric_level = LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}")
    if json is None:
        json = not _is_terminal(sys.stdout)

    decorate: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            *decorate,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Caching would pin module-level loggers to this configuration, and
        # structlog.testing.capture_logs could no longer see their events.
        cache_logger_on_first_use=False,
    )

    handler = _StdoutHandler(journal=stdout_is_journal())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Records from stdlib loggers (aiohttp, docker, ...) get the same fields as ours.
            foreign_pre_chain=[structlog.contextvars.merge_contextvars, *decorate],
            processors=_render_processors(json),
        )
    )
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    set_log_level(level)
    for name in ROUTED_LOGGERS:
        logging.getLogger(name).propagate = True


def set_log_level(level: str) -> None:
    """Changes the level of the agent's and the routed libraries' logs (a reload's log_level)."""
    numeric_level = LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}")
    logging.getLogger().setLevel(numeric_level)
    for name in ROUTED_LOGGERS:
        library_logger = logging.getLogger(name)
        library_logger.setLevel(max(numeric_level, logging.WARNING) if name in CHATTY_LOGGERS else logging.NOTSET)


def stdout_is_journal() -> bool:
    """Whether stdout is the journald stream systemd connected ($JOURNAL_STREAM is its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    # A child that inherited the variable but writes elsewhere must not prefix its lines.
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def _render_processors(json: bool) -> list[Processor]:
    if json:
        return [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    # The console renderer formats exceptions itself (and warns if format_exc_info ran first).
    return [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.dev.ConsoleRenderer(),
    ]


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
