"""A cgroup (v2) of its own for each host-process release, so that nothing it starts escapes a kill.

A child that calls `setsid` or double-forks leaves its process group, never its cgroup. Where
the host allows it, each release runs in `<base>/<agent label>/<deployment id>`:

- `base` is discovered once per process (`discover_base`): the agent's own cgroup when systemd
  delegated it (`Delegate=yes`), else, for root, `deploy-agent` under the cgroup2 mount; None
  (process groups only) when there is no cgroup2 mount or nothing the agent may write;
- `agent label` keeps the cgroups of agents that share a host (one per state dir) apart, so that
  an agent's sweep never reaches another agent's releases;
- everything in a release's cgroup is that release's: the directory is created by the agent
  for it alone, and only the agent (or root) may move processes in.

Ending a cgroup: `cgroup.kill` (Linux 5.14+), else SIGKILL to every member until none is left;
then wait for `cgroup.events` to say `populated 0` and remove the directory. Everything here
blocks (file I/O under /sys): callers run it on a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Literal

Isolation = Literal["cgroup", "process_group"]

MOUNTINFO = Path("/proc/self/mountinfo")
OWN_CGROUP = Path("/proc/self/cgroup")
# The directory made under the cgroup2 root when the agent runs as root in an undelegated cgroup.
ROOT_BASE_NAME = "deploy-agent"
# systemd marks a delegated cgroup with one of these extended attributes (systemd 251+).
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")
EMPTY_POLL_S = 0.02
# Every agent's directory of release cgroups is named this plus a hash of its run dir.
LABEL_PREFIX = "agent-"


class CgroupError(Exception):
    """A release's cgroup could not be made, joined, emptied or removed."""


def find_v2_mount(mountinfo: Path = MOUNTINFO) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (the first such mount), from /proc/self/mountinfo."""
    try:
        text = mountinfo.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        # `id parent major:minor root mountpoint options [optional...] - fstype source superoptions`
        fields, separator, tail = line.partition(" - ")
        parts = fields.split()
        if separator and len(parts) >= 5 and tail.split(" ", 1)[0] == "cgroup2" and parts[3] == "/":
            return Path(_unescape_mount_path(parts[4]))
    return None


def _unescape_mount_path(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


@functools.lru_cache(maxsize=1)
def v2_mount() -> Path | None:
    """This host's cgroup2 mount, read once per process (mounts of the hierarchy do not move)."""
    return find_v2_mount()


def own_cgroup(mount: Path, proc_cgroup: Path = OWN_CGROUP) -> Path | None:
    """The directory of this process's cgroup2 cgroup (the `0::` line of /proc/self/cgroup)."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            relative = line[3:].strip().lstrip("/")
            if relative.endswith(" (deleted)"):
                return None
            return mount / relative if relative else mount
    return None


def is_delegated(directory: Path) -> bool:
    """Whether systemd delegated this cgroup to us: its delegate xattr, or (not root) owned and writable."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(directory, name) == b"1":
                return True
        except OSError:
            continue
    try:
        owner = directory.stat().st_uid
    except OSError:
        return False
    # As root everything is writable, so for root only the xattr proves delegation.
    euid = os.geteuid()
    return euid != 0 and owner == euid and os.access(directory / "cgroup.procs", os.W_OK)


@functools.lru_cache(maxsize=1)
def discover_base() -> Path | None:
    """The cgroup under which this agent may make its releases' cgroups, or None; decided once."""
    mount = v2_mount()
    if mount is None or not (mount / "cgroup.procs").exists():
        return None
    own = own_cgroup(mount)
    if own is not None and own != mount and is_delegated(own):
        return own
    if os.geteuid() != 0:
        return None
    base = mount / ROOT_BASE_NAME
    try:
        base.mkdir(exist_ok=True)
    except OSError:
        return None
    return base if (base / "cgroup.procs").exists() else None


def process_isolation() -> Isolation:
    """What keeps this host's process releases together: their own cgroups, or process groups only."""
    return "cgroup" if discover_base() is not None else "process_group"


def agent_label(run_dir: Path) -> str:
    """The name of one agent's cgroups directory, from its (resolved) run dir."""
    return LABEL_PREFIX + hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:16]


