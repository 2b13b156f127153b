"""Images on one Docker engine: present or pulled, the agent's build results, and workspaces copied in and out.

Build results are `deploy-agent/<application>:<tag>`; no registry holds them, so they are
never pulled. A workspace travels as a tar of `workspace/...`: into a build container owned
by root with the modes git would give, out of an image into owner-only files on the host.
"""

from __future__ import annotations

import asyncio
import functools
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

import docker
import docker.errors
from docker.utils import parse_repository_tag

from agent.errors import RuntimeFailure
from agent.logs import DeploymentLog
from agent.runtimes.base import RELEASE_STAGE
from agent.runtimes.docker.gateway import (
    APPLICATION_LABEL,
    COPY_ROLE,
    INSTANCE_LABEL,
    ContainerMissing,
    DockerGateway,
    create_idle_container,
)

# Build result images are `deploy-agent/<application>:<tag>`; they are never pulled from a registry.
RELEASE_REPOSITORY = "deploy-agent"
WORKSPACE = "/workspace"


class Images:
    """The images of one engine, and the workspace inside them."""

    def __init__(self, gateway: DockerGateway) -> None:
        self._gateway = gateway

    async def exists(self, reference: str) -> bool:
        """Whether the image is present on this host."""
        try:
            await self._gateway.call(f"inspecting image {reference}", lambda client: client.api.inspect_image(reference))
        except ContainerMissing:
            return False
        return True

    async def ensure(self, image: str, log: DeploymentLog, stage: str) -> None:
        """Pulls the image unless it is present; the log says when it pulls."""
        if await self.exists(image):
            return
        log.agent(stage, f"image {image} is not present on this host; pulling it")
        repository, tag = parse_repository_tag(image)
        try:
            await self._gateway.call(f"pulling image {image}", lambda client: client.images.pull(repository, tag=tag))
        except RuntimeFailure as exc:
            raise RuntimeFailure(
                f"image {image} is not present on this host and could not be pulled: {exc.message}"
            ) from exc

    async def ensure_release_image(self, image: str, log: DeploymentLog) -> None:
        """Pulls a missing image, except the agent's own build results, which no registry holds."""
        repository, _ = parse_repository_tag(image)
        if repository.startswith(f"{RELEASE_REPOSITORY}/"):
            if not await self.exists(image):
                raise RuntimeFailure(f"image {image} is not present on this host")
            return
        await self.ensure(image, log, RELEASE_STAGE)

    async def config_of(self, reference: str) -> dict[str, Any]:
        """The image's config, or an empty one when the image is gone."""
        try:
            details = await self._gateway.call(
                f"inspecting image {reference}", lambda client: client.api.inspect_image(reference)
            )
        except ContainerMissing:
            return {}
        return details.get("Config") or {}

    async def list_release_images(self, application: str) -> list[str]:
        """References of the application's build result images (`deploy-agent/<application>:*`), newest first."""
        repository = f"{RELEASE_REPOSITORY}/{application}"
        # Only this agent's images: another agent on the engine may have an application of that name.
        labels = [f"{APPLICATION_LABEL}={application}"]
        if self._gateway.instance:
            labels.append(f"{INSTANCE_LABEL}={self._gateway.instance}")
        images = await self._gateway.call(
            f"listing the images of {application}",
            lambda client: client.api.images(name=repository, filters={"label": labels}),
        )
        found = [
            (int(image.get("Created") or 0), tag)
            for image in images
            for tag in image.get("RepoTags") or []
            if tag.startswith(f"{repository}:")
        ]
        return [tag for _, tag in sorted(found, key=lambda item: (-item[0], item[1]))]

    async def remove(self, reference: str) -> bool:
        """Removes the image reference; False when it is missing or a container (even stopped) uses it."""
        try:
            await self._gateway.call(
                f"removing image {reference}", lambda client: client.api.remove_image(reference, force=False)
            )
        except ContainerMissing:
            return False
        except RuntimeFailure as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.APIError) and cause.status_code == 409:
                return False
            raise
        return True

    async def copy_workspace_out(self, image: str, dest: Path) -> None:
        """Extracts the image's /workspace into the host directory `dest` (its content, not the folder)."""
        labels = self._gateway.labels(COPY_ROLE)  # deployment and application come with the image's own labels
        try:
            container_id = await self._gateway.create_cancel_safe(
                "creating the container to copy the workspace out of",
                lambda client: create_idle_container(client, image, labels),
            )
        except ContainerMissing as exc:
            raise RuntimeFailure(f"image {image} is not present on this host") from exc
        try:
            await self._gateway.in_thread(functools.partial(Path(dest).mkdir, parents=True, exist_ok=True))
            try:
                archive = await self.fetch_workspace(container_id, Path(dest).parent, f"copying {WORKSPACE} out of image {image}")
            except ContainerMissing as exc:
                raise RuntimeFailure(f"image {image} has no {WORKSPACE}") from exc
            try:
                await self._gateway.in_thread(functools.partial(extract_workspace, archive, Path(dest), image))
            finally:
                archive.close()
        finally:
            await asyncio.shield(self._gateway.remove_container(container_id))

    async def remove_copy_containers(self) -> int:
        """Removes copy containers an interrupted copy_workspace_out left behind; returns how many."""
        entries = await self._gateway.list_containers(COPY_ROLE)
        for entry in entries:
            await self._gateway.remove_container(entry["Id"])
        return len(entries)

    async def fetch_workspace(self, container_id: str, directory: Path, action: str) -> IO[bytes]:
        """The container's /workspace as a tar, owners and modes kept, in an unnamed temporary file next to `directory`."""
        return await self._gateway.call(action, lambda client: _fetch_workspace(client, container_id, directory))


