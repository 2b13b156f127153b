"""The policy on host processes and host paths: scopes, config switches, source roots, own files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.config import Config, SecuritySettings, ServerConfig
from agent.errors import Forbidden
from agent.models import BuildSpec, DeploymentSpec, RunSpec, SourceSpec
from agent.policy import authorize_spec, local_git_path

WRITE = frozenset({"deployments:write"})
PROCESSES = frozenset({"deployments:write", "processes:write"})
ADMIN = frozenset({"admin"})


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """A source root with a source in it, the agent's state dir and config dir inside the root too."""
    root = tmp_path / "srv"
    (root / "web").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "agent.toml").write_text("")
    outside = tmp_path / "outside"
    outside.mkdir()
    return {"root": root, "web": root / "web", "state": root / "state", "etc": root / "etc", "outside": outside}


def make_config(host: dict[str, Path], *, allow: bool = True, roots: tuple[Path, ...] | None = None) -> Config:
    base = Config()
    return dataclasses.replace(
        base,
        agent=dataclasses.replace(base.agent, state_dir=host["state"]),
        security=SecuritySettings(
            allow_host_processes=allow,
            source_roots=tuple(Path(os.path.realpath(r)) for r in (roots if roots is not None else (host["root"],))),
        ),
        path=host["etc"] / "agent.toml",
    )


def path_spec(path: Path | str, server: str = "local") -> DeploymentSpec:
    return DeploymentSpec(application="web", server=server, source=SourceSpec(type="path", path=str(path)))


def git_spec(url: str, server: str = "local") -> DeploymentSpec:
    return DeploymentSpec(application="web", server=server, source=SourceSpec(type="git", url=url))


def process_spec(*, build: bool = False, run: bool = True) -> DeploymentSpec:
    return DeploymentSpec(
        application="web",
        build=BuildSpec(image=None, command="make", runtime="process") if build else None,
        run=RunSpec(runtime="process", command="./serve") if run else None,
    )


def refusal(spec: DeploymentSpec, config: Config, scopes: frozenset[str] | None = WRITE) -> Forbidden:
    with pytest.raises(Forbidden) as refused:
        authorize_spec(spec, config, scopes)
    assert refused.value.status == 403 and refused.value.error_type == "forbidden"
    return refused.value


# --- host processes ------------------------------------------------------------------------


def test_container_deployments_need_nothing_more(host: dict[str, Path]) -> None:
    """A build and release in containers, with no source, passes for a plain write token."""
    spec = DeploymentSpec(
        application="web", build=BuildSpec(image="local/busybox", command="true"), run=RunSpec(command="httpd")
    )
    authorize_spec(spec, make_config(host, allow=False), WRITE)


@pytest.mark.parametrize("scopes", [PROCESSES, ADMIN, None])
def test_host_process_with_the_switch_and_the_scope_passes(
    host: dict[str, Path], scopes: frozenset[str] | None
) -> None:
    """allow_host_processes plus processes:write (or admin, or the start-time check) allows runtime process."""
    authorize_spec(process_spec(build=True), make_config(host), scopes)


@pytest.mark.parametrize("scopes", [WRITE, ADMIN, None])
def test_host_process_is_refused_while_the_config_forbids_it(
    host: dict[str, Path], scopes: frozenset[str] | None
) -> None:
    """With allow_host_processes off no token, not even admin, gets a host process; the message says which key."""
    error = refusal(process_spec(), make_config(host, allow=False), scopes)
    assert "security.allow_host_processes" in error.message
    assert error.details == [{"field": "run.runtime", "message": error.details[0]["message"]}]


def test_host_process_build_is_refused_without_the_scope(host: dict[str, Path]) -> None:
    """A build with runtime process needs processes:write; the message names the scope and the setting."""
    error = refusal(process_spec(build=True, run=False), make_config(host), WRITE)
    assert error.message.startswith("build.runtime: ")
    assert "processes:write" in error.message and "security.allow_host_processes" in error.message


def test_every_refused_field_is_named(host: dict[str, Path]) -> None:
    """A build and a run on the host are both reported, in the message and in details."""
    error = refusal(process_spec(build=True), make_config(host, allow=False))
    assert [problem["field"] for problem in error.details] == ["build.runtime", "run.runtime"]


# --- path sources --------------------------------------------------------------------------


def test_path_under_a_source_root_passes(host: dict[str, Path]) -> None:
    """A directory inside a source root may be a source."""
    authorize_spec(path_spec(host["web"]), make_config(host), WRITE)


def test_no_source_roots_refuses_every_path(host: dict[str, Path]) -> None:
    """By default (no source_roots) every path source is refused, naming source.path and the setting."""
    error = refusal(path_spec(host["web"]), make_config(host, roots=()))
    assert error.message.startswith("source.path: ")
    assert "security.source_roots" in error.message


@pytest.mark.parametrize("path", ["/etc", "/", "/etc/deploy-agent"])
def test_host_directories_outside_the_roots_are_refused(host: dict[str, Path], path: str) -> None:
    """/etc and friends are refused with 403 naming source.path."""
    error = refusal(path_spec(path), make_config(host))
    assert "source.path" in error.message and "outside security.source_roots" in error.message