class Cgroup:
    """One release's cgroup directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r})"

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").exists()

    def create(self) -> None:
        """Makes the directory (and its parents); a parent removed meanwhile is made again."""
        for _ in range(3):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except FileNotFoundError:
                continue  # a parent's tidy-up rmdir raced us
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {self.path}: {exc.strerror or exc}") from None
            if not self.exists():
                with contextlib.suppress(OSError):
                    self.path.rmdir()
                raise CgroupError(f"{self.path} is not on a cgroup2 hierarchy")
            return
        raise CgroupError(f"cannot create cgroup {self.path}: its parent keeps disappearing")

    def add(self, pid: int) -> None:
        """Moves process `pid` (and, from then on, everything it starts) into this cgroup."""
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n", encoding="ascii")
        except OSError as exc:
            raise CgroupError(f"cannot move process {pid} into {self.path}: {exc.strerror or exc}") from None

    def pids(self) -> list[int]:
        """The processes in it now (zombies are not members); [] when it is gone."""
        try:
            text = (self.path / "cgroup.procs").read_text(encoding="ascii")
        except OSError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]

    def holds(self, pid: int) -> bool:
        """Whether process `pid` is in this cgroup (read from the process's side)."""
        mount = v2_mount()
        if mount is None:
            return False
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8")
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/") == self.path
        return False

    def populated(self) -> bool:
        """Whether a process (here or in a child cgroup) is still in it; False when it is gone."""
        try:
            text = (self.path / "cgroup.events").read_text(encoding="ascii")
        except FileNotFoundError:
            return False
        except OSError:
            return bool(self.pids())
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() != "0"
        return bool(self.pids())

    def signal_members(self, signum: int) -> None:
        """Sends `signum` to each member, through a pidfd so that a reused pid is never hit."""
        for pid in self.pids():
            if pid == os.getpid():
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                # The pidfd pins this process: if it is still a member now, the signal reaches it.
                if self.holds(pid):
                    signal.pidfd_send_signal(pidfd, signum)
            except OSError:
                pass
            finally:
                os.close(pidfd)

    def kill(self) -> None:
        """SIGKILL to every member at once (cgroup.kill), or one by one where the kernel lacks it."""
        try:
            (self.path / "cgroup.kill").write_text("1\n", encoding="ascii")
            return
        except FileNotFoundError:
            if not self.path.is_dir():
                return
        except OSError:
            pass
        self.signal_members(signal.SIGKILL)

    def wait_empty(self, timeout_s: float) -> bool:
        """Polls until no process is left in it; without cgroup.kill, kills newcomers meanwhile."""
        deadline = time.monotonic() + timeout_s
        killer = (self.path / "cgroup.kill").exists()
        while self.populated():
            if time.monotonic() >= deadline:
                return False
            if not killer:
                self.signal_members(signal.SIGKILL)  # members forked before they died
            time.sleep(EMPTY_POLL_S)
        return True

    def remove(self, timeout_s: float = 1.0) -> None:
        """Removes the (empty) directory; a no-op when it is gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # EBUSY: the kernel has not yet released the last member.
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {exc.strerror or exc}") from None
                time.sleep(EMPTY_POLL_S)

    def destroy(self, timeout_s: float) -> None:
        """Kills everything in it, checks that nothing is left, and removes it; raises if it cannot."""
        if not self.path.is_dir():
            return
        self.kill()
        if not self.wait_empty(timeout_s):
            pids = ", ".join(str(pid) for pid in self.pids()) or "?"
            raise CgroupError(f"processes survived the kill of cgroup {self.path}: {pids}")
        self.remove()


class ReleaseCgroups:
    """The cgroups of one agent's releases: `<parent>/<deployment id>`."""

    def __init__(self, parent: Path) -> None:
        self.parent = Path(parent)

    def __repr__(self) -> str:
        return f"ReleaseCgroups({str(self.parent)!r})"

    @classmethod
    def discover(cls, run_dir: Path) -> "ReleaseCgroups | None":
        """This host's cgroups for the agent whose run dir is `run_dir`, or None where there are none."""
        base = discover_base()
        return None if base is None else cls(base / agent_label(run_dir))

    def of(self, deployment_id: str) -> Cgroup:
        return Cgroup(self.parent / deployment_id)

    def deployment_ids(self) -> list[str]:
        """The deployments that have a cgroup here now."""
        try:
            return sorted(entry.name for entry in self.parent.iterdir() if (entry / "cgroup.procs").exists())
        except OSError:
            return []

    def prepare(self, deployment_id: str, record: Path, timeout_s: float) -> Cgroup:
        """A fresh, empty cgroup for a release, its path written to `record` before anything runs in it."""
        cgroup = self.of(deployment_id)
        # A cgroup of this id is an earlier start of this very release (a resume, a crash): end it.
        cgroup.destroy(timeout_s)
        cgroup.create()
        try:
            record.write_text(f"{cgroup.path}\n", encoding="utf-8")
        except OSError as exc:
            cgroup.remove()
            raise CgroupError(f"cannot record cgroup {cgroup.path}: {exc.strerror or exc}") from None
        return cgroup

    def sweep(self, keep: set[str], record_of: Callable[[str], Path], timeout_s: float) -> int:
        """Ends and removes every release cgroup here whose deployment is not in `keep`; returns how many."""
        removed = 0
        for deployment_id in self.deployment_ids():
            if deployment_id in keep:
                continue
            try:
                end_cgroup(self.of(deployment_id), record_of(deployment_id), self, timeout_s)
                removed += 1
            except (CgroupError, ValueError):
                continue  # a process SIGKILL cannot end (the next sweep tries again), or no deployment id
        self.tidy()
        return removed

    def tidy(self) -> None:
        """Removes the parent once no release cgroup is left in it (the next release makes it again)."""
        try:
            self.parent.rmdir()
        except OSError:
            pass  # not empty, or gone: both are fine


def recorded_cgroup(record: Path, deployment_id: str) -> Cgroup | None:
    """The cgroup a release was started in, from its `record` file, if it still exists."""
    try:
        path = Path(record.read_text(encoding="utf-8").strip())
    except OSError:
        return None
    mount = v2_mount()
    # Only a cgroup named after this deployment, in an agent's directory of this host's hierarchy, can be its.
    if mount is None or not path.is_absolute() or mount not in path.parents:
        return None
    if path.name != deployment_id or not path.parent.name.startswith(LABEL_PREFIX):
        return None
    cgroup = Cgroup(path)
    return cgroup if cgroup.exists() else None


def end_cgroup(cgroup: Cgroup, record: Path, cgroups: ReleaseCgroups | None, timeout_s: float) -> None:
    """cgroup.kill, a check that nothing is left, then removal of the cgroup and of its `record`."""
    cgroup.destroy(timeout_s)
    record.unlink(missing_ok=True)
    if cgroups is not None and cgroup.path.parent == cgroups.parent:
        cgroups.tidy()
