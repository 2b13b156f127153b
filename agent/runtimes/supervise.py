"""The supervisor of one host-process release: runs its command and copies its output to the log.

    python -P -m agent.runtimes.supervise --log PATH --pid-file PATH --exit-file PATH
        [--workdir DIR] [--stop-file PATH] [--kill-grace SECONDS] [--max-log-bytes N]
        [--env-from-stdin] [--cgroup DIR] -- CMD...

The process runtime starts it detached from the agent (its own session), so the release and its
log outlive an agent restart. It

- starts CMD as its child, in its own process group, so `killpg(supervisor pid)` reaches the tree,
  and makes itself the child subreaper, so orphaned descendants stay in its tree;
- writes `<pid> <create time>` of CMD to the pid file (atomically) once CMD runs;
- writes each output line to the log as `<time> release stdout|stderr | text`, with every secret
  shown as `***`, until the log holds `--max-log-bytes` (then it counts what it drops, and notes
  the count when it exits);
- forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to CMD, except SIGTERM while the
  stop file exists (the agent then signals the whole group, and CMD must not get it twice);
- when CMD ends, writes its exit code (negative: the signal) to the exit file, ends what is left
  of the tree (SIGTERM, `--kill-grace` seconds, SIGKILL) as a container's end would, and exits;
  with `--cgroup` (the release's own cgroup, which the agent moved the supervisor into before
  sending stdin) "the tree" includes every other member of that cgroup, wherever it moved in
  the process tree. The cgroup counts only while the supervisor itself is in it; once the tree
  is gone the supervisor moves up out of it and removes it.

With `--env-from-stdin` stdin holds a JSON object `{"env": {...}, "secrets": [...]}`: CMD's
environment and the values its log masks, so that no secret shows in the supervisor's arguments
or environment and no PYTHONPATH of the application changes what the supervisor imports. If CMD cannot start, the exit file holds 127 (or 126) and the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil

from agent.logs import DEFAULT_MAX_LOG_BYTES, DeploymentLog, LineSplitter, LogPolicy
from agent.runtimes.base import RELEASE_STAGE
from agent.runtimes.cgroups import Cgroup, CgroupError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
READ_BYTES = 64 * 1024
# How often the tree is checked while the command's leftovers are being ended.
ENDING_POLL_S = 0.1
# How long output may still arrive after everything was SIGKILLed (a pipe held outside the tree).
DRAIN_AFTER_KILL_S = 1.0
PR_SET_CHILD_SUBREAPER = 36


def write_atomically(path: Path, text: str) -> None:
    """Writes the file under a temporary name and renames it, so readers never see half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def become_subreaper() -> None:
    """Orphaned descendants (double forks, setsid daemons) are re-parented to us, not to init."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Runs one command to its end; see the module docstring."""

    def __init__(self, args: argparse.Namespace, log: DeploymentLog, env: dict[str, str] | None) -> None:
        self.args = args
        self.log = log
        self.env = env
        self.child: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.early_signals: list[int] = []
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)

    def run(self) -> int:
        self.install_signal_handlers()
        become_subreaper()
        try:
            self.child = subprocess.Popen(
                self.args.command,
                cwd=self.args.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                restore_signals=True,
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            program = self.args.command[0]
            reason = f"cannot start {program!r}: {exc.strerror or exc}"
            if exc.filename and exc.filename != program:
                reason += f" ({exc.filename})"
            self.write_agent_line(reason)
            write_atomically(Path(self.args.exit_file), f"{code}\n{reason}\n")
            return code
        started_at = psutil.Process(self.child.pid).create_time()
        write_atomically(Path(self.args.pid_file), f"{self.child.pid} {started_at!r}\n")
        for signum in self.early_signals:
            self.forward(signum)
        self.pump()
        self.leave_cgroup()
        assert self.exit_code is not None
        return self.exit_code if self.exit_code >= 0 else 128 - self.exit_code

    def leave_cgroup(self) -> None:
        """With the tree gone: moves up out of the release's cgroup and removes it, so that an ended release leaves none.

        The kernel refuses to remove a cgroup that still holds a process, so nothing that is
        left (a process the agent must still kill) loses its cgroup.
        """
        cgroup = Cgroup(Path(self.args.cgroup)) if self.args.cgroup else None
        if cgroup is None or not cgroup.holds(os.getpid()):
            return
        agent_directory = cgroup.path.parent
        try:
            Cgroup(agent_directory.parent).add(os.getpid())
            cgroup.remove(timeout_s=0.5)
        except CgroupError:
            return
        with contextlib.suppress(OSError):
            agent_directory.rmdir()  # the agent's directory, if this was its last release

    def install_signal_handlers(self) -> None:
        # The wakeup fd makes the selector return for every signal, SIGCHLD included.
        signal.set_wakeup_fd(self.wakeup_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, frame: object) -> None:
        if self.child is None:
            self.early_signals.append(signum)
        elif signum == signal.SIGTERM and self.args.stop_file and os.path.exists(self.args.stop_file):
            return  # the agent signalled the whole group: the command has it already
        else:
            self.forward(signum)

    def forward(self, signum: int) -> None:
        # Handlers and reaping both run on the main thread, so an unreaped pid is still the child's.
        if self.child is not None and self.exit_code is None:
            try:
                os.kill(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def pump(self) -> None:
        """Copies output to the log until the command ended and its tree is gone."""
        assert self.child is not None and self.child.stdout is not None and self.child.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.wakeup_read, selectors.EVENT_READ, None)
        selector.register(self.child.stdout, selectors.EVENT_READ, ("stdout", LineSplitter()))
        selector.register(self.child.stderr, selectors.EVENT_READ, ("stderr", LineSplitter()))
        open_streams = 2
        ended_at: float | None = None
        killed_at: float | None = None
        while True:
            timeout = None if ended_at is None else ENDING_POLL_S
            for key, _ in selector.select(timeout):
                if key.data is None:
                    self.drain_wakeups()
                    continue
                stream, splitter = key.data
                try:
                    chunk = os.read(key.fd, READ_BYTES)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    chunk = b""
                if chunk:
                    self.write_output(stream, splitter.feed(chunk))
                else:
                    self.write_output(stream, splitter.flush())
                    selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                    open_streams -= 1
            self.reap()
            if self.exit_code is None:
                continue
            now = time.monotonic()
            descendants = self.descendants()
            if ended_at is None:
                ended_at = now
                self.signal_all(descendants, signal.SIGTERM)
            if not descendants and open_streams == 0:
                break
            if killed_at is None and now - ended_at >= self.args.kill_grace:
                self.signal_all(descendants, signal.SIGKILL)
                killed_at = now
            if killed_at is not None and not descendants and now - killed_at >= DRAIN_AFTER_KILL_S:
                break
        selector.close()

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wakeup_read, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self) -> None:
        """Reaps every finished child (the command and adopted orphans); records the command's end."""
        assert self.child is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.exit_code
                try:
                    write_atomically(Path(self.args.exit_file), f"{self.exit_code}\n")
                except OSError:
                    pass

    def descendants(self) -> list[psutil.Process]:
        """Live descendants and, while the supervisor is in the release's cgroup, its other members."""
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return []
        cgroup = Cgroup(Path(self.args.cgroup)) if self.args.cgroup else None
        if cgroup is not None and cgroup.holds(os.getpid()):
            known = {process.pid for process in children} | {os.getpid()}
            for pid in cgroup.pids():
                with contextlib.suppress(psutil.Error):
                    process = psutil.Process(pid)  # pins the create time before membership is checked
                    if pid not in known and cgroup.holds(pid):
                        children.append(process)
        alive = []
        for process in children:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.Error:
                pass
        return alive

    @staticmethod
    def signal_all(processes: list[psutil.Process], signum: int) -> None:
        for process in processes:
            try:
                process.send_signal(signum)
            except psutil.Error:
                pass

    def write_output(self, stream: str, lines: list[str]) -> None:
        try:
            self.log.write_lines(RELEASE_STAGE, stream, lines)
        except OSError:
            pass  # a full disk must not end the release

    def write_agent_line(self, message: str) -> None:
        try:
            self.log.agent(RELEASE_STAGE, message)
        except OSError:
            pass


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.runtimes.supervise", description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="the deployment's log file")
    parser.add_argument("--pid-file", required=True, help="receives '<pid> <create time>' of the command")
    parser.add_argument("--exit-file", required=True, help="receives the command's exit code")
    parser.add_argument("--workdir", default=None, help="the command's working directory")
    parser.add_argument("--stop-file", default=None, help="while it exists, SIGTERM is not forwarded")
    parser.add_argument("--kill-grace", type=float, default=10.0, help="seconds before leftovers get SIGKILL")
    parser.add_argument(
        "--max-log-bytes", type=int, default=DEFAULT_MAX_LOG_BYTES, help="the log's cap; output beyond it is counted"
    )
    parser.add_argument(
        "--env-from-stdin", action="store_true", help="read the command's environment and the secrets as JSON"
    )
    parser.add_argument("--cgroup", default=None, help="the release's own cgroup (its members are the tree's)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("a command is required after --")
    return args


def read_stdin() -> tuple[dict[str, str], tuple[str, ...]]:
    """The command's environment and the secrets its log masks, from the JSON object on stdin."""
    data = json.loads(sys.stdin.buffer.read() or b"{}")
    # Nothing more comes on stdin; keep fd 0 open on /dev/null so that no later file takes it.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env = data.get("env", {}) if isinstance(data, dict) else None
    secrets = data.get("secrets", []) if isinstance(data, dict) else None
    if not isinstance(env, dict) or not isinstance(secrets, list):
        raise ValueError('stdin must hold a JSON object {"env": {...}, "secrets": [...]}')
    return {str(key): str(value) for key, value in env.items()}, tuple(str(secret) for secret in secrets)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env, secrets = read_stdin() if args.env_from_stdin else (None, ())
    except (ValueError, OSError) as exc:
        with DeploymentLog(Path(args.log), LogPolicy(args.max_log_bytes)) as log:
            log.agent(RELEASE_STAGE, f"release supervisor failed: {exc!r}")
        return 70
    log = DeploymentLog(Path(args.log), LogPolicy(args.max_log_bytes, secrets))
    try:
        return Supervisor(args, log, env).run()
    except Exception as exc:  # noqa: BLE001 - nobody reads our stderr; the log is the only witness
        try:
            log.agent(RELEASE_STAGE, f"release supervisor failed: {exc!r}")
        except OSError:
            pass
        return 70
    finally:
        with contextlib.suppress(OSError):
            log.close()


if __name__ == "__main__":
    sys.exit(main())
