"""Request validation and the status machine (pure logic)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from agent.errors import ValidationFailed
from agent.deployment_request import deployment_request_schema
from agent.models import (
    REDACTED,
    TRANSITIONS,
    BuildSpec,
    Deployment,
    DeploymentSpec,
    HealthCheckSpec,
    RunSpec,
    SourceSpec,
    check_source_directory,
    format_time,
    is_application_name,
    is_image_reference,
    new_deployment_id,
    parse_deployment_request,
    parse_metadata,
    parse_time,
    utc_now,
)


def problems_of(body: object, **kwargs) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as caught:
        parse_deployment_request(body, **kwargs)
    return caught.value.problems


def fields_of(body: object, **kwargs) -> set[str]:
    return {problem["field"] for problem in problems_of(body, **kwargs)}


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


def test_ids_and_times() -> None:
    """Ids are unique and time-ordered; times round-trip."""
    ids = [new_deployment_id() for _ in range(100)]
    assert len(set(ids)) == 100 and all(i.startswith("dep_") and len(i) == 30 for i in ids)
    assert format_time(parse_time("2026-11-22T13:00:00.5+01:00")) == "2026-11-22T12:00:00.500Z"
    with pytest.raises(ValueError):
        parse_time("2026-11-22T13:00:00")


# --- whole-string patterns, Docker names ----------------------------------------------------


@pytest.mark.parametrize("name", ["web\n", "web\r\n", "\nweb", "Web", "bad-", "a..b", "a_", "a.", "a___b", "a-.b"])
def test_application_names_docker_would_refuse_are_422(name: str) -> None:
    """Names must match whole and be a Docker path component, so deploy-agent/<name>:<id> always commits."""
    assert fields_of({"application": name}) == {"application"}


@pytest.mark.parametrize("name", ["web", "0", "a-b", "a--b", "a.b", "a_b", "a__b", "web-1.2_x", "a" * 63])
def test_application_names_docker_accepts_are_valid(name: str) -> None:
    """Every name the contract's pattern and Docker's grammar both allow is accepted and is a valid image name."""
    assert is_application_name(name)
    assert is_image_reference(f"deploy-agent/{name}:{new_deployment_id()}")
    assert parse_deployment_request({"application": name}).application == name


@pytest.mark.parametrize("key", ["FOO\n", "FOO\nrm -rf /", "\nFOO", "FO O", "FOO="])
def test_env_names_must_match_whole(key: str) -> None:
    """An env key with a trailing newline (or anything after a valid prefix) is refused."""
    fields = fields_of({"application": "a", "build": {"image": "local/busybox", "command": "x", "env": {key: "v"}}})
    assert fields == {f"build.env.{key}"}


@pytest.mark.parametrize(
    "reference",
    [
        "busybox", "local/busybox", "busybox:1.36", "busybox:latest", "library/busybox:1.36.1-musl",
        "localhost:5000/team/app:v2", "registry.example.com/a/b/c", "Registry.Example.com/app",
        "[::1]:5000/app:tag", "app@sha256:" + "a" * 64, "app:tag@sha256:" + "0" * 64,
        "sha256:" + "f" * 64, "a__b/c-d/e.f_g:T_1.2-3", "x" * 255,
    ],
)
def test_image_references_docker_accepts(reference: str) -> None:
    """name[:tag][@digest] as Docker's reference grammar defines it."""
    assert is_image_reference(reference)


@pytest.mark.parametrize(
    "reference",
    [
        "", "Busybox", "busybox:", ":tag", "busybox\n", "busybox:1\n", "a b", "busybox:-x", "-busybox",
        "a//b", "a/", "/a", "app@sha256:abc", "app@", "app@:" + "a" * 64, "bad-/app", "app:" + "t" * 129,
        "x" * 256, "a..b", "http://host/app", "app:tag:more", "ünïcode",
    ],
)
def test_image_references_docker_refuses(reference: str) -> None:
    """Anything Docker would call an invalid reference format."""
    assert not is_image_reference(reference)


def test_image_reference_check_is_linear_on_hostile_input() -> None:
    """Long near-misses do not make the grammar's regexes backtrack for seconds."""
    started = time.monotonic()
    # At most 255 characters, so that the name regex (not the length check) refuses them.
    for hostile in ("a" * 254 + "!", "a-" * 127 + "!", "a." * 127 + "-", "a/" * 127 + "A", "A-" * 127 + "/"):
        assert not is_image_reference(hostile)
        assert not is_application_name(hostile[:62] + "!")
    assert time.monotonic() - started < 0.5