def test_a_symlink_out_of_the_root_is_judged_by_its_target(host: dict[str, Path]) -> None:
    """A link inside a root that points to /etc is /etc: refused."""
    (host["root"] / "sneaky").symlink_to("/etc")
    error = refusal(path_spec(host["root"] / "sneaky"), make_config(host))
    assert "outside security.source_roots" in error.message
    assert "'/etc'" not in error.message  # the link's target is not revealed


def test_dot_dot_cannot_climb_out_of_the_root(host: dict[str, Path]) -> None:
    """root/web/../../outside resolves outside the root: refused."""
    refusal(path_spec(f"{host['web']}/../../outside"), make_config(host))


def test_a_root_that_is_a_symlink_means_its_target(tmp_path: Path, host: dict[str, Path]) -> None:
    """Roots are compared after realpath, so a source under a symlinked root's target passes."""
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(host["root"])
    authorize_spec(path_spec(host["web"]), make_config(host, roots=(linked_root,)), WRITE)


@pytest.mark.parametrize("name", ["state", "etc"])
def test_state_and_config_dirs_are_refused_even_inside_a_root(host: dict[str, Path], name: str) -> None:
    """The state dir and the config's directory (and anything in them) are never sources."""
    config = make_config(host)
    for path in (host[name], host[name] / "logs"):
        error = refusal(path_spec(path), config)
        assert "never a source" in error.message


def test_a_source_that_contains_the_state_dir_is_refused(host: dict[str, Path]) -> None:
    """Copying a parent of the state dir would copy the state into itself: refused."""
    error = refusal(path_spec(host["root"]), make_config(host))
    assert "contains the agent's state directory" in error.message


def test_a_symlink_into_the_state_dir_is_refused(host: dict[str, Path]) -> None:
    """A link in the root that points into the state dir resolves there: refused."""
    (host["web"] / "db").symlink_to(host["state"])
    error = refusal(path_spec(host["web"] / "db"), make_config(host))
    assert "state directory" in error.message


def test_an_ssh_identity_file_is_never_part_of_a_source(host: dict[str, Path]) -> None:
    """A source that contains a server's identity file is refused, even inside a root."""
    (host["web"] / "keys").mkdir()
    key = host["web"] / "keys" / "id_ed25519"
    key.write_text("secret")
    config = dataclasses.replace(
        make_config(host),
        servers={"edge": ServerConfig(name="edge", host="h", user="u", identity_file=str(key), known_hosts="k")},
    )
    error = refusal(path_spec(host["web"]), config)
    assert "identity file of server edge" in error.message


def test_path_sources_of_remote_deployments_are_held_to_the_rule(host: dict[str, Path]) -> None:
    """A path source is copied from the agent's host even when the deployment runs elsewhere."""
    refusal(path_spec("/etc", server="edge"), make_config(host))


# --- git sources ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/example/repo.git",
        "ssh://git@example.com/repo.git",
        "git://example.com/repo.git",
        "git@example.com:example/repo.git",
        "example.com:repo",
        "[::1]:repo",
        "ext::sh -c touch% /tmp/x",
    ],
)
def test_network_git_urls_pass_and_are_not_host_paths(host: dict[str, Path], url: str) -> None:
    """URLs git fetches over a network (or a remote helper) are not host paths."""
    assert local_git_path(url) is None
    authorize_spec(git_spec(url), make_config(host, roots=()), WRITE)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("/etc", "/etc"),
        ("./repo", "./repo"),
        ("repo", "repo"),
        ("../x:y", "../x:y"),
        ("file:///etc", "/etc"),
        ("file://host/etc", "/etc"),
        ("FILE:///etc", "/etc"),
        ("file:///et%63", "/etc"),
        ("file:/etc", "/etc"),
    ],
)
def test_local_git_urls_are_host_paths(url: str, path: str) -> None:
    """Local paths and file: URLs (any case, any host part, percent-encoded) name a host path."""
    assert local_git_path(url) == path


@pytest.mark.parametrize("url", ["/etc", "file:///etc", "file://localhost/etc/", "file:/etc"])
def test_local_git_urls_outside_the_roots_are_refused(host: dict[str, Path], url: str) -> None:
    """A local repository outside the roots is refused, naming source.url."""
    error = refusal(git_spec(url), make_config(host))
    assert error.message.startswith("source.url: ") and "security.source_roots" in error.message


def test_local_git_url_into_the_state_dir_is_refused(host: dict[str, Path]) -> None:
    """A file:// URL of the state dir is refused even though the state dir is inside a root."""
    error = refusal(git_spec(f"file://{host['state']}"), make_config(host))
    assert "state directory" in error.message


def test_local_git_url_under_a_root_passes(host: dict[str, Path]) -> None:
    """A repository inside a root may be cloned by path or file:// URL."""
    config = make_config(host)
    authorize_spec(git_spec(str(host["web"])), config, WRITE)
    authorize_spec(git_spec(f"file://{host['web']}"), config, WRITE)


def test_git_urls_of_remote_deployments_are_paths_of_the_server(host: dict[str, Path]) -> None:
    """A remote deployment clones on its server: a local-looking URL is not a path of this host."""
    authorize_spec(git_spec("/etc", server="edge"), make_config(host), WRITE)
