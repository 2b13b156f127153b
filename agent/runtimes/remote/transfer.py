"""Files to and from a server: workspace uploads over SFTP, archive downloads, the shared SFTP session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from agent.errors import RuntimeFailure
from agent.runtimes.remote.channel import CONNECTION_ERRORS, RemoteShell, describe
from agent.runtimes.remote.scripts import archive_script, sh_command

UPLOAD_CHUNK_BYTES = 256 * 1024
UPLOAD_CONCURRENCY = 8


@dataclass(frozen=True)
class Entry:
    """One thing to upload, relative to the workspace root."""

    relative: str
    kind: str  # "dir", "file", "symlink" or "other"
    local: Path
    mode: int
    atime: float
    mtime: float
    target: str | None = None


class SftpTransfer:
    """Moves files between the agent's host and one server, and keeps the SFTP session they share."""

    def __init__(self, shell: RemoteShell) -> None:
        self.shell = shell
        # One SFTP session serves every release follower: sshd allows few channels per connection.
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_connection: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()

    @property
    def server_name(self) -> str:
        return self.shell.server_name

    async def shared_sftp(self) -> asyncssh.SFTPClient:
        """The SFTP session on the current connection, opened again after the connection changed."""
        async with self._sftp_lock:
            connection = await self.shell.connection()
            if self._sftp is None or self._sftp_connection is not connection or connection.is_closed():
                self.close()
                try:
                    self._sftp = await connection.start_sftp_client()
                except (asyncssh.SFTPError, *CONNECTION_ERRORS) as exc:
                    raise RuntimeFailure(
                        f"cannot open an SFTP session on server {self.server_name}: {describe(exc)}"
                    ) from exc
                self._sftp_connection = connection
            return self._sftp

    def discard_sftp(self, client: asyncssh.SFTPClient) -> None:
        """Forgets a shared session that failed, so that the next `shared_sftp` opens a new one."""
        if self._sftp is client:
            self.close()

    def close(self) -> None:
        """Ends the shared SFTP session, if one is open."""
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.exit()
            self._sftp = None

    async def is_dir(self, remote_dir: str) -> bool:
        """Whether `remote_dir` is a directory on the server."""
        sftp = await self.shared_sftp()
        try:
            return bool(await sftp.isdir(remote_dir))
        except (asyncssh.SFTPError, *CONNECTION_ERRORS) as exc:
            self.discard_sftp(sftp)
            raise RuntimeFailure(f"looking for {remote_dir} on server {self.server_name} failed: {describe(exc)}") from exc

    async def upload_tree(self, entries: list[Entry], remote_dir: str) -> None:
        """Copies scanned entries into `remote_dir` (created) over SFTP, keeping modes, times and symlinks."""
        connection = await self.shell.connection()
        try:
            async with connection.start_sftp_client() as sftp:
                await sftp.makedirs(remote_dir, exist_ok=True)
                directories = [entry for entry in entries if entry.kind == "dir"]
                for entry in directories:
                    await sftp.makedirs(posixpath.join(remote_dir, entry.relative), exist_ok=True)
                limit = asyncio.Semaphore(UPLOAD_CONCURRENCY)

                async def upload(entry: Entry) -> None:
                    async with limit:
                        await _upload_entry(sftp, entry, posixpath.join(remote_dir, entry.relative))

                # Every upload settles before the SFTP session closes; the first failure is reported.
                results = await asyncio.gather(
                    *(upload(entry) for entry in entries if entry.kind != "dir"), return_exceptions=True
                )
                failure = next((result for result in results if isinstance(result, BaseException)), None)
                if failure is not None:
                    raise failure
                # Directory modes last, deepest first: a read-only directory would refuse its children.
                for entry in sorted(directories, key=lambda entry: entry.relative.count("/"), reverse=True):
                    await _set_attributes(sftp, posixpath.join(remote_dir, entry.relative), entry)
        except (asyncssh.SFTPError, *CONNECTION_ERRORS) as exc:
            raise RuntimeFailure(
                f"uploading the workspace to server {self.server_name} failed: {describe(exc)}"
            ) from exc

    async def download_archive(self, remote_dir: str, dest: Path) -> None:
        """Writes a tar of `remote_dir`'s contents (entries `./...`) to the local file `dest`."""
        connection = await self.shell.connection()
        try:
            async with connection.create_process(
                sh_command(archive_script(remote_dir)), encoding=None, stdin=asyncssh.DEVNULL
            ) as process:
                target = await asyncio.to_thread(open, dest, "wb")
                try:
                    while chunk := await process.stdout.read(UPLOAD_CHUNK_BYTES):
                        await asyncio.to_thread(target.write, chunk)
                finally:
                    await asyncio.to_thread(target.close)
                error = (await process.stderr.read()).decode(errors="replace").strip()
                await process.wait()
        except CONNECTION_ERRORS as exc:
            raise RuntimeFailure(
                f"fetching the workspace {remote_dir} from server {self.server_name} failed: {describe(exc)}"
            ) from exc
        if process.exit_status != 0:
            raise RuntimeFailure(
                f"archiving the workspace {remote_dir} on server {self.server_name} failed "
                f"(exit code {process.exit_status}): {error or 'no output'}"
            )


def scan_tree(root: Path) -> list[Entry]:
    """Everything under `root` without following symlinks, directories before their contents."""
    if not root.is_dir():
        raise RuntimeFailure(f"workspace {root} is not a directory on the agent's host")
    entries: list[Entry] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            info = path.lstat()
            relative = path.relative_to(root).as_posix()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                entries.append(Entry(relative, "symlink", path, mode, info.st_atime, info.st_mtime,
                                     os.readlink(path)))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(Entry(relative, "dir", path, mode, info.st_atime, info.st_mtime))
            elif stat.S_ISREG(info.st_mode):
                entries.append(Entry(relative, "file", path, mode, info.st_atime, info.st_mtime))
            else:
                entries.append(Entry(relative, "other", path, mode, info.st_atime, info.st_mtime))
        # os.walk lists symlinks to directories among dirnames but does not descend into them.
    return entries


async def _upload_entry(sftp: asyncssh.SFTPClient, entry: Entry, remote_path: str) -> None:
    if entry.kind == "symlink":
        assert entry.target is not None
        if await sftp.exists(remote_path) or await sftp.islink(remote_path):
            await sftp.remove(remote_path)
        await sftp.symlink(entry.target, remote_path)
    elif entry.kind == "file":
        local = await asyncio.to_thread(open, entry.local, "rb")
        try:
            async with sftp.open(remote_path, "wb") as remote:
                offset = 0
                while True:
                    chunk = await asyncio.to_thread(local.read, UPLOAD_CHUNK_BYTES)
                    if not chunk:
                        break
                    await remote.write(chunk, offset)
                    offset += len(chunk)
        finally:
            await asyncio.to_thread(local.close)
        await _set_attributes(sftp, remote_path, entry)


async def _set_attributes(sftp: asyncssh.SFTPClient, remote_path: str, entry: Entry) -> None:
    await sftp.setstat(remote_path, asyncssh.SFTPAttrs(permissions=entry.mode, atime=int(entry.atime),
                                                       mtime=int(entry.mtime)))
