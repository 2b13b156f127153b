"""Secrets: env values never in responses, logs or release images; the state dir is the agent's alone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import docker

from tests.e2e.conftest import ADMIN_TOKEN, READ_TOKEN, WRITE_TOKEN, AgentProcess

BUILD_SECRET = "s3cr3t-build-password-91f2"
RUN_SECRET = "s3cr3t-run-api-key-77ab"
FAST_CHECK = {"type": "http", "path": "/", "interval_s": 0.2, "timeout_s": 1, "retries": 25, "stable_s": 0.5}


def env_maps(value: Any) -> Iterator[dict[str, Any]]:
    """Every object under an `env` key anywhere in a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "env" and isinstance(item, dict):
                yield item
            yield from env_maps(item)
    elif isinstance(value, list):
        for item in value:
            yield from env_maps(item)


def assert_redacted(document: Any, text: str, keys: set[str]) -> None:
    """No secret in the raw text; every env map shows `***`; each of `keys` is still shown."""
    assert BUILD_SECRET not in text and RUN_SECRET not in text, text[:2000]
    seen: set[str] = set()
    for env in env_maps(document):
        assert all(value == "***" for value in env.values()), env
        seen |= set(env)
    assert keys <= seen, (keys, document)


def secret_request(application: str = "web") -> dict[str, Any]:
    return {
        "application": application,
        "build": {
            "image": "local/busybox",
            "command": 'echo "build sees $DB_PASSWORD"; echo "short $SHORT"; echo visible-line; echo ok > /workspace/index.html',
            "env": {"DB_PASSWORD": BUILD_SECRET, "SHORT": "abc"},
        },
        "run": {
            "command": 'echo "release sees $API_KEY"; exec httpd -f -p 8080 -h /workspace',
            "port": 8080,
            "env": {"API_KEY": RUN_SECRET, "APP_MODE": "production-mode"},
        },
        "health_check": FAST_CHECK,
    }


def test_env_values_are_redacted_in_every_response(agent: AgentProcess) -> None:
    """POST, GET one and GET list (with a read token) show env keys with `***`, never a value."""
    created = agent.request("POST", "/v1/deployments", json=secret_request(), token=WRITE_TOKEN)
    assert created.status_code == 201, created.text
    keys = {"DB_PASSWORD", "SHORT", "API_KEY", "APP_MODE"}
    assert_redacted(created.json(), created.text, keys)
    deployment_id = created.json()["id"]
    final = agent.wait_for(deployment_id, timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(deployment_id)[-3000:])
    for path in (f"/v1/deployments/{deployment_id}", "/v1/deployments", "/v1/deployments?application=web"):
        response = agent.request("GET", path, token=READ_TOKEN)
        assert response.status_code == 200, response.text
        assert_redacted(response.json(), response.text, keys)
    for path in ("/v1/applications", "/v1/applications/web", "/metrics"):
        response = agent.request("GET", path, token=READ_TOKEN)
        assert response.status_code == 200, response.text
        assert BUILD_SECRET not in response.text and RUN_SECRET not in response.text
    rollback = agent.request("POST", f"/v1/deployments/{deployment_id}/rollback", token=WRITE_TOKEN)
    assert rollback.status_code == 201, rollback.text
    assert_redacted(rollback.json(), rollback.text, {"API_KEY", "APP_MODE"})
    agent.wait_for(rollback.json()["id"], timeout=90)


def test_an_idempotent_replay_is_redacted_too(agent: AgentProcess) -> None:
    """The 200 answer to a repeated Idempotency-Key shows `***` like the first 201."""
    headers = {"Idempotency-Key": "replay-1"}
    first = agent.request("POST", "/v1/deployments", json=secret_request(), headers=headers, token=WRITE_TOKEN)
    again = agent.request("POST", "/v1/deployments", json=secret_request(), headers=headers, token=WRITE_TOKEN)
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    assert_redacted(again.json(), again.text, {"DB_PASSWORD", "API_KEY"})


