"""The daemon's log configuration: JSON lines, context variables, stdlib routing."""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import pytest
import structlog
from structlog.contextvars import bound_contextvars, merge_contextvars
from structlog.testing import capture_logs

from agent.structured_logging import configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Puts structlog's and the root logger's configuration back after each test."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in ("aiohttp", "asyncssh", "urllib3", "docker")}
    yield
    structlog.configure(**saved_config)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_json_output_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Each event is one JSON object on its own line, with timestamp, level and event."""
    configure_logging("info", json=True)
    logger = structlog.get_logger("agent.test")
    logger.info("first event", count=1)
    logger.warning("second event", reason="multi\nline")

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "first event" and first["level"] == "info" and first["count"] == 1
    assert second["level"] == "warning" and second["reason"] == "multi\nline"
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert first["logger"] == "agent.test"


def test_bound_contextvars_appear_in_events(capsys: pytest.CaptureFixture[str]) -> None:
    """A deployment_id bound with bound_contextvars is on every event logged inside the block."""
    configure_logging("info", json=True)
    logger = structlog.get_logger("agent.test")
    with bound_contextvars(deployment_id="dep_123"):
        logger.info("inside")
        logging.getLogger("docker.api").warning("stdlib inside")
    logger.info("outside")

    inside, stdlib_inside, outside = json_lines(capsys.readouterr().out)
    assert inside["deployment_id"] == "dep_123"
    assert stdlib_inside["deployment_id"] == "dep_123"
    assert "deployment_id" not in outside


def test_stdlib_library_logs_use_the_same_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    """A stdlib record from aiohttp comes out as the same kind of JSON line as a structlog event."""
    configure_logging("info", json=True)
    logging.getLogger("aiohttp.access").warning("GET %s %d", "/v1/deployments", 200)

    (event,) = json_lines(capsys.readouterr().out)
    assert event["event"] == "GET /v1/deployments 200"
    assert event["level"] == "warning"
    assert event["logger"] == "aiohttp.access"
    assert event["timestamp"].endswith("Z")


def test_chatty_libraries_are_held_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    """asyncssh and urllib3 INFO chatter is dropped at the default level; their warnings are kept."""
    configure_logging("info", json=True)
    logging.getLogger("asyncssh").info("opened channel")
    logging.getLogger("urllib3.connectionpool").info("starting new connection")
    logging.getLogger("asyncssh").warning("connection lost")

    events = json_lines(capsys.readouterr().out)
    assert [event["event"] for event in events] == ["connection lost"]


def test_level_filters_structlog_events(capsys: pytest.CaptureFixture[str]) -> None:
    """Events below the configured level are dropped."""
    configure_logging("warning", json=True)
    logger = structlog.get_logger("agent.test")
    logger.info("dropped")
    logger.error("kept")

    assert [event["event"] for event in json_lines(capsys.readouterr().out)] == ["kept"]


def test_exceptions_are_formatted_into_the_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """logger.exception puts the traceback in an `exception` field of the same JSON object."""
    configure_logging("info", json=True)
    logger = structlog.get_logger("agent.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("it failed")

    (event,) = json_lines(capsys.readouterr().out)
    assert event["level"] == "error"
    assert "RuntimeError: boom" in event["exception"]


def test_configuring_twice_does_not_duplicate_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Calling configure_logging again replaces its handler instead of adding a second one."""
    configure_logging("info", json=True)
    configure_logging("info", json=True)
    structlog.get_logger("agent.test").info("once")
    logging.getLogger("aiohttp.server").warning("once too")

    assert len(json_lines(capsys.readouterr().out)) == 2


def test_console_rendering_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """json=False renders human-readable lines, exceptions included, without warnings."""
    configure_logging("info", json=False)
    logger = structlog.get_logger("agent.test")
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("console event", key="value")

    output = capsys.readouterr().out
    assert "console event" in output and "key" in output and "ValueError" in output
    with pytest.raises(ValueError):
        json.loads(output.splitlines()[0])


def test_json_is_chosen_when_stdout_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """With json=None, a captured (non-TTY) stdout gets JSON lines."""
    configure_logging("info")
    structlog.get_logger("agent.test").info("auto")

    (event,) = json_lines(capsys.readouterr().out)
    assert event["event"] == "auto"


def test_capture_logs_sees_events_after_configuration() -> None:
    """structlog.testing.capture_logs still captures events, with context, once logging is configured."""
    configure_logging("info", json=True)
    logger = structlog.get_logger("agent.test")
    logger.info("before capture")
    # capture_logs replaces the whole chain; merging context variables has to be asked for.
    with capture_logs(processors=[merge_contextvars]) as captured, bound_contextvars(deployment_id="dep_9"):
        logger.info("captured", stage="build")

    assert captured == [{"event": "captured", "stage": "build", "deployment_id": "dep_9", "log_level": "info"}]


def test_unknown_level_is_rejected() -> None:
    """An unknown level name raises ValueError naming it."""
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")
