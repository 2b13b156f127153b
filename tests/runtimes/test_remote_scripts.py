"""The shell scripts the agent sends to servers, checked without a server: by parsing and local /bin/sh."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.errors import RuntimeFailure
from agent.runtimes.remote.layout import RemoteLayout, remote_release_dir
from agent.runtimes.remote.scripts import (
    GROUP_TAG_VARIABLE, MARKER, REMOTE_GIT_OPTIONS, archive_script, check_env, checkout_command, clone_command,
    command_line, kill_script, launch_script, listening_ports, pick_free_port, read_state, release_script,
    remove_script, resolve_ref_script, sh_command, state_script,
)

DEADLINE_S = 10.0
HOSTILE_VALUES = {
    "NEWLINE": "first\nsecond\n",
    "SINGLE": "it's 'quoted'",
    "DOUBLE": 'say "hi"',
    "SUBSTITUTION": "$(touch pwned)",
    "BACKTICKS": "`touch pwned`",
    "VARIABLE": "$HOME ${PATH}",
    "BACKSLASH": "a\\b\\\\c\\n",
    "SEMICOLON": "x; touch pwned; y",
    "GLOB": "* ? [a-z]",
    "DASHES": "--not-an-option",
    "EMPTY": "",
    "IFS": " \t",
    "UNICODE": "héllo ✓",
}
HOSTILE_DIR = "dir with spaces, 'quotes', \"doubles\" and $(touch pwned)"


def run_sh(command_line_text: str, cwd: Path, stdin: bytes = b"go\n") -> subprocess.CompletedProcess[bytes]:
    """Runs a command line as sshd would hand it to the login shell."""
    return subprocess.run(["/bin/sh", "-c", command_line_text], cwd=cwd, input=stdin, capture_output=True,
                          timeout=DEADLINE_S)


def read_env0(output: bytes) -> dict[str, str]:
    entries = [entry.decode() for entry in output.split(b"\0") if entry]
    return dict(entry.split("=", 1) for entry in entries)


def wait_for(path: Path) -> str:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.02)
    return path.read_text()


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


# -- launch_script -------------------------------------------------------------------------------


def test_launch_script_passes_hostile_env_values_unchanged(tmp_path: Path) -> None:
    """Env values with newlines, quotes, `$()`, backticks and globs reach the command byte for byte."""
    result = run_sh(launch_script(str(tmp_path), HOSTILE_VALUES, ("env", "-0")), tmp_path)
    assert result.returncode == 0, result.stderr
    marker, _, env_output = result.stdout.partition(b"\n")
    env = read_env0(env_output)
    for name, value in HOSTILE_VALUES.items():
        assert env[name] == value, name
    assert not list(tmp_path.rglob("pwned")), "a value was run as a command"
    fields = marker.decode().split()
    assert fields[0] == MARKER and fields[1].isdigit() and fields[2].isdigit()
    assert env[GROUP_TAG_VARIABLE] == f"{fields[1]}:{fields[2]}"


def test_launch_script_runs_in_a_hostile_directory_it_may_create(tmp_path: Path) -> None:
    """A directory with spaces, quotes and `$()` is created and entered as one word."""
    directory = tmp_path / HOSTILE_DIR / "sub"
    result = run_sh(launch_script(str(directory), {}, ("pwd",), create_dir=True), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[1] == str(directory)
    assert not (tmp_path / "pwned").exists()


def test_launch_script_keeps_command_words_apart(tmp_path: Path) -> None:
    """A command given as words is run as exactly those words; a string runs under /bin/sh -c."""
    words = ("printf", "%s|", "a b", "$(id)", "'", '"', "\\", "")
    result = run_sh(launch_script(str(tmp_path), {}, words), tmp_path)
    assert result.stdout.decode().splitlines()[1] == "a b|$(id)|'|\"|\\||"
    result = run_sh(launch_script(str(tmp_path), {"IFS": ":"}, "echo $((1 + 2)) 'two words'"), tmp_path)
    assert result.stdout.decode().splitlines()[1] == "3 two words"


def test_launch_script_waits_for_go_before_it_runs_the_command(tmp_path: Path) -> None:
    """Without "go" (the agent gone) the shell exits 125 and the command never runs."""
    result = run_sh(launch_script(str(tmp_path), {}, ("touch", "ran")), tmp_path, stdin=b"")
    assert result.returncode == 125
    assert result.stdout.decode().startswith(MARKER)
    assert not (tmp_path / "ran").exists()


def test_launch_script_stops_when_the_directory_is_missing(tmp_path: Path) -> None:
    """cd failing ends the shell before the marker: nothing is reported, nothing runs."""
    result = run_sh(launch_script(str(tmp_path / "missing"), {}, ("touch", "ran")), tmp_path)
    assert result.returncode != 0
    assert MARKER.encode() not in result.stdout
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["A-B", "1A", "A B", "A\nB", "", "A=B", "$(x)", "É"])
def test_env_names_a_shell_cannot_export_are_refused(name: str) -> None:
    """A variable name that is not [A-Za-z_][A-Za-z0-9_]* is a RuntimeFailure naming it."""
    with pytest.raises(RuntimeFailure, match="cannot be passed to a remote command"):
        check_env({name: "x"})
    with pytest.raises(RuntimeFailure):
        launch_script("/tmp", {name: "x"}, ("true",))
    with pytest.raises(RuntimeFailure):
        release_script("/tmp", {name: "x"}, ("true",), "/tmp/run")


@pytest.mark.parametrize("command", ["", "   ", "\n", (), []])
def test_an_empty_command_is_refused(command: tuple[str, ...] | str) -> None:
    """An empty or blank command is a RuntimeFailure "empty command"."""
    with pytest.raises(RuntimeFailure, match="empty command"):
        command_line(command)


def test_sh_command_wraps_any_script_as_one_word() -> None:
    """The script reaches /bin/sh -c as one argument, whatever quotes and newlines it holds."""
    script = "echo 'a'\necho \"$(b)\" `c` \\"
    assert shlex.split(sh_command(script)) == ["exec", "/bin/sh", "-c", script]


# -- release_script ------------------------------------------------------------------------------


def test_release_script_runs_the_supervised_command_with_hostile_values(tmp_path: Path) -> None:
    """The release sees its env values as given; output and exit code land in a run dir with spaces."""
    run_dir = tmp_path / "run dir 'x' $(touch pwned)"
    workdir = tmp_path / HOSTILE_DIR
    workdir.mkdir()
    command = ("/bin/sh", "-c", 'env -0; pwd >&2; exit 3')
    result = run_sh(release_script(str(workdir), HOSTILE_VALUES, command, str(run_dir)), tmp_path, stdin=b"go\n")
    assert result.returncode == 0, result.stderr
    fields = result.stdout.decode().split()
    assert fields[0] == MARKER and fields[1].isdigit() and fields[2].isdigit()
    assert wait_for(run_dir / "exit_code").strip() == "3"
    env = read_env0((run_dir / "stdout").read_bytes())
    for name, value in HOSTILE_VALUES.items():
        # The supervisor is a /bin/sh, and every sh sets IFS afresh at startup.
        assert env[name] == (value if name != "IFS" else " \t\n"), name
    assert env[GROUP_TAG_VARIABLE] == f"{fields[1]}:{fields[2]}"
    assert (run_dir / "stderr").read_text().strip() == str(workdir)
    assert not list(tmp_path.rglob("pwned"))


def test_release_script_starts_nothing_without_go(tmp_path: Path) -> None:
    """EOF instead of "go" (a start cancelled while its channel opened): exit 125, no supervisor, nothing ran."""
    run_dir = tmp_path / "run"
    result = run_sh(release_script(str(tmp_path), {}, ("touch", str(tmp_path / "ran")), str(run_dir)), tmp_path, stdin=b"")
    assert result.returncode == 125
    assert MARKER.encode() not in result.stdout
    time.sleep(0.3)
    assert not (tmp_path / "ran").exists() and not (run_dir / "exit_code").exists()


def test_release_script_reports_the_pid_only_once_it_leads_its_group(tmp_path: Path) -> None:
    """When the marker is printed, setsid has run: a kill of group $pid right away finds it."""
    for attempt in range(30):
        run_dir = tmp_path / f"run{attempt}"
        result = run_sh(release_script(str(tmp_path), {}, ("sleep", "30"), str(run_dir)), tmp_path, stdin=b"go\n")
        assert result.returncode == 0, result.stderr
        pid = int(result.stdout.decode().split()[1])
        try:
            assert os.getpgid(pid) == pid, f"attempt {attempt}"
        finally:
            os.killpg(pid, signal.SIGKILL)


# -- kill, state and housekeeping scripts --------------------------------------------------------


def test_kill_script_stops_only_the_group_it_was_given(tmp_path: Path) -> None:
    """With the right start time the group is killed; a wrong one is not ours; a missing pid is gone."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ticks = start_ticks(process.pid)
        assert run_sh(sh_command(kill_script(process.pid, ticks + 1, 0.5)), tmp_path).stdout.strip() == b"not-ours"
        assert process.poll() is None
        assert run_sh(sh_command(kill_script(process.pid, ticks, 0.5)), tmp_path).stdout.strip() == b"killed"
        assert process.wait(timeout=DEADLINE_S) == -signal.SIGTERM
        assert run_sh(sh_command(kill_script(process.pid, ticks, 0.5)), tmp_path).stdout.strip() == b"gone"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_kill_script_sets_only_numbers_and_the_tag() -> None:
    """Its variables are whole numbers and the group tag; polls are tenths of the grace, rounded up."""
    header = kill_script(1234, 5678.0, 1.01).splitlines()[0]
    assert header == f"pid=1234; want=5678; polls=11; tag={GROUP_TAG_VARIABLE}=1234:5678"
    assert "polls=0;" in kill_script(1234, 5678.0, 0)


