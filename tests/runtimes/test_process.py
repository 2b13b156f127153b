"""The process runtime with real host processes: start, output, detachment, stop, exit codes, PID reuse."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import psutil
import pytest

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog, LogPolicy
from agent.models import new_deployment_id
from agent.runtimes.base import ReleaseHandle, ReleaseSpec
from agent.runtimes.process import ProcessRuntime

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KILL_GRACE_S = 1.0
DEADLINE_S = 10.0
T = TypeVar("T")

# Plays the agent: starts a release, prints its handle, then waits to be SIGKILLed.
AGENT_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from agent.logs import DeploymentLog
from agent.runtimes.base import ReleaseSpec
from agent.runtimes.process import ProcessRuntime

async def main():
    run_dir, log_path, workdir, port, deployment_id, command = sys.argv[1:]
    spec = ReleaseSpec(
        deployment_id=deployment_id, application="web", runtime="process", command=command, env={},
        log_path=Path(log_path), ports=(int(port),), workdir=Path(workdir),
    )
    with DeploymentLog(Path(log_path)) as log:
        handle = await ProcessRuntime(Path(run_dir)).start_release(spec, log)
    print(json.dumps(handle.to_dict()), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class Releases:
    """Starts releases for a test and removes every one of them afterwards."""

    def __init__(self, runtime: ProcessRuntime, root: Path) -> None:
        self.runtime = runtime
        self.root = root
        self.handles: list[ReleaseHandle] = []
        self.log_path = root / "deployment.log"
        self.workdir = root / "workdir"
        self.workdir.mkdir()
        self.log = DeploymentLog(self.log_path)

    def use_policy(self, policy: LogPolicy) -> None:
        """Releases started from now on write their log under `policy`, as the engine's would."""
        self.log.close()
        self.log = DeploymentLog(self.log_path, policy)

    def spec(self, command: tuple[str, ...] | str, ports: tuple[int, ...] = (), **env: str) -> ReleaseSpec:
        return ReleaseSpec(
            deployment_id=new_deployment_id(),
            application="web",
            runtime="process",
            command=command,
            env=env,
            log_path=self.log_path,
            ports=ports,
            workdir=self.workdir,
        )

    async def start(self, command: tuple[str, ...] | str, ports: tuple[int, ...] = (), **env: str) -> ReleaseHandle:
        handle = await self.runtime.start_release(self.spec(command, ports, **env), self.log)
        self.handles.append(handle)
        return handle

    def log_lines(self) -> list[tuple[str, str, str]]:
        """(stage, stream, text) of every line in the log."""
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8").splitlines():
            head, _, text = raw.partition(" | ")
            _, stage, stream = head.split(" ")
            lines.append((stage, stream, text))
        return lines


@pytest.fixture
def runtime(tmp_path: Path) -> ProcessRuntime:
    """A runtime whose files live under the test's tmp dir, with a short kill grace."""
    return ProcessRuntime(tmp_path / "run", kill_grace_s=KILL_GRACE_S)


@pytest.fixture
async def releases(runtime: ProcessRuntime, tmp_path: Path) -> AsyncIterator[Releases]:
    """Every release a test starts is removed at teardown, whatever the test did."""
    releases = Releases(runtime, tmp_path)
    yield releases
    for handle in releases.handles:
        await runtime.remove_release(handle, KILL_GRACE_S)
    releases.log.close()


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unrelated_sleep() -> Iterator[subprocess.Popen[bytes]]:
    """A process the runtime never started, killed by the test itself."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = DEADLINE_S) -> T:
    """Polls `check` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def tree_of(handle: ReleaseHandle) -> list[psutil.Process]:
    """The supervisor and all its live descendants."""
    assert handle.process_group is not None
    supervisor = psutil.Process(handle.process_group)
    return [supervisor, *[p for p in supervisor.children(recursive=True) if alive(p)]]


def sleeps_in(handle: ReleaseHandle) -> list[psutil.Process]:
    result = []
    for process in tree_of(handle):
        try:
            if process.name() == "sleep":
                result.append(process)
        except psutil.Error:
            pass
    return result


