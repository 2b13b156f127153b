"""A host release's processes, proven before they are signalled, and how they are stopped.

A process is ours only when its identity is proven: the command by its create time, the
supervisor by its command line, others by being in the proven tree, group or session, or in the
release's own cgroup (see agent.runtimes.process and agent.runtimes.cgroups). Stopping sends
SIGTERM to the whole tree, waits, then SIGKILLs (the cgroup at once, with `cgroup.kill`).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import psutil

from agent.runtimes.cgroups import Cgroup

# psutil derives create times from clock ticks since boot; two readings agree far closer than this.
CREATE_TIME_TOLERANCE_S = 0.01
# How often stop_release looks whether signalled processes are gone.
GONE_POLL_S = 0.05


@dataclass(frozen=True)
class ProcessTree:
    """The proven roots of a release: its supervisor, its command, the group/session they lead, its cgroup."""

    supervisor: psutil.Process | None
    command: psutil.Process | None
    group: int | None
    # Everything in it is the release's, wherever it moved in the process tree.
    cgroup: Cgroup | None = None


def is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def proven_process(pid: int | None, started_at: float | None) -> psutil.Process | None:
    """The process `pid` if it is the one started at `started_at` (not a reuse of its pid)."""
    if pid is None or started_at is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started_at) > CREATE_TIME_TOLERANCE_S:
            return None
        return process
    except psutil.Error:
        return None


def is_running(pid: int | None, started_at: float | None) -> bool:
    process = proven_process(pid, started_at)
    return process is not None and is_alive(process)


class ProvenLiveness:
    """Whether a process proven once by its start time still runs, asked often and cheaply.

    After the proof (a few /proc reads) it holds a pidfd, which becomes readable when that
    process ends: each later question is one poll of it, and a later process with the same pid
    can never answer for it. Where pidfds are refused (an old kernel, a syscall filter), each
    question is the full proof again. Thread-safe.
    """

    def __init__(self, pid: int, started_at: float) -> None:
        self.pid, self.started_at = pid, started_at
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ended = False

    def running(self) -> bool:
        with self._lock:
            if self._ended:
                return False
            if self._fd is None:
                return self._prove()
            readable, _, _ = select.select([self._fd], [], [], 0)
            if readable:
                self._end()
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _prove(self) -> bool:
        try:
            # Opened before the proof: if the proof holds, the pidfd is of the proven process.
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._ended = True
            return False
        except OSError:
            return is_running(self.pid, self.started_at)
        if not is_running(self.pid, self.started_at):
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _end(self) -> None:
        self._ended = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _group_still_ours(tree: ProcessTree, known: dict[int, psutil.Process]) -> bool:
    """The group id cannot have been reused while a proven process still belongs to it."""
    if tree.group is None:
        return False
    witnesses = [tree.supervisor, tree.command, *known.values()]
    for process in witnesses:
        if process is None or not is_alive(process):
            continue
        try:
            if os.getpgid(process.pid) == tree.group or os.getsid(process.pid) == tree.group:
                return True
        except OSError:
            continue
    return False


def collect(tree: ProcessTree, known: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    """Every live process of the release: the roots, their descendants, its group and session."""
    found: dict[int, psutil.Process] = {}
    roots = [tree.supervisor, tree.command, *known.values()]
    for root in roots:
        if root is None or not is_alive(root):
            continue
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    if _group_still_ours(tree, known):
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == tree.group or os.getsid(process.pid) == tree.group:
                    found.setdefault(process.pid, process)
            except OSError:
                continue
    if tree.cgroup is not None:
        found.update({process.pid: process for process in cgroup_members(tree.cgroup) if process.pid not in found})
    return {pid: process for pid, process in found.items() if is_alive(process) and pid != os.getpid()}


def cgroup_members(cgroup: Cgroup) -> list[psutil.Process]:
    """The members of `cgroup`, each checked again once psutil pinned its create time."""
    members = []
    for pid in cgroup.pids():
        try:
            process = psutil.Process(pid)
        except psutil.Error:
            continue
        if cgroup.holds(pid):
            members.append(process)
    return members


def _in_group(process: psutil.Process, group: int | None) -> bool:
    try:
        return group is not None and os.getpgid(process.pid) == group
    except OSError:
        return False


def terminate(tree: ProcessTree, processes: dict[int, psutil.Process], stopping: Path) -> None:
    """SIGTERM to the group (while it is provably ours) and to members that left it; marks `stopping` first."""
    try:
        stopping.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        stopping.touch()
    except OSError:
        pass  # the command may get SIGTERM twice; that is all
    if _group_still_ours(tree, processes):
        assert tree.group is not None
        killpg(tree.group, signal.SIGTERM)
    for process in processes.values():
        if not _in_group(process, tree.group):
            _send(process, signal.SIGTERM)


def kill_except_supervisor(tree: ProcessTree, processes: dict[int, psutil.Process]) -> None:
    """SIGKILL to all but the supervisor, so that it can still record the command's exit."""
    supervisor_pid = tree.supervisor.pid if tree.supervisor is not None else None
    for process in processes.values():
        if process.pid != supervisor_pid:
            _send(process, signal.SIGKILL)


def kill_all(tree: ProcessTree, processes: dict[int, psutil.Process]) -> None:
    if tree.cgroup is not None:
        tree.cgroup.kill()
    if _group_still_ours(tree, processes):
        assert tree.group is not None
        killpg(tree.group, signal.SIGKILL)
    for process in processes.values():
        _send(process, signal.SIGKILL)


def _send(process: psutil.Process, signum: int) -> None:
    # psutil refuses to signal a process whose pid now belongs to another (create time differs).
    try:
        process.send_signal(signum)
    except psutil.Error:
        pass


def killpg(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _still_alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [process for process in processes if is_alive(process)]


async def wait_gone(processes: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Polls until every process ended (zombies count as ended); returns those left at the deadline.

    Polling rather than psutil.wait_procs: psutil would reap our own children behind Popen's back.
    """
    pending = list(processes)
    deadline = time.monotonic() + timeout_s
    while True:
        pending = await asyncio.to_thread(_still_alive, pending)
        if not pending or time.monotonic() >= deadline:
            return pending
        await asyncio.sleep(GONE_POLL_S)


async def stop_tree(
    tree: ProcessTree, processes: dict[int, psutil.Process], stopping: Path, grace_s: float, *,
    supervisor_exit_s: float, gone_s: float,
) -> list[psutil.Process]:
    """SIGTERM, `grace_s`, SIGKILL to all but the supervisor, then to all; returns what SIGKILL did not end.

    The supervisor goes last (given `supervisor_exit_s` to leave by itself) so that it can still
    record the command's exit code.
    """
    await asyncio.to_thread(terminate, tree, processes, stopping)
    await wait_gone(processes.values(), grace_s)
    # Leftovers and whatever they forked meanwhile.
    processes = await asyncio.to_thread(collect, tree, processes)
    if not processes:
        return []
    await asyncio.to_thread(kill_except_supervisor, tree, processes)
    if tree.supervisor is not None:
        await wait_gone([tree.supervisor], supervisor_exit_s)
    processes = await asyncio.to_thread(collect, tree, processes)
    await asyncio.to_thread(kill_all, tree, processes)
    return await wait_gone(processes.values(), gone_s)