def test_build_and_run_images_are_checked_at_submit() -> None:
    """build.image and run.image that Docker would refuse are 422 naming each."""
    body = {
        "application": "a",
        "build": {"image": "Local/BusyBox:", "command": "x"},
        "run": {"image": "busybox\n"},
    }
    assert fields_of(body) == {"build.image", "run.image"}


# --- NUL, null, bounds ----------------------------------------------------------------------


def test_nul_is_refused_in_every_string_naming_the_field(tmp_path: Path) -> None:
    """A NUL anywhere (keys, values, list items, nested metadata) is a 422 naming where it is."""
    body = {
        "application": "web\x00",
        "server": "loc\x00al",
        "source": {"type": "git", "url": "https://example.com/r\x00.git", "ref": "main\x00"},
        "build": {
            "image": "busybox\x00",
            "command": ["sh", "-c", "echo \x00"],
            "env": {"A": "x\x00y", "B\x00": "v"},
        },
        "run": {"command": "sleep 1\x00", "bind": "127.0.0.1\x00", "env": {"C": "\x00"}, "port": 80},
        "health_check": {"path": "/\x00"},
        "metadata": {"deep": {"list": ["ok", "n\x00"]}, "k\x00": 1},
    }
    problems = problems_of(body)
    nul = {p["field"] for p in problems if "NUL" in p["message"]}
    assert nul >= {
        "application", "server", "source.url", "source.ref", "build.image", "build.command", "build.env.A",
        "build.env", "run.command", "run.bind", "run.env.C", "health_check.path", "metadata.deep.list", "metadata",
    }
    assert {"field": "build.command", "message": "element 2 must not contain a NUL character"} in problems
    assert not any("\x00" in p["field"] + p["message"] for p in problems)
    assert fields_of({"application": "a", "source": {"type": "path", "path": str(tmp_path) + "\x00"}}) == {
        "source.path"
    }


def test_nul_in_an_unknown_key_is_never_echoed_raw() -> None:
    """A NUL in a key the schema does not know is named with the NUL spelled out."""
    problems = problems_of({"application": "a", "ex\x00tra": True})
    assert {p["field"] for p in problems} == {"body", "ex\\u0000tra"}


def test_null_is_the_same_as_absent() -> None:
    """An explicit null never changes what a request means."""
    assert fields_of({"application": "a", "build": None, "run": {"command": "sleep 3"}}) == {"run.image"}
    assert fields_of({"application": "a", "run": None, "health_check": {"type": "tcp", "port": 80}}) == {
        "health_check"
    }
    spec = parse_deployment_request(
        {
            "application": "a", "server": None, "source": None, "metadata": None, "health_check": None,
            "build": {"image": "local/busybox", "command": "x", "runtime": None, "env": None, "timeout_s": None},
            "run": {"runtime": None, "image": None, "bind": None, "port": None, "memory": None, "cpus": None},
        }
    )
    assert spec.server == "local" and spec.metadata == {} and spec.health_check is None
    assert spec.build is not None and spec.build.runtime == "container" and spec.build.timeout_s == 600.0
    assert spec.run == RunSpec()
    health = parse_deployment_request(
        {"application": "a", "run": {"image": "busybox", "port": 80}, "health_check": {"type": None, "path": None}}
    ).health_check
    assert health is not None and health.type == "http" and health.path == "/"


def test_null_members_of_a_path_source_do_not_count_as_git_fields(tmp_path: Path) -> None:
    """`"url": null` in a path source is absent, not a git field out of place."""
    spec = parse_deployment_request(
        {"application": "a", "source": {"type": "path", "path": str(tmp_path), "url": None, "ref": None}}
    )
    assert spec.source == SourceSpec(type="path", path=str(tmp_path))


def test_env_values_must_be_strings_even_null() -> None:
    """Inside env a null is not "absent": it is a value that is not a string."""
    assert fields_of({"application": "a", "run": {"image": "busybox", "env": {"A": None}}}) == {"run.env.A"}


