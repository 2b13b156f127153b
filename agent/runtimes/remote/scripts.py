"""Every shell script the agent sends to a server, as pure functions returning strings.

Each interpolated value goes through `shlex.quote` (or is a number the function made itself), and
every script runs under /bin/sh whatever the login shell is. The readers of what the scripts print
(`listening_ports`, `read_state`) live here too, next to the scripts whose output they parse.
"""

from __future__ import annotations

import contextlib
import random
import re
import shlex
from typing import Mapping

from agent.errors import RuntimeFailure

Command = tuple[str, ...] | list[str] | str

MARKER = "__deploy_agent_started__"
GROUP_TAG_VARIABLE = "DEPLOY_AGENT_GROUP"
# As on the agent's host: never `ext::` (it runs a command), never follow submodules. Local paths
# stay allowed: on a server they name the login's own repositories.
REMOTE_GIT_OPTIONS = (
    "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never", "-c", "protocol.file.allow=always",
    "-c", "submodule.recurse=false",
)
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_PROTOCOL_FROM_USER": "0"}
# Ports handed to remote releases without a fixed one: below the usual ephemeral range (32768+),
# so that outgoing connections on the server do not take them meanwhile.
REMOTE_PORTS = range(20000, 32000)
LIST_PORTS_SCRIPT = "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true"
# Every supervisor of this login's releases and builds: `pid starttime run-dir-name` a line. The
# supervisor's argv is `/bin/sh -c SCRIPT deploy-agent-supervisor RUN_DIR COMMAND...`, and it leads
# its own group (setsid); the run dir's name is the deployment id (`<id>.build` for a build).
LIST_SUPERVISORS_SCRIPT = r"""
for d in /proc/[0-9]*; do
  [ -O "$d" ] || continue
  argv=$(tr '\0' '\n' < "$d/cmdline" 2>/dev/null) || continue
  run=$(printf '%s\n' "$argv" | sed -n '/^deploy-agent-supervisor$/{n;p;q;}')
  [ -n "$run" ] || continue
  { read -r s < "$d/stat"; } 2>/dev/null || continue
  s=${s##*) }
  IFS=' '
  set -- $s
  echo "${d#/proc/} ${20} ${run##*/}"
done
true
"""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Proves group $pid ours (its leader with start time $want, or a tagged live member once the
# leader is gone), then SIGTERM to the group, polls every 0.1 s up to $polls times, SIGKILL,
# and confirms. Prints one word: not-ours, gone, killed or survived. Only shell builtins in the
# polling loops; tr and grep only to read a member's tag when the leader has gone.
_KILL_SCRIPT = r"""
read_stat() {
  st_state=; st_pgrp=; st_start=
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  set -- $s
  st_state=$1; st_pgrp=$3; st_start=${20}
}
alive_members() {
  kill -s 0 -- "-$pid" 2>/dev/null || return 1
  for d in /proc/[0-9]*; do
    read_stat "${d#/proc/}" || continue
    [ "$st_pgrp" = "$pid" ] && [ "$st_state" != Z ] && return 0
  done
  return 1
}
tagged_member() {
  kill -s 0 -- "-$pid" 2>/dev/null || return 1
  for d in /proc/[0-9]*; do
    read_stat "${d#/proc/}" || continue
    [ "$st_pgrp" = "$pid" ] && [ "$st_state" != Z ] || continue
    tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qxF "$tag" && return 0
  done
  return 1
}
pause() { sleep 0.1 2>/dev/null || sleep 1; }
if read_stat "$pid"; then
  [ "$st_start" = "$want" ] || { echo not-ours; exit 0; }
else
  tagged_member || { echo gone; exit 0; }
fi
alive_members || { echo gone; exit 0; }
kill -s TERM -- "-$pid" 2>/dev/null
i=0
while [ "$i" -lt "$polls" ] && alive_members; do pause; i=$((i + 1)); done
if alive_members; then
  kill -s KILL -- "-$pid" 2>/dev/null
  i=0
  while [ "$i" -lt 50 ] && alive_members; do pause; i=$((i + 1)); done
fi
if alive_members; then echo survived; else echo killed; fi
"""

# Prints "running" while $pid is the process started at $want and not a zombie, else "gone" and
# the exit code its supervisor left in $run/exit_code, if any.
_STATE_SCRIPT = r"""
if { read -r s < "/proc/$pid/stat"; } 2>/dev/null; then
  s=${s##*) }
  set -- $s
  if [ "${20}" = "$want" ] && [ "$1" != Z ]; then echo running; exit 0; fi
fi
code=
[ -r "$run/exit_code" ] && read -r code < "$run/exit_code"
echo gone $code
"""

# Runs a release as its child and writes its exit code to $run/exit_code when it ends. It
# survives SIGTERM to the group (trap) just long enough to record how the command ended.
SUPERVISOR_SCRIPT = r"""
run=$1; shift
ticks=$(read -r s < "/proc/$$/stat"; s=${s##*) }; IFS=' '; set -- $s; echo "${20}")
DEPLOY_AGENT_GROUP="$$:$ticks"
export DEPLOY_AGENT_GROUP
echo "$$ $ticks" > "$run/started"
unset ticks
trap : TERM INT HUP
"$@" &
child=$!
while :; do
  wait "$child"; code=$?
  kill -0 "$child" 2>/dev/null || break
done
echo "$code" > "$run/exit_code.tmp" && mv -f "$run/exit_code.tmp" "$run/exit_code"
exit "$code"
"""


def sh_command(script: str) -> str:
    """The command line that runs `script` under /bin/sh, whatever the login shell is."""
    return f"exec /bin/sh -c {shlex.quote(script)}"


def launch_script(directory: str, env: Mapping[str, str], command: Command, *, create_dir: bool = False) -> str:
    """The remote command line: cd, env, report `MARKER pid starttime`, wait for "go", exec the command.

    Runs under /bin/sh whatever the login shell is; `exec` keeps the session leader's pid.
    """
    check_env(env)
    target = command_line(command)
    quoted_dir = shlex.quote(directory)
    lines = ["unset CDPATH"]
    if create_dir:
        lines.append(f"mkdir -p -- {quoted_dir} || exit")
    lines += [
        f"cd -- {quoted_dir} || exit",
        # Read before the command's env is exported: an IFS in it must not change the splitting.
        '{ read -r _da_stat < "/proc/$$/stat"; } || exit',
        '_da_stat=${_da_stat##*) }',
        "set -- $_da_stat",
        f'{GROUP_TAG_VARIABLE}="$$:${{20}}"',
        f"export {GROUP_TAG_VARIABLE}",
        f'_da_marker="{MARKER} $$ ${{20}}"',
        "unset _da_stat",
        "set --",
    ]
    lines += _export_lines(env)
    # The agent records the pid (on_start) before it lets the command run; EOF instead (the
    # agent gone) ends the shell before it ever runs the command.
    lines += ['echo "$_da_marker"', "unset _da_marker", "read -r _da_go || exit 125", "unset _da_go",
              f"exec {target}"]
    return sh_command("\n".join(lines))


def release_script(
    directory: str, env: Mapping[str, str], command: Command, run_dir: str, *, create_dir: bool = False
) -> str:
    """The remote command line of a release (or a build): on "go", start the supervisor detached, report `MARKER pid starttime`.

    `setsid` makes the supervisor a session and group leader of its own, and its output goes to
    files in `run_dir`: once the launching shell has exited, sshd holds nothing of the release
    (not even one of its few session slots), and the release outlives the connection.
    """
    check_env(env)
    target = command_line(command)
    run = shlex.quote(run_dir)
    lines = [
        "unset CDPATH",
        "command -v setsid >/dev/null 2>&1 || { echo 'setsid is not installed on the server' >&2; exit 127; }",
        # Prepared from the login's home, where relative run directories are meant.
        f"mkdir -p -- {run} || exit",
        f"rm -f -- {run}/exit_code {run}/started",
        f": > {run}/stdout && : > {run}/stderr || exit",
        f"_da_run=$(cd -- {run} && pwd) || exit",
        *([f"mkdir -p -- {shlex.quote(directory)} || exit"] if create_dir else []),
        f"cd -- {shlex.quote(directory)} || exit",
    ]
    lines += _export_lines(env)
    lines += [
        # "go" from the agent once the channel is open; EOF instead (the start cancelled while the
        # channel opened, the agent gone) ends the shell before anything detached is started.
        "read -r _da_go || exit 125",
        "unset _da_go",
        f'setsid /bin/sh -c {shlex.quote(SUPERVISOR_SCRIPT)} deploy-agent-supervisor "$_da_run" {target}'
        ' </dev/null >>"$_da_run/stdout" 2>>"$_da_run/stderr" &',
        "_da_pid=$!",
        "IFS=' '",
        # The supervisor writes `pid starttime` to $run/started once setsid has made it a group
        # leader, so a kill of group $pid right after the report finds the group. Not /proc here:
        # a release that ends at once may be reaped by this shell before its stat is read. The
        # file is one short write, so it is empty or whole. Builtins first, so the wait is short.
        "_da_tries=0",
        'while [ ! -s "$_da_run/started" ]; do',
        '  _da_state=gone',
        '  { read -r _da_stat < "/proc/$_da_pid/stat"; } 2>/dev/null && _da_state=${_da_stat##*) } && _da_state=${_da_state%% *}',
        '  if [ "$_da_state" = gone ] || [ "$_da_state" = Z ]; then',
        '    [ -s "$_da_run/started" ] && break',
        "    echo 'the release supervisor ended before it reported its start' >&2; exit 126",
        "  fi",
        "  _da_tries=$((_da_tries + 1))",
        '  [ "$_da_tries" -lt 20000 ] && continue',
        '  [ "$_da_tries" -lt 21000 ] || { echo \'the release supervisor did not report its start\' >&2; exit 126; }',
        "  sleep 0.01 2>/dev/null || sleep 1",
        "done",
        '{ read -r _da_started < "$_da_run/started"; } || exit 126',
        f'echo "{MARKER} $_da_started"',
    ]
    return sh_command("\n".join(lines))


def kill_script(pid: int, started_at: float, grace_s: float) -> str:
    """Stops group `pid` if it is still the one started at `started_at`; prints the verdict word."""
    polls = max(0, int(grace_s * 10 + 0.999))
    tag = f"{GROUP_TAG_VARIABLE}={int(pid)}:{int(started_at)}"
    return (
        f"pid={shlex.quote(str(int(pid)))}; want={shlex.quote(str(int(started_at)))}; "
        f"polls={shlex.quote(str(polls))}; tag={shlex.quote(tag)}\n{_KILL_SCRIPT}"
    )


def state_script(pid: int, started_at: float, run_dir: str) -> str:
    """Prints `running`, or `gone` and the exit code the release's supervisor left in `run_dir`."""
    return (
        f"pid={shlex.quote(str(int(pid)))}; want={shlex.quote(str(int(started_at)))}; "
        f"run={shlex.quote(run_dir)}\n{_STATE_SCRIPT}"
    )


def read_supervisors(output: str) -> list[tuple[int, float, str]]:
    """(pid, starttime, run dir name) of each line `LIST_SUPERVISORS_SCRIPT` printed."""
    found = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            found.append((int(parts[0]), float(parts[1]), parts[2]))
    return found


def read_state(output: str) -> tuple[str, int | None] | None:
    """(`running` or `gone`, exit code) from what `state_script` printed; None if it printed neither."""
    verdict = output.split()
    if not verdict or verdict[0] not in ("running", "gone"):
        return None
    code = int(verdict[1]) if len(verdict) > 1 and verdict[1].lstrip("-").isdigit() else None
    return verdict[0], code


def remove_script(path: str) -> str:
    """Deletes `path` and everything under it, read-only parts too."""
    quoted = shlex.quote(path)
    return f"chmod -R u+rwX -- {quoted} 2>/dev/null; rm -rf -- {quoted}"


def archive_script(directory: str) -> str:
    """Writes a tar of `directory`'s contents (entries `./...`) to stdout."""
    return f"cd -- {shlex.quote(directory)} && exec tar -cf - ."


def resolve_ref_script(repository: str, candidate: str) -> str:
    """Prints the commit `candidate` names in the git repository `repository`, if it names one."""
    return (
        f"cd -- {shlex.quote(repository)} && git rev-parse --verify --quiet --end-of-options "
        f"{shlex.quote(candidate + '^{commit}')}"
    )


def ref_candidates(ref: str) -> tuple[str, str]:
    """What a branch, tag or sha may name, branches first, as `git clone --branch` does."""
    return f"refs/remotes/origin/{ref}", ref


def clone_command(url: str, remote_dir: str) -> tuple[str, ...]:
    """`git clone` of `url` into `remote_dir`, with the options that keep it to fetching."""
    return ("git", *REMOTE_GIT_OPTIONS, "clone", "--", url, remote_dir)


def checkout_command(commit: str) -> tuple[str, ...]:
    """`git checkout` of `commit`, detached."""
    return ("git", "checkout", "--quiet", "--detach", commit, "--")


def check_env(env: Mapping[str, str]) -> None:
    """Refuses a variable name a POSIX shell cannot export."""
    for name in env:
        if not _ENV_NAME.match(name):
            raise RuntimeFailure(f"environment variable name {name!r} cannot be passed to a remote command")


def command_line(command: Command) -> str:
    """The shell words of a command: a string runs under /bin/sh -c, a sequence as its words."""
    if isinstance(command, str):
        if not command.strip():
            raise RuntimeFailure("empty command")
        return f"/bin/sh -c {shlex.quote(command)}"
    if not command:
        raise RuntimeFailure("empty command")
    return shlex.join(str(part) for part in command)


def display(command: Command) -> str:
    """A command as the log shows it."""
    return command if isinstance(command, str) else shlex.join(command)


def listening_ports(proc_net_tcp: str) -> set[int]:
    """The local ports in LISTEN state (0A) of /proc/net/tcp and tcp6 text."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            with contextlib.suppress(ValueError):
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def pick_free_port(taken: set[int]) -> int:
    """A random port of REMOTE_PORTS that is not in `taken`."""
    for port in random.sample(REMOTE_PORTS, 64):
        if port not in taken:
            return port
    free = [port for port in REMOTE_PORTS if port not in taken]
    if not free:
        raise RuntimeFailure(f"no free port between {REMOTE_PORTS.start} and {REMOTE_PORTS.stop - 1} on the server")
    return random.choice(free)


def _export_lines(env: Mapping[str, str]) -> list[str]:
    if not env:
        return []
    return ["export " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in env.items())]