async def test_httpd_release_serves_files_from_its_workdir(releases: Releases, free_port: int) -> None:
    """A busybox httpd release answers on PORT with a file from its working directory."""
    (releases.workdir / "index.html").write_text("hello from the workdir\n")
    handle = await releases.start("exec busybox httpd -f -p $PORT -h .", ports=(free_port,))

    assert handle.runtime == "process" and handle.host == "127.0.0.1"
    assert handle.ports == {free_port: free_port}
    body = await eventually(
        lambda: asyncio.to_thread(http_get, f"http://127.0.0.1:{free_port}/index.html"), "httpd to answer"
    )
    assert body == b"hello from the workdir\n"


async def test_output_goes_to_the_log_with_stage_and_stream(releases: Releases) -> None:
    """Stdout and stderr lines land in the deployment log as `release stdout|stderr | text`."""
    handle = await releases.start("echo out; echo err >&2; exec sleep 60")

    async def both_lines() -> bool:
        lines = releases.log_lines()
        return ("release", "stdout", "out") in lines and ("release", "stderr", "err") in lines

    await eventually(both_lines, "both output lines")
    raw = releases.log_path.read_text(encoding="utf-8")
    assert re.search(r"^\S+Z release stdout \| out$", raw, re.MULTILINE)
    assert ("release", "agent", f"started process {handle.pid}: echo out; echo err >&2; exec sleep 60") in (
        releases.log_lines()
    )


async def test_handle_names_the_command_in_its_own_session(runtime: ProcessRuntime, releases: Releases) -> None:
    """The handle's pid is the command's, with its create time, in a session and group of its own."""
    handle = await releases.start(("sleep", "60"))

    assert handle.pid is not None and handle.process_group is not None
    command = psutil.Process(handle.pid)
    assert command.cmdline() == ["sleep", "60"]
    assert handle.pid_started_at == pytest.approx(command.create_time(), abs=0.01)
    assert os.getsid(handle.pid) != os.getsid(0)
    assert os.getsid(handle.pid) == handle.process_group == os.getpgid(handle.pid)
    assert command.ppid() == handle.process_group
    state = await runtime.release_state(handle)
    assert state.running and state.pid == handle.pid and state.restart_count == 0
    assert await runtime.adopt(handle)


async def test_release_outlives_the_agent_that_started_it(
    runtime: ProcessRuntime, releases: Releases, tmp_path: Path, free_port: int
) -> None:
    """After its agent is SIGKILLed the release still serves, still logs, and can be stopped by handle."""
    (releases.workdir / "index.html").write_text("still here\n")
    command = "busybox httpd -f -p $PORT -h . & while true; do echo tick; sleep 0.1; done"
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_SCRIPT, str(runtime.run_dir), str(releases.log_path), str(releases.workdir),
        str(free_port), new_deployment_id(), command,
        cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(agent.stdout.readline(), DEADLINE_S)  # type: ignore[union-attr]
        handle = ReleaseHandle.from_dict(json.loads(line))
        releases.handles.append(handle)
    finally:
        agent.kill()
        await agent.wait()

    assert handle.process_group is not None
    await eventually(
        lambda: asyncio.to_thread(lambda: psutil.Process(handle.process_group).ppid() != agent.pid),
        "the supervisor to be re-parented",
    )
    assert await runtime.adopt(handle)
    body = await eventually(
        lambda: asyncio.to_thread(http_get, f"http://127.0.0.1:{free_port}/index.html"), "httpd to answer"
    )
    assert body == b"still here\n"
    ticks_at_death = releases.log_lines().count(("release", "stdout", "tick"))
    await eventually(
        lambda: asyncio.to_thread(lambda: releases.log_lines().count(("release", "stdout", "tick")) > ticks_at_death + 3),
        "more output after the agent died",
    )

    await runtime.stop_release(handle, KILL_GRACE_S)
    assert not (await runtime.release_state(handle)).running
    assert await asyncio.to_thread(http_get, f"http://127.0.0.1:{free_port}/index.html") is None