def test_state_script_reads_the_exit_code_from_a_hostile_run_dir(tmp_path: Path) -> None:
    """A gone process reports the exit code its supervisor left, whatever the run dir is called."""
    run_dir = tmp_path / "run 'dir' $(touch pwned)"
    run_dir.mkdir()
    (run_dir / "exit_code").write_text("-9\n")
    output = run_sh(sh_command(state_script(999_999_999, 1, str(run_dir))), tmp_path).stdout.decode()
    assert read_state(output) == ("gone", -9)
    assert read_state(run_sh(sh_command(state_script(os.getpid(), start_ticks(os.getpid()), str(run_dir))),
                             tmp_path).stdout.decode()) == ("running", None)
    assert not (tmp_path / "pwned").exists()


def test_read_state_rejects_anything_else() -> None:
    """Only `running` or `gone [code]` is a state."""
    assert read_state("gone\n") == ("gone", None)
    assert read_state("gone x") == ("gone", None)
    assert read_state("") is None
    assert read_state("sh: 1: syntax error") is None


def test_remove_script_removes_a_hostile_path_and_nothing_else(tmp_path: Path) -> None:
    """The path is one word: read-only parts go too, and a sibling sharing its prefix stays."""
    target = tmp_path / "work space $(touch pwned) 'x'"
    (target / "ro").mkdir(parents=True)
    (target / "ro" / "file").write_text("x")
    (target / "ro").chmod(0o500)
    sibling = tmp_path / "work"
    sibling.mkdir()
    assert run_sh(sh_command(remove_script(str(target))), tmp_path).returncode == 0
    assert not target.exists() and sibling.exists()
    assert not (tmp_path / "pwned").exists()


