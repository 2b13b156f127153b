"""Release cgroups on this host's real cgroup v2: discovery, membership, kill, emptiness, removal, records."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import psutil
import pytest

from agent.logs import DeploymentLog
from agent.models import new_deployment_id
from agent.runtimes.base import ReleaseHandle, ReleaseSpec
from agent.runtimes.cgroups import (
    ReleaseCgroups,
    agent_label,
    discover_base,
    find_v2_mount,
    own_cgroup,
    process_isolation,
    recorded_cgroup,
    v2_mount,
)
from agent.runtimes.process import ProcessRuntime

DEADLINE_S = 10.0
# Forks twice with a setsid in between, as a daemon does, and writes the grandchild's pid to a file.
DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1] + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(1000)
    os._exit(0)
os.wait()
"""

needs_cgroups = pytest.mark.skipif(
    discover_base() is None, reason="needs a writable cgroup v2 hierarchy (root, or a delegated cgroup)"
)


def wait_until(predicate: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """No such process any more (a zombie awaiting its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pid(path: Path) -> int:
    return int(wait_until(lambda: path.exists() and path.read_text(), f"{path.name} to be written"))  # type: ignore[arg-type]


@pytest.fixture
def cgroups() -> Iterator[ReleaseCgroups]:
    """A parent cgroup of the test's own under the discovered base; everything in it is killed at the end."""
    base = discover_base()
    assert base is not None
    parent = ReleaseCgroups(base / f"agent-test-{uuid.uuid4().hex[:12]}")
    yield parent
    for deployment_id in parent.deployment_ids():
        parent.of(deployment_id).destroy(DEADLINE_S)
    parent.tidy()


# -- discovery (no cgroup needed) ----------------------------------------------------------------


def test_the_v2_mount_is_read_from_mountinfo_not_assumed(tmp_path: Path) -> None:
    """find_v2_mount picks the cgroup2 line of a mountinfo (an escaped space included), ignoring v1 mounts."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "41 31 0:38 / /my\\040cgroups rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert find_v2_mount(mountinfo) == Path("/my cgroups")
    mountinfo.write_text("32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")
    assert find_v2_mount(mountinfo) is None
    assert find_v2_mount(tmp_path / "missing") is None


def test_own_cgroup_is_the_unified_line_of_proc_self_cgroup(tmp_path: Path) -> None:
    """own_cgroup joins the `0::` path to the mount; v1 lines are ignored."""
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/elsewhere\n0::/system.slice/deploy-agent.service\n")
    assert own_cgroup(Path("/cg"), proc) == Path("/cg/system.slice/deploy-agent.service")
    proc.write_text("0::/\n")
    assert own_cgroup(Path("/cg"), proc) == Path("/cg")


def test_agents_with_different_state_get_different_labels(tmp_path: Path) -> None:
    """Two run dirs never share a cgroup parent; the same run dir always gets the same one."""
    assert agent_label(tmp_path / "a") != agent_label(tmp_path / "b")
    assert agent_label(tmp_path / "a") == agent_label(tmp_path / "x" / ".." / "a")


# -- a real cgroup -------------------------------------------------------------------------------


@needs_cgroups
def test_discovery_finds_this_hosts_v2_mount_and_reports_cgroup() -> None:
    """On this host the base is a writable directory of the cgroup2 hierarchy named in mountinfo."""
    mount = v2_mount()
    base = discover_base()
    assert mount is not None and base is not None
    assert base == mount or mount in base.parents
    assert (base / "cgroup.procs").exists()
    assert process_isolation() == "cgroup"


@needs_cgroups
def test_create_move_kill_verify_empty_and_remove(cgroups: ReleaseCgroups, tmp_path: Path) -> None:
    """A process moved in takes its setsid'd double-fork grandchild along; cgroup.kill ends both; rmdir works."""
    cgroup = cgroups.of(new_deployment_id())
    cgroup.create()
    pid_file = tmp_path / "escaped.pid"
    script = tmp_path / "fork.py"
    script.write_text(DOUBLE_FORK)
    # Stopped until it is in the cgroup, so that its children are born inside.
    parent = subprocess.Popen(
        ["sh", "-c", f'kill -STOP $$; "{sys.executable}" {script} {pid_file}; exec sleep 300'],
        start_new_session=True,
    )
    try:
        wait_until(lambda: psutil.Process(parent.pid).status() == psutil.STATUS_STOPPED, "the shell to stop")
        cgroup.add(parent.pid)
        os.kill(parent.pid, signal.SIGCONT)
        escaped = read_pid(pid_file)
        assert os.getsid(escaped) != os.getsid(parent.pid)
        assert cgroup.holds(escaped) and cgroup.holds(parent.pid)
        assert set(cgroup.pids()) >= {escaped, parent.pid}
        assert cgroup.populated()

        cgroup.kill()
        assert cgroup.wait_empty(DEADLINE_S)
        parent.wait(timeout=DEADLINE_S)
        assert wait_until(lambda: gone(escaped), "the escaped grandchild to die")
        assert cgroup.pids() == [] and not cgroup.populated()
        cgroup.remove()
        assert not cgroup.path.exists()
        cgroup.remove()  # gone already: no error
    finally:
        parent.kill()
        parent.wait()


@needs_cgroups
def test_without_cgroup_kill_every_member_gets_sigkill(cgroups: ReleaseCgroups) -> None:
    """The fallback for kernels without cgroup.kill: SIGKILL to each pid in cgroup.procs empties it."""
    cgroup = cgroups.of(new_deployment_id())
    cgroup.create()
    sleeps = [subprocess.Popen(["sleep", "300"], start_new_session=True) for _ in range(2)]
    try:
        for sleep in sleeps:
            cgroup.add(sleep.pid)
        cgroup.signal_members(signal.SIGKILL)
        assert all(sleep.wait(timeout=DEADLINE_S) == -signal.SIGKILL for sleep in sleeps)
        assert cgroup.wait_empty(DEADLINE_S)
    finally:
        for sleep in sleeps:
            sleep.kill()
            sleep.wait()


@needs_cgroups
def test_destroy_of_a_missing_cgroup_is_a_no_op(cgroups: ReleaseCgroups) -> None:
    """Ending a cgroup that is not there does nothing and raises nothing."""
    cgroup = cgroups.of(new_deployment_id())
    cgroup.destroy(1.0)
    assert not cgroup.exists() and cgroup.pids() == [] and not cgroup.populated()


def test_a_record_must_name_a_cgroup_of_this_deployment(tmp_path: Path) -> None:
    """A record naming another deployment's directory, a relative path or a path off the hierarchy is ignored."""
    deployment_id = new_deployment_id()
    record = tmp_path / "cgroup"
    assert recorded_cgroup(record, deployment_id) is None  # no record: a process-group release
    mount = v2_mount() or Path("/sys/fs/cgroup")
    for text in (
        f"relative/{deployment_id}", f"{tmp_path}/{deployment_id}", f"{mount}/agent-x/other", f"{mount}/{deployment_id}",
    ):
        record.write_text(text + "\n")
        assert recorded_cgroup(record, deployment_id) is None, text


# -- the process runtime with cgroups ------------------------------------------------------------


class Started:
    """One release started by a runtime, with the file its escaped grandchild's pid goes to."""

    def __init__(self, handle: ReleaseHandle, escaped_pid_file: Path) -> None:
        self.handle = handle
        self.escaped_pid_file = escaped_pid_file


@pytest.fixture
async def runtime(tmp_path: Path, cgroups: ReleaseCgroups) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(tmp_path / "run", kill_grace_s=1.0, cgroups=cgroups)
    yield runtime
    for deployment_id in cgroups.deployment_ids():
        cgroups.of(deployment_id).destroy(DEADLINE_S)


async def start_escaping_release(runtime: ProcessRuntime, tmp_path: Path) -> Started:
    """A release whose command double-forks a setsid'd sleep and then sleeps itself."""
    workdir = tmp_path / "workdir"
    workdir.mkdir(exist_ok=True)
    (workdir / "fork.py").write_text(DOUBLE_FORK)
    deployment_id = new_deployment_id()
    pid_file = workdir / f"{deployment_id}.pid"
    spec = ReleaseSpec(
        deployment_id=deployment_id, application="web", runtime="process",
        command=f'"{sys.executable}" fork.py {pid_file.name}; exec sleep 300', env={},
        log_path=tmp_path / f"{deployment_id}.log", workdir=workdir,
    )
    with DeploymentLog(spec.log_path) as log:
        handle = await runtime.start_release(spec, log)
    return Started(handle, pid_file)


@needs_cgroups
async def test_stop_kills_what_escaped_a_dead_supervisor(
    runtime: ProcessRuntime, cgroups: ReleaseCgroups, tmp_path: Path
) -> None:
    """With its supervisor SIGKILLed the escaped grandchild is nobody's descendant; stop still ends it via the cgroup."""
    started = await start_escaping_release(runtime, tmp_path)
    handle = started.handle
    escaped = await asyncio.to_thread(read_pid, started.escaped_pid_file)
    cgroup = cgroups.of(handle.deployment_id)
    assert cgroup.holds(escaped) and cgroup.holds(handle.pid or 0)
    assert (runtime.files(handle.deployment_id).cgroup.read_text().strip()) == str(cgroup.path)
    assert await runtime.isolation() == "cgroup"

    assert handle.process_group is not None
    os.kill(handle.process_group, signal.SIGKILL)
    await asyncio.to_thread(wait_until, lambda: gone(handle.process_group or 0), "the supervisor to die")
    assert psutil.Process(escaped).ppid() != handle.process_group

    # A fresh runtime, as after an agent restart: it finds the cgroup from the release's record.
    restarted = ProcessRuntime(runtime.run_dir, kill_grace_s=1.0, cgroups=cgroups)
    await restarted.stop_release(handle, grace_s=1.0)

    assert gone(escaped) and gone(handle.pid or 0)
    assert not cgroup.path.exists()
    assert not runtime.files(handle.deployment_id).cgroup.exists()
    assert not (await restarted.release_state(handle)).running


@needs_cgroups
async def test_remove_release_leaves_no_cgroup_behind(
    runtime: ProcessRuntime, cgroups: ReleaseCgroups, tmp_path: Path
) -> None:
    """remove_release ends the tree, empties and removes the cgroup, and tidies the agent's parent away."""
    started = await start_escaping_release(runtime, tmp_path)
    escaped = await asyncio.to_thread(read_pid, started.escaped_pid_file)
    await runtime.remove_release(started.handle, grace_s=1.0)
    assert gone(escaped)
    assert cgroups.deployment_ids() == []
    assert not cgroups.parent.exists()


@needs_cgroups
async def test_the_sweep_removes_only_cgroups_of_untracked_releases(
    runtime: ProcessRuntime, cgroups: ReleaseCgroups, tmp_path: Path
) -> None:
    """remove_stray_cgroups kills and removes the cgroups not in `keep` and leaves the tracked release running."""
    tracked = await start_escaping_release(runtime, tmp_path)
    stray = await start_escaping_release(runtime, tmp_path)
    tracked_escaped = await asyncio.to_thread(read_pid, tracked.escaped_pid_file)
    stray_escaped = await asyncio.to_thread(read_pid, stray.escaped_pid_file)

    removed = await runtime.remove_stray_cgroups({tracked.handle.deployment_id})

    assert removed == 1
    assert cgroups.deployment_ids() == [tracked.handle.deployment_id]
    await asyncio.to_thread(wait_until, lambda: gone(stray_escaped), "the stray release's processes to die")
    assert not gone(tracked_escaped) and (await runtime.release_state(tracked.handle)).running
    await runtime.stop_release(tracked.handle, grace_s=1.0)
    assert gone(tracked_escaped)


async def test_without_cgroups_the_release_keeps_to_its_process_group(tmp_path: Path) -> None:
    """cgroups=None: no record is written, the isolation is process_group, and stop still works."""
    runtime = ProcessRuntime(tmp_path / "run", kill_grace_s=1.0, cgroups=None)
    started = await start_escaping_release(runtime, tmp_path)
    escaped = await asyncio.to_thread(read_pid, started.escaped_pid_file)
    assert await runtime.isolation() == "process_group"
    assert not runtime.files(started.handle.deployment_id).cgroup.exists()
    await runtime.remove_release(started.handle, grace_s=1.0)
    # The supervisor is the subreaper of the orphaned grandchild, so the tree still reaches it.
    assert gone(escaped)


async def test_a_parent_that_is_no_cgroup_falls_back_to_the_process_group(tmp_path: Path) -> None:
    """A cgroup that cannot be made: the release still starts, says why in its log, and records no cgroup."""
    runtime = ProcessRuntime(tmp_path / "run", kill_grace_s=1.0, cgroups=ReleaseCgroups(tmp_path / "not-a-cgroup"))
    started = await start_escaping_release(runtime, tmp_path)
    escaped = await asyncio.to_thread(read_pid, started.escaped_pid_file)
    try:
        assert not runtime.files(started.handle.deployment_id).cgroup.exists()
        log = (tmp_path / f"{started.handle.deployment_id}.log").read_text()
        assert "is not on a cgroup2 hierarchy; the release is kept together by its process group only" in log
        assert (await runtime.release_state(started.handle)).running
    finally:
        await runtime.remove_release(started.handle, grace_s=1.0)
    assert gone(escaped)


@needs_cgroups
async def test_a_release_that_ends_by_itself_leaves_no_cgroup(
    runtime: ProcessRuntime, cgroups: ReleaseCgroups, tmp_path: Path
) -> None:
    """Once its command exited and its tree is gone, the supervisor removes the release's cgroup itself."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    spec = ReleaseSpec(
        deployment_id=new_deployment_id(), application="web", runtime="process", command="sleep 0.3; exit 3",
        env={}, log_path=tmp_path / "ends.log", workdir=workdir,
    )
    with DeploymentLog(spec.log_path) as log:
        handle = await runtime.start_release(spec, log)
    cgroup = cgroups.of(handle.deployment_id)
    assert cgroup.exists()
    await asyncio.to_thread(wait_until, lambda: not cgroup.path.exists(), "the cgroup to be removed")
    state = await runtime.release_state(handle)
    assert not state.running and state.exit_code == 3
    await runtime.stop_release(handle, grace_s=1.0)  # nothing left to do, and no error
