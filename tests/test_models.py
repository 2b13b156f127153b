"""Request validation and the status machine (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ValidationFailed
from agent.models import (
    TRANSITIONS,
    DeploymentSpec,
    decode_cursor,
    encode_cursor,
    format_time,
    new_deployment_id,
    parse_deployment_request,
    parse_time,
)


def fields_of(body: object, **kwargs) -> set[str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_deployment_request(body, **kwargs)
    return {problem["field"] for problem in caught.value.problems}


def test_valid_request_round_trips(tmp_path: Path) -> None:
    """A full build request parses and survives to_dict/from_dict."""
    spec = parse_deployment_request(
        {
            "application": "web",
            "source": {"type": "path", "path": str(tmp_path)},
            "build": {"image": "local/busybox", "command": ["sh", "-c", "true"], "env": {"A": "1"}, "timeout_s": 5},
            "metadata": {"commit": "abc"},
        }
    )
    assert spec.build is not None and spec.build.command == ("sh", "-c", "true")
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    """One 422 lists every problem, each under its field path."""
    problems = fields_of(
        {
            "application": "Bad!",
            "server": "mars",
            "source": {"type": "path", "path": "relative"},
            "build": {"image": "", "command": [], "env": {"1BAD": "x", "OK": 2}, "timeout_s": -1},
            "extra": True,
        }
    )
    assert problems >= {
        "application", "server", "source.path", "build.image", "build.command",
        "build.env.1BAD", "build.env.OK", "build.timeout_s", "extra",
    }


def test_body_must_be_an_object() -> None:
    """A JSON array or string is a validation error, not a crash."""
    assert fields_of([1, 2]) == {""}
    assert "application" in fields_of({})


def test_remote_servers_and_process_builds() -> None:
    """A configured server is accepted; process builds are for remote servers only."""
    spec = parse_deployment_request(
        {"application": "web", "server": "edge-1", "build": {"runtime": "process", "command": "make"}},
        servers=frozenset({"edge-1"}),
    )
    assert spec.server == "edge-1" and spec.build is not None and spec.build.image is None
    assert fields_of({"application": "a", "build": {"runtime": "process", "command": "make"}}) == {"build.runtime"}
    assert fields_of({"application": "a", "server": "nowhere"}) == {"server"}


def test_release_needs_something_to_run() -> None:
    """A container release needs a build or run.image; a process release needs a command."""
    assert fields_of({"application": "a", "run": {"port": 80}}) == {"run.image"}
    assert fields_of({"application": "a", "run": {"runtime": "process"}}) == {"run.command"}
    assert fields_of({"application": "a", "health_check": {"type": "http"}}) == {"health_check"}
    assert fields_of(
        {"application": "a", "run": {"runtime": "process", "command": "x", "host_port": 80}}
    ) == {"run.host_port"}
    spec = parse_deployment_request(
        {"application": "a", "run": {"image": "local/busybox", "command": ["httpd"], "port": 8080},
         "health_check": {"type": "tcp", "stable_s": 0}}
    )
    assert spec.run is not None and spec.run.port == 8080 and spec.health_check is not None


def test_git_source_rejects_option_injection() -> None:
    """A git url or ref that looks like an option is refused."""
    assert fields_of({"application": "a", "source": {"type": "git", "url": "--upload-pack=x", "ref": "-x"}}) == {
        "source.url", "source.ref",
    }


def test_transitions_end_in_final_states() -> None:
    """Final statuses have no way out; failed and cancelled are reachable from every other."""
    for status, targets in TRANSITIONS.items():
        if status in {"succeeded", "failed", "cancelled"}:
            assert not targets
        else:
            assert {"failed", "cancelled"} <= targets


def test_ids_times_and_cursors() -> None:
    """Ids are unique and time-ordered; times round-trip; cursors reject garbage."""
    ids = [new_deployment_id() for _ in range(100)]
    assert len(set(ids)) == 100 and all(i.startswith("dep_") and len(i) == 30 for i in ids)
    assert format_time(parse_time("2026-11-22T13:00:00.5+01:00")) == "2026-11-22T12:00:00.500Z"
    with pytest.raises(ValueError):
        parse_time("2026-11-22T13:00:00")
    assert decode_cursor(encode_cursor(1234)) == 1234
    for bad in ("", "zzz", "c", "cxyz"):
        with pytest.raises(ValueError):
            decode_cursor(bad)
