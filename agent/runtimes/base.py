"""What the engine knows of a release, whatever runs it: a container or a host process."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

from agent.logs import DeploymentLog

RELEASE_STAGE = "release"
# Bind addresses that mean "every interface": the agent reaches such a release on loopback.
ANY_ADDRESS = ("0.0.0.0", "", "::")


@dataclass(frozen=True)
class ReleaseSpec:
    """How to start one release of an application."""

    deployment_id: str
    application: str
    runtime: Literal["container", "process", "swarm"]
    command: tuple[str, ...] | str | None
    env: Mapping[str, str]
    log_path: Path
    # The ports the application listens on: run.port and, when it differs, health_check.port.
    ports: tuple[int, ...] = ()
    # Container only: the image to start, a fixed host port for ports[0], the host address to bind.
    image: str | None = None
    host_port: int | None = None
    bind: str = "127.0.0.1"
    # Container only: limits (memory in bytes); None takes the runtime's [docker] release_* default.
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    # Process only: the directory the command runs in (holds the workspace).
    workdir: Path | None = None


@dataclass(frozen=True)
class ReleaseHandle:
    """A started release; stored as JSON with its deployment so a restarted agent finds it again."""

    runtime: Literal["container", "process", "swarm"]
    deployment_id: str
    application: str
    # Where the agent reaches it: host address and application port → host port.
    host: str
    ports: Mapping[int, int] = field(default_factory=dict)
    container_id: str | None = None
    pid: int | None = None
    pid_started_at: float | None = None  # psutil create_time of `pid`, checked before any signal
    process_group: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ports"] = {str(k): v for k, v in self.ports.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReleaseHandle":
        return cls(**{**data, "ports": {int(k): int(v) for k, v in (data.get("ports") or {}).items()}})


@dataclass(frozen=True)
class ReleaseState:
    """A release as it is now."""

    running: bool
    exit_code: int | None = None
    restart_count: int = 0
    pid: int | None = None


class ReleaseRuntime(Protocol):
    """The operations the engine needs from a runtime that serves releases."""

    async def start_release(self, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts the release; its output goes to `log` (stage `release`) as it comes."""

    async def release_state(self, handle: ReleaseHandle) -> ReleaseState:
        """Whether it runs, its exit code if it ended, how often it was restarted."""

    async def stop_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops it (SIGTERM, grace, SIGKILL on the whole tree) but keeps it resumable."""

    async def resume_release(self, handle: ReleaseHandle, spec: ReleaseSpec, log: DeploymentLog) -> ReleaseHandle:
        """Starts a stopped release again (the fixed-port failure path); returns its new handle."""

    async def remove_release(self, handle: ReleaseHandle, grace_s: float) -> None:
        """Stops it and removes everything of it; a no-op when it is already gone."""

    async def last_output(self, handle: ReleaseHandle, lines: int) -> list[str]:
        """Its last output lines, for the error of a release that died."""