def test_printed_secrets_are_masked_in_the_log(agent: AgentProcess) -> None:
    """A build and a release that echo values of 8+ characters: the log shows `***`, never the value."""
    final = agent.wait_for(agent.submit(secret_request())["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    log = agent.log(final["id"])
    assert "build stdout | build sees ***" in log, log
    assert "build stdout | visible-line" in log, log
    assert "release sees ***" in log, log
    file_text = Path(final["log_path"]).read_text()
    for text in (log, file_text, agent.output()):
        assert BUILD_SECRET not in text and RUN_SECRET not in text


def test_release_image_and_container_hold_no_build_env(agent: AgentProcess, docker_client: docker.DockerClient) -> None:
    """The release image's Env is the base image's; the release container has run.env, not build.env."""
    body = {
        "application": "web",
        "build": {
            "image": "local/busybox",
            "command": "echo ok > /workspace/index.html",
            "env": {"DB_PASSWORD": BUILD_SECRET},
        },
        "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080,
                "env": {"APP_MODE": "production-mode"}},
        "health_check": FAST_CHECK,
    }
    final = agent.wait_for(agent.submit(body)["id"], timeout=90)
    assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    container = docker_client.containers.get(final["container_id"])
    image = docker_client.images.get(final.get("release_image") or container.image.id)
    base = docker_client.images.get("local/busybox")
    assert image.attrs["Config"]["Env"] == base.attrs["Config"]["Env"]
    # `docker commit` also records the committed container's config (ContainerConfig): it must not carry the build env.
    assert BUILD_SECRET not in json.dumps(image.attrs), "a build.env value is stored in the release image's metadata"
    env = container.attrs["Config"]["Env"]
    assert "APP_MODE=production-mode" in env
    assert not any(entry.startswith("DB_PASSWORD=") for entry in env), env
    assert BUILD_SECRET not in json.dumps(container.attrs)
    exec_env = container.exec_run(["env"]).output.decode()
    assert "APP_MODE=production-mode" in exec_env and BUILD_SECRET not in exec_env


def test_state_dir_is_readable_by_the_agent_alone(
    agent_factory: Callable[..., AgentProcess], source_dir: Path
) -> None:
    """After container and process deployments every dir under state_dir is 0700 and no file has group/other bits."""
    agent = agent_factory()
    container = {
        "application": "web",
        "source": {"type": "path", "path": str(source_dir)},
        "build": {"image": "local/busybox", "command": "chmod -R 777 /workspace; echo built",
                  "env": {"DB_PASSWORD": BUILD_SECRET}},
        "run": {"command": ["httpd", "-f", "-p", "8080", "-h", "/workspace"], "port": 8080},
        "health_check": FAST_CHECK,
    }
    process = {
        "application": "proc",
        "build": {"image": "local/busybox", "command": "echo p > /workspace/index.html; chmod 777 /workspace/index.html"},
        "run": {"runtime": "process", "command": "exec busybox httpd -f -p $PORT -h ."},
        "health_check": FAST_CHECK,
    }
    for body in (container, process):
        final = agent.wait_for(agent.submit(body, token=ADMIN_TOKEN)["id"], timeout=90)
        assert final["status"] == "succeeded", (final, agent.log(final["id"])[-3000:])
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    database = agent.state_dir / "agent.db"
    assert database.is_file()
    exact = [database, *agent.state_dir.glob("agent.db-*"), *(agent.state_dir / "logs").glob("*")]
    for path in exact:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, (path, oct(path.lstat().st_mode))
    bad = []
    for root, dirs, files in os.walk(agent.state_dir):
        for name in dirs:
            mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
            if not stat.S_ISLNK(os.lstat(os.path.join(root, name)).st_mode) and mode != 0o700:
                bad.append((os.path.join(root, name), oct(mode)))
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                bad.append((os.path.join(root, name), oct(stat.S_IMODE(info.st_mode))))
    assert bad == [], f"readable by group or others: {bad[:20]}"


def test_secret_files_readable_by_others_are_warned_about(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A config with plain tokens or an SSH identity file that group/others can read: a warning at start naming it."""
    identity = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(identity)], check=True)
    identity.chmod(0o644)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    server = (f'\n[servers.edge]\nhost = "127.0.0.1"\nuser = "root"\nidentity_file = "{identity}"\n'
              f'known_hosts = "{known_hosts}"\n')
    loose = agent_factory("loose", start=False, extra_toml=server)
    loose.config_path.chmod(0o644)
    loose.start()
    warnings = warning_lines(loose)
    assert any(str(loose.config_path) in line for line in warnings), loose.output()
    assert any(str(identity) in line for line in warnings), loose.output()
    identity.chmod(0o600)
    tight = agent_factory("tight", start=False, extra_toml=server)
    tight.config_path.chmod(0o600)
    tight.start()
    assert not any(str(tight.config_path) in line or str(identity) in line for line in warning_lines(tight)), tight.output()


def warning_lines(agent: AgentProcess) -> list[str]:
    return [line for line in agent.output().splitlines() if "warn" in line.lower()]