@pytest.mark.parametrize(
    "run, field",
    [
        ({"port": 2**63}, "run.port"),
        ({"host_port": -1}, "run.host_port"),
        ({"port": True}, "run.port"),
        ({"memory": 2**64}, "run.memory"),
        ({"memory": "9" * 30 + "t"}, "run.memory"),
        ({"memory": "1e999"}, "run.memory"),
        ({"memory": "1m"}, "run.memory"),
        ({"memory": 1.5e9}, "run.memory"),
        ({"memory": "512 megs"}, "run.memory"),
        ({"memory": "2t"}, "run.memory"),
        ({"cpus": 0.001}, "run.cpus"),
        ({"cpus": 1025}, "run.cpus"),
        ({"cpus": "1"}, "run.cpus"),
        ({"pids": 0}, "run.pids"),
        ({"pids": 1_000_001}, "run.pids"),
        ({"pids": 1.0}, "run.pids"),
    ],
)
def test_integers_and_limits_are_bounded(run: dict[str, object], field: str) -> None:
    """Numbers out of range (or of the wrong type) are 422 before they reach SQLite or Docker."""
    assert fields_of({"application": "a", "run": {"image": "busybox", **run}}) == {field}


def test_release_limits_parse_into_the_run_spec() -> None:
    """run.memory takes bytes or a size string; cpus and pids are kept as given."""
    run = parse_deployment_request(
        {"application": "a", "run": {"image": "busybox", "memory": "512m", "cpus": 0.5, "pids": 64}}
    ).run
    assert run is not None and (run.memory, run.cpus, run.pids) == (512 * 1024**2, 0.5, 64)
    run = parse_deployment_request({"application": "a", "run": {"image": "busybox", "memory": 4 * 1024**2}}).run
    assert run is not None and run.memory == 4 * 1024**2 and run.cpus is None and run.pids is None
    assert parse_deployment_request({"application": "a", "run": {"image": "b", "memory": "1t"}}).run.memory == 1024**4


def test_release_limits_are_only_for_containers() -> None:
    """A process release cannot carry container limits it would silently ignore."""
    body = {"application": "a", "run": {"runtime": "process", "command": "x", "memory": "64m", "cpus": 1, "pids": 9}}
    assert fields_of(body) == {"run.memory", "run.cpus", "run.pids"}


# --- bind addresses, metadata ---------------------------------------------------------------


def test_bind_defaults_to_loopback_and_must_be_allowed() -> None:
    """run.bind must be one of docker.bind_addresses; 0.0.0.0 is refused naming the allowed ones."""
    run = parse_deployment_request({"application": "a", "run": {"image": "busybox"}}).run
    assert run is not None and run.bind == "127.0.0.1"
    for bad in ("0.0.0.0", "127.0.0.1\n", "localhost", "::1", "127.0.0.2"):
        with pytest.raises(ValidationFailed) as caught:
            parse_deployment_request({"application": "a", "run": {"image": "busybox", "bind": bad}})
        assert [(p["field"], "127.0.0.1" in p["message"]) for p in caught.value.problems] == [("run.bind", True)]
        assert "docker.bind_addresses" in caught.value.message


def test_bind_addresses_come_from_the_config() -> None:
    """Configured addresses are accepted (normalised); without loopback the default is the first one."""
    allowed = ("10.0.0.5", "::1")
    run = parse_deployment_request({"application": "a", "run": {"image": "b"}}, bind_addresses=allowed).run
    assert run is not None and run.bind == "10.0.0.5"
    run = parse_deployment_request(
        {"application": "a", "run": {"image": "b", "bind": "0:0::1"}}, bind_addresses=allowed
    ).run
    assert run is not None and run.bind == "::1"
    assert fields_of({"application": "a", "run": {"image": "b", "bind": "127.0.0.1"}}, bind_addresses=allowed) == {
        "run.bind"
    }


def test_metadata_is_at_most_16_kib_of_json() -> None:
    """Metadata of exactly 16 KiB (compact JSON, UTF-8) is accepted; one byte more is 422 naming metadata."""
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    fits = {"k": "x" * (16 * 1024 - overhead)}
    assert parse_deployment_request({"application": "a", "metadata": fits}).metadata == fits
    with pytest.raises(ValidationFailed) as caught:
        parse_deployment_request({"application": "a", "metadata": {"k": "x" * (16 * 1024 - overhead + 1)}})
    assert [p["field"] for p in caught.value.problems] == ["metadata"]
    assert "16384" in caught.value.message
    assert parse_metadata({"commit": "abc"}) == {"commit": "abc"}
    for bad in ([1], {"k": "\x00"}, {"k": "x" * 20_000}):
        with pytest.raises(ValidationFailed):
            parse_metadata(bad)


# --- process builds, source checks ----------------------------------------------------------


def test_local_process_build_message_points_to_remote_servers() -> None:
    """A local build.runtime "process" is a 422 that says where process builds run instead."""
    problems = problems_of({"application": "a", "build": {"runtime": "process", "command": "make"}})
    assert [p["field"] for p in problems] == ["build.runtime"]
    assert "remote servers" in problems[0]["message"] and "container" in problems[0]["message"]