def _fetch_workspace(client: docker.DockerClient, container_id: str, directory: Path) -> IO[bytes]:
    chunks, _ = client.api.get_archive(container_id, WORKSPACE)
    archive = tempfile.TemporaryFile(dir=directory if directory.is_dir() else None, prefix=".workspace-", suffix=".tar")
    try:
        for chunk in chunks:
            archive.write(chunk)
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return archive


def archive_workspace(workspace: Path) -> IO[bytes]:
    """A tar of the workspace as `workspace/`, in an unnamed temporary file (sources may be big)."""
    # Next to the workspace rather than in /tmp, which is often a RAM-backed tmpfs.
    directory = workspace.parent if workspace.parent.is_dir() else None
    archive = tempfile.TemporaryFile(dir=directory, prefix=".workspace-", suffix=".tar")
    try:
        with tarfile.open(fileobj=archive, mode="w") as tar:
            if workspace.is_dir():
                tar.add(workspace, arcname="workspace", filter=_owned_by_root)
            else:
                # No source: /workspace must still exist, empty.
                entry = tarfile.TarInfo("workspace")
                entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(entry)
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return archive


def extract_workspace(archive: IO[bytes], dest: Path, image: str) -> None:
    """Extracts a `workspace/...` tar into `dest` without the leading folder, refusing unsafe members."""
    prefix = PurePosixPath(WORKSPACE).name + "/"
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = []
            for member in tar:
                if member.name.rstrip("/") == prefix.rstrip("/"):
                    continue  # the folder itself: dest stands for it
                relative = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                parts = PurePosixPath(relative).parts
                if not relative or relative.startswith("/") or ".." in parts:
                    raise RuntimeFailure(f"refusing unsafe path {member.name!r} in {WORKSPACE} of image {image}")
                if member.isdev():
                    raise RuntimeFailure(f"refusing device or pipe {member.name!r} in {WORKSPACE} of image {image}")
                member.name = relative
                if member.islnk():
                    # Hard links name another member of the archive: that one loses its prefix too.
                    member.linkname = member.linkname[len(prefix):] if member.linkname.startswith(prefix) else ""
                members.append(member)
            # The "data" filter also refuses links that point outside dest and drops owners and modes bits.
            tar.errorlevel = 1
            tar.extractall(dest, members=members, filter=_private_data)
    except tarfile.FilterError as exc:
        raise RuntimeFailure(f"refusing unsafe entry in {WORKSPACE} of image {image}: {exc}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise RuntimeFailure(f"extracting {WORKSPACE} of image {image} into {dest} failed: {exc}") from exc


def _owned_by_root(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    # As `docker cp` does: the agent's own uid means nothing inside the container.
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = "root"
    # The agent's copies are owner-only (umask 077); inside the container they get the modes
    # git would give them, so an image that runs as a non-root USER can still read /workspace.
    if entry.isdir() or (entry.isfile() and entry.mode & 0o100):
        entry.mode = 0o755
    elif entry.isfile():
        entry.mode = 0o644
    return entry


def _private_data(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, then owner-only modes: files the agent extracts are its user's alone."""
    member = tarfile.data_filter(member, path)
    if member.mode is not None and not member.issym():
        mode = 0o700 if member.isdir() else (member.mode & 0o100) | 0o600
        member = member.replace(mode=mode, deep=False)
    return member
