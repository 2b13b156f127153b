"""A private Docker engine that a test may stop and start at will, apart from the machine's own.

It has its own socket, data root, exec root, pid file and bridge, so stopping it touches no
other container on the machine. Never `--bridge=none`: dockerd then deletes the host's docker0.
`--iptables=false` keeps it out of the host's firewall rules; its bridge is made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import docker
import pytest

from tests.conftest import BASE_IMAGE

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


class PrivateDockerd:
    """One dockerd of a test's own; `url` is what the agent's `[docker] url` takes."""

    def __init__(self, root: Path, bridge: str, subnet_octet: int) -> None:
        self.root = root
        self.bridge = bridge
        self.address = f"10.{subnet_octet}.0.1/24"
        self.socket = root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.data_root = root / "data"
        self.exec_root = root / "exec"
        self.pidfile = root / "dockerd.pid"
        self.log_path = root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)

    def start(self) -> None:
        """Starts dockerd and waits until it answers."""
        assert self.process is None or self.process.poll() is not None, "dockerd already runs"
        config = self.root / "daemon.json"
        config.write_text(json.dumps({}))
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                [
                    "dockerd", f"--config-file={config}", f"--host={self.url}", f"--data-root={self.data_root}",
                    f"--exec-root={self.exec_root}", f"--pidfile={self.pidfile}", f"--bridge={self.bridge}",
                    "--iptables=false", "--ip-masq=false",
                ],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"private dockerd exited with {self.process.returncode}:\n{self.log()}")
            if self.is_up():
                return
            time.sleep(0.1)
        raise AssertionError(f"private dockerd did not answer within {START_TIMEOUT_S}s:\n{self.log()}")

    def stop(self) -> None:
        """Stops dockerd as a service manager would (SIGTERM); without live-restore its containers die."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def is_up(self) -> bool:
        try:
            client = self.client()
        except Exception:  # noqa: BLE001 - the SDK asks the engine while it is made
            return False
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001 - whatever failed, it does not answer
            return False
        finally:
            client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def load_image(self, image: str) -> None:
        """Copies `image` from the machine's engine into this one (no registry can be reached)."""
        saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        loaded = subprocess.run(
            ["docker", "-H", self.url, "load"], stdin=saved.stdout, capture_output=True, timeout=120
        )
        assert saved.stdout is not None
        saved.stdout.close()
        assert saved.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr.decode(errors="replace")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _unmount_under(directory: Path) -> None:
    """Unmounts whatever dockerd (or its containerd) left mounted under `directory`, deepest first."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            point = line.split()[1].replace("\\040", " ")
            if point == str(directory) or point.startswith(f"{directory}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _kill_leftover_shims(root: Path) -> None:
    """Kills containerd shims of this engine that outlived it (their command line names its exec root)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(root) in part for part in process.info["cmdline"] or []):
                process.kill()


@pytest.fixture
def private_dockerd() -> Iterator[PrivateDockerd]:
    """A running private dockerd with the base image loaded; stopped and removed afterwards."""
    # Short paths: containerd's sockets live under the exec root and unix socket paths are short.
    root = Path(tempfile.mkdtemp(prefix="dkd-", dir="/tmp"))
    os.chmod(root, 0o711)
    octet = random.randint(100, 199)
    bridge = f"dkd{os.getpid() % 10000}{random.randint(0, 99)}"
    _ip("link", "add", bridge, "type", "bridge")
    engine = PrivateDockerd(root, bridge, octet)
    try:
        _ip("addr", "add", engine.address, "dev", bridge)
        _ip("link", "set", bridge, "up")
        engine.start()
        engine.load_image(BASE_IMAGE)
        yield engine
    finally:
        if engine.is_up():
            with contextlib.suppress(Exception):
                client = engine.client()
                for container in client.containers.list(all=True, sparse=True):
                    container.remove(force=True)
                client.close()
        engine.stop()
        _kill_leftover_shims(root)
        _unmount_under(root)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", bridge)
        shutil.rmtree(root, ignore_errors=True)
