"""Where the agent keeps its things on a server: `~/.deploy-agent/{releases,run,workspaces}/<id>`.

Spelled here once; relative paths are under the SSH login's home, where every remote command starts.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

REMOTE_ROOT = ".deploy-agent"


@dataclass(frozen=True)
class RemoteLayout:
    """The directories of one agent on one server, under `root`."""

    root: str = REMOTE_ROOT

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", posixpath.normpath(self.root))

    def release_dir(self, deployment_id: str) -> str:
        """Where a process release's files live (the workspace it was built in, kept)."""
        return f"{self.root}/releases/{deployment_id}"

    def run_dir(self, deployment_id: str) -> str:
        """Where a release's output files and exit code live."""
        return f"{self.root}/run/{deployment_id}"

    def workspace_dir(self, deployment_id: str) -> str:
        """The workspace a deployment's source is put in before its build."""
        return f"{self.root}/workspaces/{deployment_id}"

    def owned_path(self, remote_dir: str) -> str | None:
        """`remote_dir` normalised, if it lies strictly under `root`; the agent deletes nothing else."""
        path = posixpath.normpath(remote_dir)
        if ".." in remote_dir.split("/") or not path.startswith(self.root.rstrip("/") + "/"):
            return None
        return path


DEFAULT_LAYOUT = RemoteLayout()


def remote_release_dir(deployment_id: str) -> Path:
    """Where a remote process release lives on its server, relative to the SSH user's home."""
    return Path(DEFAULT_LAYOUT.release_dir(deployment_id))
