"""Workspaces on a server: filled by upload or by `git clone`, archived, and removed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.remote.commands import DRAIN_S, RemoteCommands
from agent.runtimes.remote.layout import RemoteLayout
from agent.runtimes.remote.scripts import (
    GIT_ENV, checkout_command, clone_command, launch_script, ref_candidates, remove_script, resolve_ref_script,
)
from agent.runtimes.remote.transfer import SftpTransfer, scan_tree
from agent.workspace import redact_url

SOURCE_STAGE = "source"


class RemoteWorkspaces:
    """Prepares and removes directories under one server's `RemoteLayout`."""

    def __init__(self, commands: RemoteCommands, transfer: SftpTransfer, layout: RemoteLayout) -> None:
        self.commands = commands
        self.transfer = transfer
        self.layout = layout
        self.server_name = commands.server_name

    async def upload(self, local_dir: Path, remote_dir: str, log: DeploymentLog) -> None:
        """Copies `local_dir` into `remote_dir` (created) over SFTP, keeping modes, times and symlinks."""
        log.agent(SOURCE_STAGE, f"uploading {local_dir} to {remote_dir} on server {self.server_name}")
        entries = await asyncio.to_thread(scan_tree, Path(local_dir))
        await self._clear_owned(remote_dir)
        await self.transfer.upload_tree(entries, remote_dir)
        skipped = [entry.relative for entry in entries if entry.kind == "other"]
        if skipped:
            log.agent(SOURCE_STAGE, f"skipped {len(skipped)} special file(s), first {skipped[0]}")
        log.agent(SOURCE_STAGE, f"uploaded {sum(e.kind == 'file' for e in entries)} file(s) to {remote_dir}")

    async def clone(self, url: str, ref: str | None, remote_dir: str, log: DeploymentLog) -> None:
        """Clones `url` into `remote_dir` on the server and checks out `ref`; output goes to stage "source"."""
        shown = redact_url(url)
        log.agent(SOURCE_STAGE, f"cloning {shown} into {remote_dir} on server {self.server_name}")
        await self._clear_owned(remote_dir)
        # From the login's home, where relative paths (remote_dir, a path url) are meant; git creates
        # the leading directories.
        code = await self._run_git(".", clone_command(url, remote_dir), log)
        if code != 0:
            raise RuntimeFailure(f"git clone of {shown} on server {self.server_name} failed with exit code {code}",
                                 exit_code=code)
        if ref is None:
            return
        commit = await self._resolve_ref(remote_dir, ref)
        if commit is None:
            raise RuntimeFailure(f"ref {ref!r} is not a branch, tag or commit of {shown}")
        code = await self._run_git(remote_dir, checkout_command(commit), log)
        if code != 0:
            raise RuntimeFailure(f"git checkout of {ref} on server {self.server_name} failed with exit code {code}",
                                 exit_code=code)
        log.agent(SOURCE_STAGE, f"checked out {ref} at {commit[:12]}")

    async def remove(self, remote_dir: str) -> None:
        """Deletes a directory under the layout's root on the server; a missing one is fine."""
        path = self.layout.owned_path(remote_dir)
        if path is None:
            raise RuntimeFailure(f"refusing to remove {remote_dir!r} on server {self.server_name}: "
                                 f"not under {self.layout.root!r}")
        code, _, error = await self.commands.shell.query(remove_script(path), f"removing {path}")
        if code != 0:
            raise RuntimeFailure(f"removing {path} on server {self.server_name} failed: {error or code}")

    async def _clear_owned(self, remote_dir: str) -> None:
        """Empties a workspace about to be filled, so it holds its source and nothing older.

        Only under the layout's root: a directory elsewhere is filled as it is.
        """
        if self.layout.owned_path(remote_dir) is not None:
            await self.remove(remote_dir)

    async def _run_git(self, directory: str, command: tuple[str, ...], log: DeploymentLog) -> int:
        """Runs git to its end with output in `log`; a cancel or lost connection stops its group."""
        ran = await self.commands.run(launch_script(directory, GIT_ENV, command), log, SOURCE_STAGE, "git")
        await ran.session.wait_closed(DRAIN_S)
        ran.session.close()
        return ran.session.final_code

    async def _resolve_ref(self, repository: str, ref: str) -> str | None:
        """The commit a branch, tag or sha names; branches first, as `git clone --branch` does."""
        for candidate in ref_candidates(ref):
            code, output, _ = await self.commands.shell.query(
                resolve_ref_script(repository, candidate), "resolving a git ref"
            )
            if code == 0 and output.strip():
                return output.strip()
        return None