async def test_stop_ends_grandchildren_and_escaped_sessions(runtime: ProcessRuntime, releases: Releases) -> None:
    """stop_release ends background children, a setsid child and an orphaned setsid grandchild with SIGTERM."""
    handle = await releases.start(
        "sleep 300 & sleep 300 & busybox setsid sleep 300 & (busybox setsid sleep 300 &); wait"
    )

    def escaped(process: psutil.Process) -> bool:
        return os.getsid(process.pid) != handle.process_group

    async def four_sleeps() -> list[psutil.Process] | None:
        sleeps = await asyncio.to_thread(sleeps_in, handle)
        return sleeps if len(sleeps) == 4 and sum(escaped(p) for p in sleeps) == 2 else None

    sleeps = await eventually(four_sleeps, "four sleeps, two in sessions of their own")
    tree = await asyncio.to_thread(tree_of, handle)

    started = time.monotonic()
    await runtime.stop_release(handle, grace_s=5.0)

    assert time.monotonic() - started < 5.0, "SIGTERM alone should have been enough"
    assert not [p.pid for p in [*tree, *sleeps] if alive(p)]
    state = await runtime.release_state(handle)
    assert not state.running and state.exit_code == -signal.SIGTERM


async def test_stop_kills_what_ignores_sigterm_after_the_grace(runtime: ProcessRuntime, releases: Releases) -> None:
    """A tree that ignores SIGTERM gets SIGKILL once the grace period is over."""
    handle = await releases.start("trap '' TERM; sleep 300; echo survived")
    await eventually(lambda: asyncio.to_thread(lambda: len(sleeps_in(handle)) == 1), "the sleep")
    tree = await asyncio.to_thread(tree_of, handle)

    started = time.monotonic()
    await runtime.stop_release(handle, grace_s=0.5)
    elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 5.0
    assert not [p.pid for p in tree if alive(p)]
    state = await runtime.release_state(handle)
    assert not state.running and state.exit_code == -signal.SIGKILL
    assert ("release", "stdout", "survived") not in releases.log_lines()


async def test_exit_code_of_a_command_that_ended(runtime: ProcessRuntime, releases: Releases) -> None:
    """release_state reports a command that exited 7 as not running with exit code 7."""
    handle = await releases.start("exit 7")

    async def ended() -> bool:
        return not (await runtime.release_state(handle)).running

    await eventually(ended, "the command to end")
    state = await runtime.release_state(handle)
    assert state.exit_code == 7 and state.pid is None
    assert not await runtime.adopt(handle)


async def test_a_reused_pid_is_never_signalled(
    runtime: ProcessRuntime, releases: Releases, unrelated_sleep: subprocess.Popen[bytes]
) -> None:
    """A handle whose create time does not match its pid is not running, and stopping it signals nothing."""
    real = psutil.Process(unrelated_sleep.pid)
    forged = ReleaseHandle(
        runtime="process",
        deployment_id=new_deployment_id(),
        application="web",
        host="127.0.0.1",
        pid=unrelated_sleep.pid,
        pid_started_at=real.create_time() - 100.0,
        process_group=unrelated_sleep.pid,
    )

    state = await runtime.release_state(forged)
    assert not state.running and state.exit_code is None
    assert not await runtime.adopt(forged)
    await runtime.stop_release(forged, grace_s=0.1)
    await runtime.remove_release(forged, grace_s=0.1)

    with pytest.raises(subprocess.TimeoutExpired):
        unrelated_sleep.wait(timeout=0.3)
    assert alive(real)


async def test_last_output_returns_the_last_output_lines(runtime: ProcessRuntime, releases: Releases) -> None:
    """last_output gives the text of the last release output lines, skipping the agent's own lines."""
    handle = await releases.start("for i in 1 2 3 4 5 6; do echo line$i; done")

    async def ended() -> bool:
        return not (await runtime.release_state(handle)).running

    await eventually(ended, "the command to end")
    await eventually(
        lambda: asyncio.to_thread(lambda: ("release", "stdout", "line6") in releases.log_lines()), "the last line"
    )
    releases.log.agent("release", "a line of the agent, not of the release")

    assert await runtime.last_output(handle, 3) == ["line4", "line5", "line6"]
    assert (await runtime.last_output(handle, 100))[0] == "line1"


