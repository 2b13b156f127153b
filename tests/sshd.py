"""A real OpenSSH server for tests: own port, own host key, own authorized_keys.

`start_sshd` runs `/usr/sbin/sshd -D` on loopback (or inside a network namespace,
for a server with an address of its own) and returns what a `[servers.*]` entry needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class SshServer:
    """A running sshd and the files a client needs to reach it."""

    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    host_key_public: str
    process: subprocess.Popen[bytes]
    directory: Path
    namespace: str | None = None

    def config_entry(self, name: str) -> dict[str, object]:
        return {
            "host": self.host, "port": self.port, "user": self.user,
            "identity_file": str(self.identity_file), "known_hosts": str(self.known_hosts),
        }

    def toml(self, name: str) -> str:
        return (
            f"[servers.{name}]\nhost = \"{self.host}\"\nport = {self.port}\nuser = \"{self.user}\"\n"
            f"identity_file = \"{self.identity_file}\"\nknown_hosts = \"{self.known_hosts}\"\n"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def keygen(path: Path) -> str:
    """Creates an ed25519 key pair without passphrase; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip() if path.suffix else Path(f"{path}.pub").read_text().strip()


def start_sshd(directory: Path, *, host: str = "127.0.0.1", namespace: str | None = None) -> SshServer:
    """Starts sshd for the current user (root) with fresh keys; waits until it accepts connections."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    host_key = directory / "host_key"
    client_key = directory / "id_ed25519"
    host_public = keygen(host_key)
    client_public = keygen(client_key)
    authorized = directory / "authorized_keys"
    authorized.write_text(client_public + "\n")
    os.chmod(authorized, 0o600)
    port = free_port() if namespace is None else 22
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {host}",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "AllowTcpForwarding yes",
                "AllowStreamLocalForwarding yes",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "MaxStartups 100",
                "MaxSessions 10",  # OpenSSH's default, as on a real server
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    command = [SSHD, "-D", "-e", "-f", str(config)]
    if namespace is not None:
        command = ["ip", "netns", "exec", namespace, *command]
    log = open(directory / "sshd.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=log)
    log.close()
    known_hosts = directory / "known_hosts"
    key_type, key_data = host_public.split()[:2]
    pattern = host if port == 22 else f"[{host}]:{port}"
    known_hosts.write_text(f"{pattern} {key_type} {key_data}\n")
    server = SshServer(
        host=host, port=port, user=os.environ.get("USER") or "root", identity_file=client_key,
        known_hosts=known_hosts, host_key_public=f"{key_type} {key_data}", process=process,
        directory=directory, namespace=namespace,
    )
    server.user = _current_user()
    _wait_for_port(server)
    return server


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _wait_for_port(server: SshServer, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(server.directory / 'sshd.log').read_text()}")
        try:
            with socket.create_connection((server.host, server.port), timeout=1) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not start on {server.host}:{server.port}")


def make_namespace(name: str, host_address: str, peer_address: str) -> None:
    """A network namespace `name` reachable at `peer_address` from the host (`host_address` on our side)."""
    remove_namespace(name)
    veth_host, veth_peer = f"{name}-h"[:15], f"{name}-p"[:15]
    for command in (
        ["ip", "netns", "add", name],
        ["ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_peer],
        ["ip", "link", "set", veth_peer, "netns", name],
        ["ip", "addr", "add", f"{host_address}/30", "dev", veth_host],
        ["ip", "link", "set", veth_host, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{peer_address}/30", "dev", veth_peer],
        ["ip", "netns", "exec", name, "ip", "link", "set", veth_peer, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ):
        subprocess.run(command, check=True, capture_output=True)


def remove_namespace(name: str) -> None:
    subprocess.run(["ip", "link", "del", f"{name}-h"[:15]], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
