"""The registry's HTTP API (Docker Registry v2), for what the engine cannot do: listing and deleting tags.

Deleting goes by manifest digest, which removes every tag on it: a digest that a kept tag
also names is never deleted. The registry frees the layers only at its garbage collection
(`registry garbage-collect CONFIG`, run by the operator while it is read-only), and deletes
only with `storage.delete.enabled` in its config; otherwise it answers 405, said in a warning.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import aiohttp
import structlog

from agent.config import RegistrySettings
from agent.errors import RuntimeFailure

logger = structlog.get_logger("agent.registry")

MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class PruneResult:
    removed: list[str]  # references whose manifest was deleted
    refused: str | None = None  # why the registry would not delete, if it would not


class RegistryApi:
    """Tags of repositories in the configured registry."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        host = settings.url.split("/", 1)[0]
        # Docker itself talks plain HTTP to a loopback registry and HTTPS to any other.
        self.base = f"{'http' if _is_loopback(host) else 'https'}://{settings.url}/v2"
        self._auth = (
            aiohttp.BasicAuth(settings.username, settings.password or "") if settings.username is not None else None
        )

    async def prune(self, repository: str, keep_tags: set[str]) -> PruneResult:
        """Deletes the manifests of `repository`'s tags outside `keep_tags` (and not shared with a kept one)."""
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT, auth=self._auth) as session:
                return await self._prune(session, repository, keep_tags)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RuntimeFailure(f"the registry {self.settings.url} is unreachable: {exc}") from exc

    async def _prune(self, session: aiohttp.ClientSession, repository: str, keep_tags: set[str]) -> PruneResult:
        tags = await self._tags(session, repository)
        digests = {tag: await self._digest(session, repository, tag) for tag in tags}
        # Digests not to delete: a kept tag's, or one deleted already (its other tags went with it).
        settled = {digests[tag] for tag in tags if tag in keep_tags}
        removed: list[str] = []
        for tag in tags:
            digest = digests[tag]
            if tag in keep_tags or digest is None or digest in settled:
                continue
            async with session.delete(f"{self.base}/{repository}/manifests/{digest}") as response:
                if response.status == 405:
                    return PruneResult(removed, "the registry does not allow deleting (storage.delete.enabled)")
                if response.status not in (202, 404):
                    raise RuntimeFailure(f"deleting {repository}:{tag} from the registry failed: HTTP {response.status}")
            settled.add(digest)
            removed.append(f"{self.settings.url}/{repository}:{tag}")
        return PruneResult(removed)

    async def _tags(self, session: aiohttp.ClientSession, repository: str) -> list[str]:
        async with session.get(f"{self.base}/{repository}/tags/list") as response:
            if response.status == 404:
                return []
            if response.status != 200:
                raise RuntimeFailure(f"listing the tags of {repository} in the registry failed: HTTP {response.status}")
            body = await response.json(content_type=None)
        return sorted(str(tag) for tag in (body.get("tags") or []))

    async def _digest(self, session: aiohttp.ClientSession, repository: str, tag: str) -> str | None:
        headers = {"Accept": MANIFEST_TYPES}
        async with session.head(f"{self.base}/{repository}/manifests/{tag}", headers=headers) as response:
            if response.status != 200:
                return None
            return response.headers.get("Docker-Content-Digest")


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