def test_source_directory_check_can_be_deferred(tmp_path: Path) -> None:
    """check_source=False leaves the directory to check_source_directory (after policy allowed the path)."""
    missing = str(tmp_path / "missing")
    body = {"application": "a", "source": {"type": "path", "path": missing}}
    assert fields_of(body) == {"source.path"}
    spec = parse_deployment_request(body, check_source=False)
    with pytest.raises(ValidationFailed) as caught:
        check_source_directory(spec)
    assert caught.value.problems[0]["field"] == "source.path"
    present = {"application": "a", "source": {"type": "path", "path": str(tmp_path)}}
    check_source_directory(parse_deployment_request(present))
    assert fields_of({"application": "a", "source": {"type": "path", "path": "rel"}}, check_source=False) == {
        "source.path"
    }


def test_git_url_with_a_control_character_is_refused() -> None:
    """A newline in a git URL could break out of a generated script line."""
    assert fields_of({"application": "a", "source": {"type": "git", "url": "https://h/r.git\nid"}}) == {"source.url"}


# --- the deployment object ------------------------------------------------------------------


def test_to_json_redacts_env_values_and_echoes_metadata_once() -> None:
    """Responses show env keys with "***"; metadata is top-level only; the stored form keeps everything."""
    spec = parse_deployment_request(
        {
            "application": "a",
            "build": {"image": "local/busybox", "command": "x", "env": {"DB_PASSWORD": "s3cr3t-value"}},
            "run": {"env": {"API_KEY": "k3y-value-123"}},
            "metadata": {"commit": "abc"},
        }
    )
    deployment = Deployment(
        id=new_deployment_id(), application="a", server="local", status="queued", created_at=utc_now(),
        updated_at=utc_now(), log_path="/tmp/x.log", spec=spec,
    )
    shown = deployment.to_json()
    assert shown["spec"]["build"]["env"] == {"DB_PASSWORD": REDACTED}
    assert shown["spec"]["run"]["env"] == {"API_KEY": REDACTED}
    assert "metadata" not in shown["spec"] and shown["metadata"] == {"commit": "abc"}
    text = json.dumps(shown)
    assert "s3cr3t-value" not in text and "k3y-value-123" not in text
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec  # the store still has the values



# --- the schema -------------------------------------------------------------------------------


def test_the_request_schema_is_a_json_schema_naming_every_field() -> None:
    """The declaration that validates a request also gives its JSON Schema, with every spec field in it."""
    schema = deployment_request_schema()
    assert json.loads(json.dumps(schema)) == schema
    objects = {"DeploymentSpec": schema, **schema["$defs"]}
    for spec in (DeploymentSpec, SourceSpec, BuildSpec, RunSpec, HealthCheckSpec):
        described = objects[spec.__name__]
        assert set(described["properties"]) == {item.name for item in dataclasses.fields(spec)}, spec
        assert described["additionalProperties"] is False
    assert schema["required"] == ["application"]
    assert "image" not in objects["BuildSpec"].get("required", [])
    assert objects["RunSpec"]["properties"]["port"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 65535}


def test_a_spec_built_in_code_is_not_validated_again() -> None:
    """Specs are plain frozen dataclasses: replace() and direct construction trust their caller."""
    spec = parse_deployment_request({"application": "a", "run": {"image": "busybox", "port": 80}})
    assert dataclasses.replace(spec, build=None, source=None).run == spec.run
    assert RunSpec(bind="0.0.0.0").bind == "0.0.0.0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.application = "b"  # type: ignore[misc]


def test_the_response_json_of_a_spec_is_made_once_and_never_leaks_into_the_spec() -> None:
    import dataclasses

    from agent.deployment_request import parse_deployment_request
    from agent.models import spec_json

    body = {"application": "web", "build": {"image": "local/busybox", "command": "make", "env": {"SECRET": "v"}}}
    spec = parse_deployment_request(body, check_source=False)
    first = spec_json(spec)
    assert first["build"]["env"] == {"SECRET": "***"}
    assert spec_json(spec) is first
    assert spec.to_dict()["build"]["env"] == {"SECRET": "v"} and "_response_json" not in spec.to_dict()
    assert spec == parse_deployment_request(body, check_source=False)
    changed = dataclasses.replace(spec, build=dataclasses.replace(spec.build, env={"OTHER": "w"}))
    assert spec_json(changed)["build"]["env"] == {"OTHER": "***"}