async def test_resume_starts_the_command_again(runtime: ProcessRuntime, releases: Releases) -> None:
    """resume_release after a stop starts a new process and returns its handle."""
    spec = releases.spec(("sleep", "60"))
    handle = await runtime.start_release(spec, releases.log)
    releases.handles.append(handle)
    await runtime.stop_release(handle, KILL_GRACE_S)

    resumed = await runtime.resume_release(handle, spec, releases.log)
    releases.handles.append(resumed)

    assert resumed.pid != handle.pid
    assert (await runtime.release_state(resumed)).running
    assert not (await runtime.release_state(handle)).running


async def test_remove_deletes_runtime_files_and_repeats_harmlessly(runtime: ProcessRuntime, releases: Releases) -> None:
    """remove_release stops the release, deletes its run directory, and is a no-op the second time."""
    handle = await releases.start(("sleep", "60"))
    directory = runtime.files(handle.deployment_id).directory
    assert (directory / "pid").is_file()

    await runtime.remove_release(handle, KILL_GRACE_S)
    await runtime.remove_release(handle, KILL_GRACE_S)

    assert not directory.exists()
    assert not (await runtime.release_state(handle)).running


async def test_a_command_that_cannot_start_fails_with_127(releases: Releases) -> None:
    """A missing executable raises RuntimeFailure with exit code 127 and the reason."""
    with pytest.raises(RuntimeFailure) as failure:
        await releases.start(("/nonexistent/server",))

    assert failure.value.exit_code == 127
    assert "/nonexistent/server" in failure.value.message


async def test_environment_is_filtered_to_path_lang_port_and_the_spec(releases: Releases, free_port: int) -> None:
    """The command sees PATH, LANG, PORT and its spec's env, nothing else of the agent's environment."""
    os.environ["DEPLOY_AGENT_TEST_SECRET"] = "agent-only"
    try:
        handle = await releases.start("env; exec sleep 60", ports=(free_port,), GREETING="hello")
    finally:
        del os.environ["DEPLOY_AGENT_TEST_SECRET"]

    async def printed() -> list[str] | None:
        lines = [text for stage, stream, text in releases.log_lines() if (stage, stream) == ("release", "stdout")]
        return lines if "GREETING=hello" in lines else None

    env_lines = await eventually(printed, "the environment")
    names = {line.partition("=")[0] for line in env_lines}
    assert f"PORT={free_port}" in env_lines
    assert not any(name.startswith("DEPLOY_AGENT") or name.startswith("PYTHON") for name in names)
    assert handle.pid is not None


async def test_the_supervisor_masks_secrets_it_gets_on_stdin(runtime: ProcessRuntime, releases: Releases) -> None:
    """The release's output shows *** for each secret of the log's policy; no argument of the supervisor holds one."""
    secret = "s3cr3t-token-value-42"
    releases.use_policy(LogPolicy(secrets=(secret,)))
    handle = await releases.start('echo "token=$TOKEN"; echo "$TOKEN" >&2; exec sleep 60', TOKEN=secret)

    async def masked() -> bool:
        lines = releases.log_lines()
        return ("release", "stdout", "token=***") in lines and ("release", "stderr", "***") in lines

    await eventually(masked, "the masked output lines")
    assert secret not in releases.log_path.read_text(encoding="utf-8")
    assert handle.process_group is not None
    supervisor = psutil.Process(handle.process_group)
    assert not any(secret in argument for argument in supervisor.cmdline())
    assert not any(secret in value for value in supervisor.environ().values())


async def test_the_supervisor_caps_the_log_and_notes_what_it_dropped(
    runtime: ProcessRuntime, releases: Releases
) -> None:
    """Past --max-log-bytes the supervisor only counts; it notes the count once, when the command has ended."""
    cap = 4096
    releases.use_policy(LogPolicy(max_bytes=cap))
    handle = await releases.start("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i + 1)); done")

    async def noted() -> str | None:
        lines = releases.log_path.read_text(encoding="utf-8").splitlines()
        return lines[-1] if lines and "bytes of output dropped" in lines[-1] else None

    note = await eventually(noted, "the dropped-bytes line")
    assert f"agent.max_log_bytes ({cap} bytes)" in note
    assert len(releases.log_path.read_bytes()) - len(note) - 1 <= cap
    assert (await runtime.release_state(handle)).exit_code == 0