def test_archive_script_tars_a_hostile_directory(tmp_path: Path) -> None:
    """The tar holds the directory's contents as `./...` entries."""
    directory = tmp_path / HOSTILE_DIR
    directory.mkdir()
    (directory / "a file").write_text("x")
    result = run_sh(sh_command(archive_script(str(directory))), tmp_path)
    assert result.returncode == 0, result.stderr
    listing = subprocess.run(["tar", "-tf", "-"], input=result.stdout, capture_output=True, check=True)
    assert sorted(listing.stdout.decode().splitlines()) == ["./", "./a file"]


def test_git_commands_keep_urls_refs_and_paths_single_words() -> None:
    """A url or ref that looks like an option or a substitution stays one argument after `--`."""
    url, directory = "--upload-pack=touch pwned", "dir with space"
    assert clone_command(url, directory) == ("git", *REMOTE_GIT_OPTIONS, "clone", "--", url, directory)
    assert checkout_command("abc") == ("git", "checkout", "--quiet", "--detach", "abc", "--")
    words = shlex.split(resolve_ref_script("repo 'x'", "$(touch pwned)"))
    assert words[:3] == ["cd", "--", "repo 'x'"]
    assert words[-1] == "$(touch pwned)^{commit}"
    assert "--end-of-options" in words


def test_listening_ports_are_read_from_proc_net_tcp() -> None:
    """LISTEN (0A) entries of tcp and tcp6 count; established connections do not."""
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n"
        "   1: 0100007F:4E20 0100007F:9C40 01 00000000:00000000\n"
        "   0: 00000000000000000000000000000000:4E21 00000000000000000000000000000000:0000 0A 0\n"
    )
    assert listening_ports(text) == {8080, 20001}
    assert pick_free_port(set(range(20000, 32000)) - {25000}) == 25000
    with pytest.raises(RuntimeFailure, match="no free port"):
        pick_free_port(set(range(20000, 32000)))


# -- layout --------------------------------------------------------------------------------------


def test_layout_spells_every_remote_directory_under_one_root() -> None:
    """releases, run and workspaces sit under the root; remote_release_dir uses the default one."""
    layout = RemoteLayout("base/./root/")
    assert layout.root == "base/root"
    assert layout.release_dir("dep_1") == "base/root/releases/dep_1"
    assert layout.run_dir("dep_1") == "base/root/run/dep_1"
    assert layout.workspace_dir("dep_1") == "base/root/workspaces/dep_1"
    assert remote_release_dir("dep_1") == Path(".deploy-agent") / "releases" / "dep_1"


def test_layout_owns_only_paths_strictly_under_its_root() -> None:
    """The root itself, paths beside it and any `..` are not the agent's to delete."""
    layout = RemoteLayout(".deploy-agent")
    assert layout.owned_path(".deploy-agent/workspaces/x/") == ".deploy-agent/workspaces/x"
    for path in (".deploy-agent", ".deploy-agent/", ".deploy-agent-other/x", ".deploy-agent/a/../../x", "/etc"):
        assert layout.owned_path(path) is None, path
