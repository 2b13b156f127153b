"""systemd integration: sd_notify from the real daemon, journald priorities, and the unit file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import systemd
from agent.structured_logging import stdout_is_journal
from tests.e2e.conftest import AgentProcess

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "deploy-agent.service"
MAX_EXPOSURE = 4.5


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if predicate(message):
                    self.messages.remove(message)
                    return message
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no {what} within {timeout}s; got {self.messages}")


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    yield notify
    notify.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "state")
    yield agent
    if agent.process is not None:
        agent.stop(signal.SIGKILL)


def test_the_daemon_notifies_systemd(listener: NotifyListener, daemon: AgentProcess) -> None:
    """READY=1, then WATCHDOG=1 (WATCHDOG_USEC/2) and STATUS=; RELOADING=1 + MONOTONIC_USEC, READY=1 on SIGHUP; STOPPING=1."""
    daemon.start()
    listener.wait_for(lambda m: m == "READY=1", 10, "READY=1")
    listener.wait_for(lambda m: m == "WATCHDOG=1", 3, "a first WATCHDOG=1")
    listener.wait_for(lambda m: m == "WATCHDOG=1", 1, "a second WATCHDOG=1")
    assert listener.wait_for(lambda m: m.startswith("STATUS="), 5, "STATUS=") == "STATUS=0 queued, 0 running"
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    reloading = listener.wait_for(lambda m: m.startswith("RELOADING=1"), 5, "RELOADING=1")
    usec = int(re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading).group(1))
    assert abs(usec / 1e6 - time.monotonic()) < 10
    listener.wait_for(lambda m: m == "READY=1", 5, "READY=1 after the reload")
    daemon.process.send_signal(signal.SIGTERM)
    listener.wait_for(lambda m: m == "STOPPING=1", 10, "STOPPING=1")
    assert daemon.process.wait(timeout=10) == 0


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC/2 in seconds; nothing when unset, or when WATCHDOG_PID names another process."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() is None


def test_journal_lines_carry_their_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With JOURNAL_STREAM naming stdout, each line starts with <6>, <4> or <3> as its level says."""
    agent = AgentProcess(tmp_path / "state")
    agent.output_path.touch()
    status = os.stat(agent.output_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    try:
        agent.start()
        agent.config_path.write_text(agent.config_path.read_text() + "\nnot toml [\n")
        assert agent.process is not None
        agent.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reload refused" not in agent.output() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        agent.stop()
    lines = agent.output().splitlines()
    assert lines and all(re.match(r"<[2-7]>\{", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>") and '"agent started"' in line for line in lines)
    assert any(line.startswith("<4>") and '"secret file readable by others"' in line for line in lines)
    assert any(line.startswith("<3>") and '"config reload refused' in line for line in lines)


def test_no_priority_prefix_when_journal_stream_names_another_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """An inherited JOURNAL_STREAM that is not stdout's device:inode adds no prefix."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert stdout_is_journal() is False


def test_an_invalid_config_exits_2(tmp_path: Path) -> None:
    """`run` with an invalid file exits 2, which the unit's RestartPreventExitStatus=2 does not restart."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nmax_concurrent = 0\n")
    result = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(bad)], capture_output=True, timeout=30)
    assert result.returncode == 2 and b"agent.max_concurrent" in result.stdout + result.stderr
    assert re.search(r"^RestartPreventExitStatus=2$", UNIT.read_text(), re.M)


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's deploy-agent (verify checks it exists)."""
    executable = Path(sys.executable).with_name("deploy-agent")
    assert executable.exists(), executable
    unit = tmp_path / "deploy-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/deploy-agent/bin/deploy-agent", str(executable)))
    return unit


def test_the_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (Type=notify, watchdog, reload, exit status 2)."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run scripts/setup-machine.sh"
    unit = unit_for_this_machine(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Delegate=yes", "KillMode=process"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's exposure at most 4.5."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run scripts/setup-machine.sh"
    unit = unit_for_this_machine(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
